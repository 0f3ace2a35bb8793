"""The first command of any session with a GPU: every path that only a GPU runs, in one table.

Each method trains a short run on Fashion-MNIST on CUDA under --precision auto (bf16 on
GPUs of compute capability 8 and up, fp16 with a gradient scaler below); SimSiam runs once
more under fp16 with its scaler, and SimCLR once through torchrun (NCCL, world size 1).
Then the throughput benchmark (benchmarks/throughput.py). Every result goes into one JSON
as soon as it exists, so an interrupted check keeps what it finished, and a rerun continues.

    python benchmarks/gpu_check.py --deb dataset-fashion-mnist_*.deb   # no internet: the Debian package file
    python benchmarks/gpu_check.py --runs simclr,byol --skip-throughput  # a part of it

On an H100 the whole check is meant to fit in 8 minutes, the .deb included. Without CUDA it
says so and runs on the CPU, where the default budget takes long: pass a small one (the test
does: --epochs 1 --subset 64 --extra "--batch-size 32 --width 8").
"""
import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # safety.py, for reading the runs' metrics
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
# name -> (launcher, script and flags).
RUNS = {
    "simclr": ([], ["simclr.py"]),
    "simsiam": ([], ["simsiam.py", "--cut", "3"]),
    "byol": ([], ["byol.py"]),
    "moco-v2": ([], ["moco.py", "--version", "v2"]),
    "moco-v3-vit": ([], ["moco.py", "--version", "v3", "--arch", "vit_small"]),
    "simsiam-fp16": ([], ["simsiam.py", "--cut", "3", "--precision", "fp16"]),
    "simclr-torchrun": (TORCHRUN, ["simclr.py"]),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_check"), help="folder for the runs and the JSON")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--deb", default=None, help="a dataset-fashion-mnist .deb to unpack into OUT/data when the "
                                               "data folder is missing (a machine without internet)")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=20000, help="train and test images per run")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--extra", default="", help="more flags for every training run")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--throughput", default="", help="flags for benchmarks/throughput.py (default: its own)")
    p.add_argument("--skip-throughput", action="store_true")
    return p.parse_args(argv)


def data_dir(a):
    """The Fashion-MNIST folder, unpacked from the .deb when needed."""
    if glob.glob(os.path.join(a.data_dir, "train-images-idx3-ubyte*")):
        return a.data_dir
    if a.deb:
        target = os.path.join(a.out, "data")
        subprocess.run(["dpkg-deb", "-x", a.deb, target], check=True)
        return os.path.join(target, "usr", "share", "datasets", "fashion-mnist")
    sys.exit(f"error: no Fashion-MNIST in {a.data_dir}; install dataset-fashion-mnist or pass --deb FILE.deb")


def train(name, a, fashion):
    """One run into OUT/<name>, its output in OUT/<name>.log; returns its row of the table."""
    launcher, script = RUNS[name]
    folder = os.path.join(a.out, name)
    flags = [*script, "--dataset", "fashionmnist", "--data-dir", fashion, "--subset", str(a.subset),
             "--epochs", str(a.epochs), "--warmup", "1", "--batch-size", str(a.batch_size), "--knn-every", "0",
             "--save-every", "0", "--device", a.device, *shlex.split(a.extra), "--out", folder]
    resume = ["--resume", "auto"] if os.path.isdir(folder) else []  # continue an interrupted run
    t0 = time.time()
    with open(os.path.join(a.out, f"{name}.log"), "w") as log:
        rc = subprocess.run([sys.executable, *launcher, *flags, *resume], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    row = {"command": shlex.join(["python", *launcher, *flags]), "wall_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(a.out, f"{name}.log")) as log:
        text = log.read()
    start = [line for line in text.splitlines() if " | device " in line]
    row["device"] = start[0].split(" | device ")[1].split(" | ")[0] if start else "?"
    if rc != 0:
        return {**row, "status": f"failed (exit {rc}): {(text.strip().splitlines() or [''])[-1][:200]}"}
    import safety  # here, not at the top: the .deb unpacking needs no torch
    lines, _ = safety.read_jsonl(os.path.join(folder, "metrics.jsonl"))
    return {**row, "status": "ok", "knn_top1": lines[-1]["knn_top1"], "emb_norm": lines[-1]["emb_norm_mean"],
            "seconds_per_epoch": sum(line["epoch_seconds"] for line in lines) / len(lines),
            "images_per_second": lines[-1]["images_per_second"]}


def main(argv=None):
    a = parse(argv)
    unknown = set(a.runs.split(",")) - set(RUNS)
    if unknown:
        sys.exit(f"error: --runs {','.join(sorted(unknown))}: no such run; choose from {', '.join(RUNS)}")
    import torch
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gpu_check.json")
    cuda = torch.cuda.is_available()
    result = json.load(open(path)) if os.path.exists(path) else {}
    result.update(torch=torch.__version__, cuda=cuda,
                  device_name=torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA: the CPU fallback path)")
    print(f"gpu_check on {result['device_name']}", flush=True)

    def save():
        with open(path + ".tmp", "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(path + ".tmp", path)

    fashion = data_dir(a)
    result.setdefault("runs", {})
    for name in a.runs.split(","):
        if result["runs"].get(name, {}).get("status") != "ok":
            print(f"{name}: training...", flush=True)
            result["runs"][name] = train(name, a, fashion)
            save()
    if not a.skip_throughput and "throughput" not in result:
        bench = os.path.join(a.out, "throughput.json")
        cmd = [sys.executable, "benchmarks/throughput.py", *shlex.split(a.throughput), "--json", bench]
        if subprocess.run(cmd, cwd=ROOT).returncode == 0:
            result["throughput"] = json.load(open(bench))
            save()
    print(f"\n| run | device and precision | k-NN top-1 | norm | s/epoch | images/s | status |\n| {' | '.join(['---'] * 7)} |")
    for name, r in result["runs"].items():
        numbers = [f"{r[k]:{f}}" if k in r else "-" for k, f in
                   (("knn_top1", ".2f"), ("emb_norm", ".3f"), ("seconds_per_epoch", ".1f"), ("images_per_second", ".0f"))]
        print(f"| {name} | {r['device']} | {' | '.join(numbers)} | {r['status']} |")
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
