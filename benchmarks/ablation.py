"""Issue 24's ablation of the laptop recipe: which of the project's choices cost or gain what
against a plain SimSiam, three seeds per row, into results/laptop-ablation.json.

Every run is SimSiam with `--preset laptop --cut 3` (the README's laptop row simsiam-c3)
plus the one change of its row; `plain-pipeline` runs the same model, loss and schedule on
views from torchvision's PIL transforms in DataLoader workers (benchmarks/plain_pipeline.py).
One row per (row, seed) goes into the json under a lock as soon as its run ends, so an
interrupted grid resumes where it stopped, and a half-trained run continues from its last
epoch (--resume auto):

    python benchmarks/ablation.py                    # the grid, or what is left of it
    python benchmarks/ablation.py --seeds 0 & python benchmarks/ablation.py --seeds 1   # two workers, one per core
    python benchmarks/ablation.py --table            # mean ± std per row, from the json

Each run uses --threads intra-op threads (default 1; the plain pipeline's --workers view
processes come on top); the exact command is stored with its row. Workers side by side must
take different --seeds (or --rows): each skips only the rows the json held when it started.
"""
import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from laptop import ROOT, add_row, cpu_model, load, train  # noqa: E402

# name -> (script and flags after --preset laptop, the change, what the official SimSiam code
# (github.com/facebookresearch/simsiam, main_simsiam.py and builder.py) does there).
ROWS = {
    "baseline": (["simsiam.py", "--cut", "3"], "none: the laptop recipe", "-"),
    "no-nesterov": (["simsiam.py", "--cut", "3", "--no-nesterov"], "Nesterov momentum off",
                    "off: plain SGD momentum"),
    "no-zero-init-residual": (["simsiam.py", "--cut", "3", "--no-zero-init-residual"],
                              "zero-init-residual off", "on (builder.py)"),
    "no-fix-pred-lr": (["simsiam.py", "--cut", "3", "--no-fix-pred-lr"], "fix-pred-lr off",
                       "a flag, on in its README's command"),
    "plain-pipeline": (["benchmarks/plain_pipeline.py", "--cut", "3"], "torchvision PIL views in DataLoader workers",
                       "PIL views in DataLoader workers"),
    # Not run unless named in --rows: cut 1, and the newcomer's run of the issue (all three choices off).
    "baseline-c1": (["simsiam.py"], "cut-init off (--cut 1)", "no cut-init"),
    "plain-pipeline-c1": (["benchmarks/plain_pipeline.py"], "PIL views, cut-init off", "no cut-init"),
    "plain-all-off": (["benchmarks/plain_pipeline.py", "--cut", "3", "--no-nesterov", "--no-zero-init-residual",
                       "--no-fix-pred-lr"], "PIL views, Nesterov, zero-init-residual and fix-pred-lr off",
                      "the issue's independent SimSiam"),
}
DEFAULT_ROWS = ("baseline", "no-nesterov", "no-zero-init-residual", "no-fix-pred-lr", "plain-pipeline")
SEEDS = (0, 1, 2)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for laptop-ablation.json and the runs")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated rows, of: {', '.join(ROWS)}")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run (OMP_NUM_THREADS)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain-pipeline rows")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (tests)")
    p.add_argument("--extra", default="", help="more flags for every run (tests: synthetic data, a tiny budget)")
    p.add_argument("--table", action="store_true", help="print the table from the json and stop")
    a = p.parse_args(argv)
    unknown = set(a.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows {','.join(sorted(unknown))}: not in the grid ({', '.join(ROWS)})")
    return a


def run_one(name, seed, a):
    """Train (or finish training) one run; returns its row."""
    script, change, official = ROWS[name]
    # Under results/laptop/, which git already ignores: the run folders hold checkpoints.
    folder = os.path.join(a.out, "laptop", "ablation", f"{name}-s{seed}")
    workers = ["--workers", str(a.workers)] if "plain_pipeline" in script[0] else []
    flags = [*script, "--preset", "laptop", "--seed", str(seed), *workers,
             *(["--epochs", str(a.epochs)] if a.epochs else []), *shlex.split(a.extra), "--out", folder]
    command, minutes = train(flags, folder, a.threads)
    import safety  # here, not at the top: --table needs no torch
    import torch
    lines, _ = safety.read_jsonl(os.path.join(folder, "metrics.jsonl"))
    seconds = [line["epoch_seconds"] for line in lines]
    return {"name": name, "change": change, "official": official, "script": script[0], "seed": seed,
            "epochs": len(lines), "knn_top1": lines[-1]["knn_top1"], "emb_norm": lines[-1]["emb_norm_mean"],
            "norm_per_epoch": [round(line["emb_norm_mean"], 4) for line in lines],
            # minutes: this call's wall time (the rest only, for a resumed run); train_minutes: the
            # epochs' own time from metrics.jsonl; seconds_per_epoch: their median, k-NN epoch included.
            "minutes": round(minutes, 2), "train_minutes": round(sum(seconds) / 60, 2),
            "seconds_per_epoch": round(statistics.median(seconds), 2),
            "cpu": cpu_model(), "threads": a.threads, "workers": a.workers if workers else 0,
            "torch": torch.__version__, "command": command}


def table(rows):
    """Markdown: mean ± std over seeds per row, and the difference to the baseline of its cut."""
    def ms(values):
        if len(values) == 1:  # one seed: no spread to show
            return f"{values[0]:.3g}"
        return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"

    out = ["| row | change | official SimSiam code | seeds | k-NN top-1 (%) | k-NN per seed | vs baseline (points) "
           "| final norm | s/epoch | training minutes |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    knn = {name: [r["knn_top1"] for r in rows if r["name"] == name] for name in ROWS}
    for name, (script, change, official) in ROWS.items():
        mine = sorted((r for r in rows if r["name"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        base = knn["baseline" if "--cut" in script else "baseline-c1"]
        delta = f"{statistics.mean(knn[name]) - statistics.mean(base):+.1f}" if base and "baseline" not in name else "-"
        out.append(f"| {name} | {change} | {official} | {len(mine)} | {ms(knn[name])} | "
                   f"{', '.join(f'{v:.1f}' for v in knn[name])} | {delta} | {ms([r['emb_norm'] for r in mine])} | "
                   f"{ms([r['seconds_per_epoch'] for r in mine])} | {ms([r['train_minutes'] for r in mine])} |")
    return "\n".join(out)


def main(argv=None):
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "laptop-ablation.json")
    result = load(path)
    if a.table:
        print(table(result["rows"]))
        return result
    done = {(r["name"], r["seed"]) for r in result["rows"]}
    failed, t0 = [], time.time()
    for seed in map(int, a.seeds.split(",")):  # seed by seed: a partial grid covers every row early
        for name in a.rows.split(","):
            if (name, seed) in done:
                continue
            try:
                result = add_row(run_one(name, seed, a), path, ROWS)
            except subprocess.CalledProcessError as e:  # one broken row does not stop the others
                failed.append(f"{name} seed {seed} (exit status {e.returncode})")
                print(f"{name} seed {seed} failed; the grid goes on", file=sys.stderr, flush=True)
                continue
            print(f"wrote {path} ({len(result['rows'])} rows)", flush=True)
    print(table(result["rows"]))
    print(f"grid time this call {(time.time() - t0) / 60:.1f} min; wrote {path}")
    if failed:
        sys.exit(f"failed: {'; '.join(failed)}; fix the cause and run the same command again to finish them")
    return result


if __name__ == "__main__":
    main()
