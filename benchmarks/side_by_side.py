"""The laptop step against a plain torchvision pipeline, on the same cores, in one command.

For each method (SimCLR, SimSiam) both train with `--preset laptop --cut 3`: the method script
(batched tensor augmentation in the training process, channels-last, torch.compile where the run
is long enough, as the laptop run is) and benchmarks/plain_pipeline.py (the same model, loss and
schedule on PIL views from torchvision.transforms in DataLoader worker processes, default memory
format, uncompiled). Each run is a fresh process with the given intra-op threads; the plain
pipeline's workers come on top, so each configuration names every process it uses. The first
--timed epochs of the 10-epoch laptop run are timed (no k-NN falls in them); the run is stopped,
and its 10 epochs are counted as the timed epochs plus the last timed one for each epoch left.
Compiling happens in epoch 1, so its time is inside the count.

    python benchmarks/side_by_side.py                       # 1 thread, 1 worker; 2 threads, 2 workers
    python benchmarks/side_by_side.py --methods simsiam --configs 2:1 --json results/side_by_side.json
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
    p.add_argument("--methods", default="simclr,simsiam", help="comma-separated: simclr, simsiam")
    p.add_argument("--configs", default="1:1,2:2", help="THREADS:WORKERS,... (the plain pipeline's workers)")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds of the two runs")
    p.add_argument("--epochs", type=int, default=10, help="the schedule's epochs (the laptop preset's 10)")
    p.add_argument("--timed", type=int, default=2, help="epochs run and timed; the others are counted as the last")
    p.add_argument("--extra", default="", help="more flags for both runs (e.g. --subset 256 for a quick look)")
    p.add_argument("--json", default="", help="also write the numbers here")
    return p.parse_args(argv)


def run_seconds(method, plain, threads, workers, a, folder):
    """Seconds of a --epochs run (its first --timed epochs as measured) of one fresh process, and those epochs'."""
    script = "benchmarks/plain_pipeline.py" if plain else f"{method}.py"
    flags = ["--preset", "laptop", "--cut", "3", "--epochs", str(a.epochs), "--out", folder, *a.extra.split()]
    if plain:
        flags += ["--method", method, "--workers", str(workers), "--threads", str(threads)]
    # A cache of its own: each run compiles from scratch, as a first run on a new machine does.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": os.path.join(folder, "inductor")}
    metrics = os.path.join(folder, "metrics.jsonl")

    def lines():
        return open(metrics).read().count("\n") if os.path.exists(metrics) else 0
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, script, *flags], cwd=ROOT, env=env, stdout=log, stderr=log, text=True)
        while proc.poll() is None and lines() < a.timed:
            time.sleep(0.2)
        proc.terminate()  # the timed epochs are what is measured: the rest (and the final k-NN) would only cost time
        proc.wait()
        if lines() < min(a.timed, a.epochs):
            log.seek(0)
            sys.exit(f"error: {script} failed: {(log.read().strip().splitlines() or [''])[-1]}")
    import safety
    seconds = [row["epoch_seconds"] for row in safety.read_jsonl(metrics)[0][: a.timed]]
    return sum(seconds) + (a.epochs - len(seconds)) * seconds[-1], seconds


def main(argv=None):
    a = parse(argv)
    import torch
    from laptop import cpu_model
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
              "command": "python benchmarks/side_by_side.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": []}
    print(f"| method | threads | plain workers | script s/{a.epochs} epochs | plain s/{a.epochs} epochs | "
          "ratio (plain / script) |\n| --- | --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods.split(","):
            for config in a.configs.split(","):
                threads, workers = map(int, config.split(":"))
                ours, plain = [], []
                for i in range(a.repeats):
                    for is_plain, times in ((False, ours), (True, plain)):
                        folder = os.path.join(tmp, f"{method}-{config}-{i}-{'plain' if is_plain else 'script'}")
                        times.append(run_seconds(method, is_plain, threads, workers, a, folder))
                t_ours, t_plain = statistics.median(t for t, _ in ours), statistics.median(t for t, _ in plain)
                row = {"method": method, "threads": threads, "plain_workers": workers,
                       "ratio": round(t_plain / t_ours, 3),
                       "script_seconds": round(t_ours, 3), "plain_seconds": round(t_plain, 3),
                       "script_epoch_seconds": [e for _, e in ours], "plain_epoch_seconds": [e for _, e in plain]}
                result["runs"].append(row)
                print(f"| {method} | {threads} | {workers} | {t_ours:.0f} | {t_plain:.0f} | {row['ratio']:.2f} |",
                      flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
