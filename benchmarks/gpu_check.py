"""The first thing to run on a machine with a GPU: one command, one JSON.

It runs (1) the throughput benchmark (benchmarks/throughput.py) and (2) SimCLR and
SimSiam, default and --cut 3, on Fashion-MNIST for 15 epochs at batch 512, and writes the
k-NN top-1, the final embedding norm and the seconds per epoch of each run into one JSON,
after every step (an interrupted check keeps what it finished).

    python benchmarks/gpu_check.py                                      # on a CUDA machine
    python benchmarks/gpu_check.py --deb dataset-fashion-mnist_*.deb    # data from the Debian package file
    python benchmarks/gpu_check.py --device cpu --epochs 1 --extra "--subset 256 --batch-size 64" \\
        --throughput "--device cpu --images 64 --batch-size 16 --size 16 --steps 1 --warmup-steps 1 \\
        --workers 0 --knn-bank 64 --knn-queries 32 --methods simclr"   # the CPU path, tiny (the test)

Without CUDA it says so and runs on the CPU, which at the default budget takes hours: pass a
budget as above.
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
sys.path.insert(0, ROOT)  # common.py, for reading the runs' metrics
RUNS = {"simclr-c1": ["simclr.py"], "simclr-c3": ["simclr.py", "--cut", "3"],
        "simsiam-c1": ["simsiam.py"], "simsiam-c3": ["simsiam.py", "--cut", "3"]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_check"), help="folder for the runs and the JSON")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--deb", default=None, help="a dataset-fashion-mnist .deb to unpack into OUT/data when the "
                                               "data folder is missing (a machine without internet)")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--extra", default="", help="more flags for every training run")
    p.add_argument("--throughput", default="", help="flags for benchmarks/throughput.py (default: its own)")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated training runs (default: all four)")
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


def main(argv=None):
    a = parse(argv)
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

    if "throughput" not in result:
        bench = os.path.join(a.out, "throughput.json")
        cmd = [sys.executable, "benchmarks/throughput.py", *shlex.split(a.throughput), "--json", bench]
        subprocess.run(cmd, cwd=ROOT, check=True)
        result["throughput"] = json.load(open(bench))
        save()
    fashion = data_dir(a)
    result.setdefault("runs", {})
    for name, script in RUNS.items():
        if name in result["runs"] or name not in a.runs.split(","):
            continue
        folder = os.path.join(a.out, name)
        flags = [*script, "--dataset", "fashionmnist", "--data-dir", fashion, "--epochs", str(a.epochs),
                 "--batch-size", str(a.batch_size), "--knn-every", "5", "--device", a.device,
                 *shlex.split(a.extra), "--out", folder]
        resume = ["--resume", "auto"] if os.path.isdir(folder) else []  # continue an interrupted run
        t0 = time.time()
        subprocess.run([sys.executable, *flags, *resume], cwd=ROOT, check=True)
        import common  # here, not at the top: the .deb unpacking needs no torch
        lines, _ = common.read_jsonl(os.path.join(folder, "metrics.jsonl"))
        result["runs"][name] = {
            "command": "python " + shlex.join(flags), "knn_top1": lines[-1]["knn_top1"],
            "knn_per_epoch": {line["epoch"]: line["knn_top1"] for line in lines if "knn_top1" in line},
            "emb_norm": lines[-1]["emb_norm_mean"], "norm_per_epoch": [line["emb_norm_mean"] for line in lines],
            "seconds_per_epoch": sum(line["epoch_seconds"] for line in lines) / len(lines),
            "wall_seconds": round(time.time() - t0, 1)}
        save()
    for name, r in result["runs"].items():
        print(f"{name}: k-NN top-1 {r['knn_top1']:.2f} %, norm {r['emb_norm']:.3f}, "
              f"{r['seconds_per_epoch']:.1f} s/epoch")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
