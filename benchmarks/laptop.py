"""The paper's CPU-checkable effects, three seeds each, on a laptop: the grid behind the
README's "Results on a laptop CPU".

Every run is a method script with `--preset laptop` (real Fashion-MNIST, a ResNet-18 of 16
base channels, a short schedule; common.LAPTOP) plus the flags of its row, then
`eval_knn.py --analyses buckets,novelty --space loss` on its checkpoint. One row per run
goes into results/laptop.json as soon as the run ends, so an interrupted grid resumes
where it stopped (a half-trained run continues from its last epoch):

    python benchmarks/laptop.py                 # the whole grid, or what is left of it
    python benchmarks/laptop.py --table         # the README table from results/laptop.json
    python benchmarks/laptop.py --only simsiam-c3 --seeds 0   # one row

Each run uses --threads intra-op threads (default 1, so that a run's numbers do not depend
on what else the machine does); the exact command is stored with its row. Workers with
different --seeds may run side by side (one per core); each adds its rows under a lock.
"""
import argparse
import fcntl
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (script and flags, the paper's claim it checks). Rows that differ only in one flag
# form the comparisons of the README table.
GRID = {
    "simsiam-c1": (["simsiam.py"], "Table 2: cut-init helps SimSiam most"),
    "simsiam-c3": (["simsiam.py", "--cut", "3"], "Table 2: cut-init helps SimSiam most"),
    "simclr-c1": (["simclr.py"], "Table 2: cut-init helps SimCLR a little"),
    "simclr-c3": (["simclr.py", "--cut", "3"], "Table 2: cut-init helps SimCLR a little"),
    "simclr-wd5e-4": (["simclr.py", "--wd", "5e-4"], "Fig. 5: weight decay shrinks the norm"),
    "simclr-unseen": (["simclr.py", "--exclude-classes", "8,9"], "Fig. 3: unseen classes get smaller norms"),
    # GradScale with the preset's lr (a sixth of 0.3) and its lr control; warmup typed so the
    # GradScale preset keeps the laptop's one warmup epoch.
    "simclr-p1": (["simclr.py", "--power", "1", "--warmup", "1"], "Sec. 6: GradScale trains faster"),
    "simclr-lr0.05": (["simclr.py", "--lr", "0.05"], "Sec. 6: GradScale trains faster (lr control)"),
}
SEEDS = (0, 1, 2)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for laptop.json and the runs")
    p.add_argument("--only", default=",".join(GRID), help="comma-separated rows of the grid")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (tests)")
    p.add_argument("--extra", default="", help="more flags for every run (tests: a tiny budget)")
    p.add_argument("--table", action="store_true", help="print the README table and stop")
    a = p.parse_args(argv)
    unknown = set(a.only.split(",")) - set(GRID)
    if unknown:
        p.error(f"--only {','.join(sorted(unknown))}: not in the grid ({', '.join(GRID)})")
    return a


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load(path):
    return json.load(open(path)) if os.path.exists(path) else {"rows": []}


def save(result, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, path)


def add_row(row, path, order=GRID):
    """Adds one row to a grid's json (rows sorted by `order`, then seed) and returns the file's rows.
    The file is read again under a lock, so that workers running side by side keep each other's rows."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = load(path)
        result["rows"] = [r for r in result["rows"] if (r["name"], r["seed"]) != (row["name"], row["seed"])]
        result["rows"].append(row)
        names = list(order)
        result["rows"].sort(key=lambda r: (names.index(r["name"]) if r["name"] in names else len(names),
                                           r["name"], r["seed"]))
        save(result, path)
    return result


def train(flags, folder, threads):
    """Run `python *flags` (a method script writing into folder) at `threads` intra-op threads, continuing the
    folder an interrupted call left (from epoch 0 if it has no checkpoint yet). Returns (the command as a user
    would type it, this call's wall time in minutes)."""
    resume = ["--resume", "auto"] if os.path.isdir(folder) else []
    command = f"OMP_NUM_THREADS={threads} python {shlex.join(flags)}"
    print(f"[{time.strftime('%H:%M:%S')}] {command}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *flags, *resume], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   check=True)
    return command, (time.time() - t0) / 60


def run_one(name, seed, a):
    """Train (or finish training) one run and evaluate it; returns its row."""
    script, claim = GRID[name]
    folder = os.path.join(a.out, "laptop", f"{name}-s{seed}")
    flags = [*script, "--preset", "laptop", "--seed", str(seed), *script_flags(a), "--out", folder]
    command, minutes = train(flags, folder, a.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    report = os.path.join(folder, "eval.json")
    subprocess.run([sys.executable, "eval_knn.py", os.path.join(folder, "last.pt"), "--analyses",
                    "buckets,novelty", "--space", "loss", "--json", report], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    import safety  # here, not at the top: --table needs no torch
    lines, _ = safety.read_jsonl(os.path.join(folder, "metrics.jsonl"))
    analyses = json.load(open(report))["analyses"]
    unseen = analyses.get("novelty", {}).get("sets", {}).get("unseen classes", {})
    import torch
    args = json.load(open(os.path.join(folder, "args.json")))["args"]
    return {"name": name, "claim": claim, "method": script[0][:-3], "cut": args["cut"], "power": args["power"],
            "wd": args["wd"], "lr": args["lr"], "seed": seed, "epochs": args["epochs"],
            "knn_top1": lines[-1]["knn_top1"], "emb_norm": lines[-1]["emb_norm_mean"],
            "norm_per_epoch": [round(line["emb_norm_mean"], 4) for line in lines],
            "opposite_per_epoch": [round(line["opposite_rate"], 4) for line in lines],
            "spearman_norm_accuracy": analyses["buckets"]["spearman"],
            "auroc_unseen": unseen.get("auroc"), "relative_norm_unseen": unseen.get("relative"),
            # minutes: the wall time of this call (the rest only, for a run resumed after an interruption);
            # train_minutes: the epochs' own time from metrics.jsonl, whatever interrupted them.
            "minutes": round(minutes, 2), "train_minutes": round(sum(line["epoch_seconds"] for line in lines) / 60, 2),
            "cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__,
            "command": command}


def backfill(rows, out):
    """Rows written before a field was recorded get it from their run's metrics.jsonl."""
    for row in rows:
        path = os.path.join(out, "laptop", f"{row['name']}-s{row['seed']}", "metrics.jsonl")
        if os.path.exists(path) and ("opposite_per_epoch" not in row or "train_minutes" not in row):
            import safety
            lines, _ = safety.read_jsonl(path)
            row["opposite_per_epoch"] = [round(line["opposite_rate"], 4) for line in lines]
            row["train_minutes"] = round(sum(line["epoch_seconds"] for line in lines) / 60, 2)


def script_flags(a):
    return [*(["--epochs", str(a.epochs)] if a.epochs else []), *shlex.split(a.extra)]


def table(rows):
    """Markdown: mean +- std over seeds per grid row."""
    import statistics

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:  # one seed: no spread to show
            return f"{values[0]:.3g}"
        return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"

    out = ["| run | flags | seeds | k-NN top-1 (%) | k-NN per seed | final norm | norm after epoch 1 | opposite pairs (%), epoch 1 → last "
           "| Spearman(norm bin, acc.) | AUROC unseen | training minutes | paper's claim |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (script, claim) in GRID.items():
        mine = [r for r in rows if r["name"] == name]
        if not mine:
            continue
        per_seed = ", ".join(f"{r['knn_top1']:.1f}" for r in sorted(mine, key=lambda r: r["seed"]))
        out.append(f"| {name} | `{' '.join(script[1:]) or '(defaults)'}` | {len(mine)} | "
                   f"{ms([r['knn_top1'] for r in mine])} | {per_seed} | {ms([r['emb_norm'] for r in mine])} | "
                   f"{ms([r['norm_per_epoch'][0] for r in mine])} | "
                   f"{ms([100 * r['opposite_per_epoch'][0] for r in mine if 'opposite_per_epoch' in r])} → "
                   f"{ms([100 * r['opposite_per_epoch'][-1] for r in mine if 'opposite_per_epoch' in r])} | "
                   f"{ms([r['spearman_norm_accuracy'] for r in mine])} | {ms([r['auroc_unseen'] for r in mine])} | "
                   f"{ms([r.get('train_minutes', r['minutes']) for r in mine])} | {claim} |")
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None and one line where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def figure(rows, path):
    """k-NN top-1 per grid row (mean and seeds), and the norm per epoch of every run."""
    if (plt := pyplot()) is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [n for n in GRID if any(r["name"] == n for r in rows)]
    for i, name in enumerate(names):
        accs = [r["knn_top1"] for r in rows if r["name"] == name]
        left.scatter([i] * len(accs), accs, color="C0", s=14)
        left.plot([i - 0.3, i + 0.3], [sum(accs) / len(accs)] * 2, color="C1")
        for r in rows:
            if r["name"] == name:
                right.plot(range(1, len(r["norm_per_epoch"]) + 1), r["norm_per_epoch"], color=f"C{i}",
                           alpha=0.7, label=name if r["seed"] == min(x["seed"] for x in rows if x["name"] == name) else None)
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    left.set_ylabel("k-NN top-1 (%)")
    left.set_title(f"Fashion-MNIST, laptop recipe: k-NN top-1 per run (n = {len(rows)} runs; line: mean)")
    right.set_xlabel("epoch")
    right.set_ylabel("mean embedding norm at the loss (log scale)")
    right.set_yscale("log")  # one run's norm can be ten times the others'; a log axis keeps every curve readable
    right.set_title("Mean embedding norm per epoch, every run (Cor. 3.3: steps grow it)")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "laptop.json")
    result = load(path)
    if a.table:
        backfill(result["rows"], a.out)
        print(table(result["rows"]))
        return result
    backfill(result["rows"], a.out)
    done = {(r["name"], r["seed"]) for r in result["rows"]}
    t0 = time.time()
    for seed in map(int, a.seeds.split(",")):  # seed by seed: a partial grid covers every row early
        for name in a.only.split(","):
            if (name, seed) in done:
                continue
            result = add_row(run_one(name, seed, a), path)
            print(f"wrote {path} ({len(result['rows'])} rows)", flush=True)
    png = figure(result["rows"], os.path.join(a.out, "laptop.png"))
    print(table(result["rows"]))
    print(f"grid time this call {(time.time() - t0) / 60:.1f} min; wrote {path}" + (f" and {png}" if png else ""))
    return result


if __name__ == "__main__":
    main()
