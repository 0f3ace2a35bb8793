"""The laptop step against a plain torchvision pipeline, on the same cores, in one command.

Both train SimSiam with `--preset laptop --cut 3` for --epochs epochs: simsiam.py (batched
tensor augmentation in the training process) and benchmarks/plain_pipeline.py (the same model,
loss and schedule on PIL views from torchvision.transforms in DataLoader worker processes).
They run one after the other, alternating for --repeats rounds, each in a fresh process with
the given intra-op threads; the plain pipeline's workers come on top of its threads, so each
configuration names every process it uses. Epoch 1 (no k-NN in it) is timed, then the run stops:

    python benchmarks/side_by_side.py                       # 1 thread, 1 worker; 2 threads, 2 workers
    python benchmarks/side_by_side.py --configs 2:1 --repeats 3 --json results/side_by_side.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="1:1,2:2", help="comma-separated THREADS:WORKERS (workers: the plain pipeline's)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of the two runs")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; epoch 1 is timed")
    p.add_argument("--extra", default="", help="more flags for both runs (e.g. --subset 256 for a quick look)")
    p.add_argument("--json", default="", help="also write the numbers here")
    return p.parse_args(argv)


def epoch_seconds(script, threads, workers, a, folder):
    """Seconds of epoch 1 of one fresh run."""
    flags = ["--preset", "laptop", "--cut", "3", "--epochs", str(a.epochs), "--out", folder, *a.extra.split()]
    if script.endswith("plain_pipeline.py"):
        flags += ["--workers", str(workers), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    metrics = os.path.join(folder, "metrics.jsonl")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, script, *flags], cwd=ROOT, env=env, stdout=log, stderr=log, text=True)
        while proc.poll() is None and not (os.path.exists(metrics) and open(metrics).read().endswith("\n")):
            time.sleep(0.2)
        proc.terminate()  # epoch 1 is what is timed: the rest (and the final k-NN) would only cost time
        proc.wait()
        if not os.path.exists(metrics):
            log.seek(0)
            sys.exit(f"error: {script} failed: {(log.read().strip().splitlines() or [''])[-1]}")
    import safety
    rows, _ = safety.read_jsonl(metrics)
    return rows[0]["epoch_seconds"], rows[0]["images_per_second"]


def main(argv=None):
    a = parse(argv)
    import torch
    from laptop import cpu_model
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
              "command": "python benchmarks/side_by_side.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "configs": []}
    print("| threads | plain workers | simsiam.py s/epoch | plain s/epoch | ratio (plain / simsiam.py) |\n"
          "| --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for config in a.configs.split(","):
            threads, workers = map(int, config.split(":"))
            ours, plain = [], []
            for i in range(a.repeats):
                ours.append(epoch_seconds("simsiam.py", threads, workers, a, os.path.join(tmp, f"ours{config}{i}")))
                plain.append(epoch_seconds("benchmarks/plain_pipeline.py", threads, workers, a,
                                           os.path.join(tmp, f"plain{config}{i}")))
            t_ours, t_plain = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in plain)
            row = {"threads": threads, "plain_workers": workers, "simsiam_seconds": [s for s, _ in ours],
                   "plain_seconds": [s for s, _ in plain], "ratio": round(t_plain / t_ours, 3)}
            result["configs"].append(row)
            print(f"| {threads} | {workers} | {t_ours:.1f} | {t_plain:.1f} | {row['ratio']:.2f} |", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
