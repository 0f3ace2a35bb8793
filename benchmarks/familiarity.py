"""The paper's second claim on a laptop (issue 29): do embedding norms encode familiarity, and does GradScale
help? SimCLR at `--preset laptop` (Fashion-MNIST, ResNet-18 of 16 channels, 10 epochs), 3 seeds per row, into
results/laptop-familiarity.json: one row per run and a `claims` list recomputed from the rows after every run.

Frequency without a change of content, which no paper ran: the first 5,000 training images plus a seed-chosen
10 % of them repeated so that each appears k times (k = 1, 4, 16; the same images for every k), written as a
Fashion-MNIST folder that `simclr.py --subset 0 --data-dir` reads unchanged. After training, the 5,000 originals
are embedded once each and the repeated images' norms compared with the others' (loss space and backbone). The
other rows are the paper's own tests through `eval_knn.py --analyses buckets,novelty,classes --space loss`.

    python benchmarks/familiarity.py                      # the grid, or what is left of it
    for w in a b; do nohup python benchmarks/familiarity.py > results/familiarity-$w.log 2>&1 & done  # 2 workers
    python benchmarks/familiarity.py --claims             # recompute the claims from the json
    python benchmarks/familiarity.py --table --figure results/laptop-familiarity.png

Work goes seed by seed (seed 0 of every row first), so a partial grid already speaks to every claim. A run's
row is written as soon as it ends; an interrupted run resumes from its last.pt. Workers side by side share
the queue: each run is claimed with a lock file, and a worker skips the runs another one holds or finished.
"""
import argparse
import fcntl
import gzip
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from laptop import ROOT, add_row, cpu_model, load, pyplot, save, train  # noqa: E402

SCRIPT = "simclr.py"  # contrastive: GradScale trains it (Sec. 6), and its loss space is the projector (App. C.1)
# name -> flags after `--preset laptop`. The rep-k rows also get `--subset 0 --data-dir <their built folder>`.
GRID = {
    "base": ["--exclude-classes", "8,9"],  # novelty (Fig. 3) with held-out classes, norm vs accuracy (Fig. 4)
    "lt": ["--dataset", "fashionmnist-lt"],  # the long tail: class size against mean norm (confounded with content)
    # Frequency; k1 is the control: the same images, seen once. An epoch of k16 holds 12,500 images (2.5x the
    # steps of k1), and its k-NN bank each repeated image 16 times: only comparisons within a run are made.
    "rep-k1": [], "rep-k4": [], "rep-k16": [],
    # GradScale with the lr its preset gives (0.3 / 6) and its control at that lr; the warmup typed so that
    # both keep the laptop's 1 epoch (the GradScale preset would set 100).
    "p1": ["--power", "1", "--warmup", "1", "--knn-every", "1"],
    "lr0.05": ["--lr", "0.05", "--knn-every", "1"],
    # GradScale multiplies each gradient by ||z||, about 1.6 in p1's runs (epoch means, seeds 0-2): a control at
    # the lr of that mean step, 0.05 x 1.6, so that a gain of p1 is not only a larger step.
    "lr0.08": ["--lr", "0.08", "--knn-every", "1"],
    "passes": ["--subset", "1000", "--epochs", "50", "--exclude-classes", "8,9"],  # 5x the passes, same 40,000 views
    "width32": ["--width", "32", "--exclude-classes", "8,9"],  # a wider network (about 3x the time of width 16)
}
REPEATS = {"rep-k1": 1, "rep-k4": 4, "rep-k16": 16}
SEEDS = (0, 1, 2)
SOURCE = "/usr/share/datasets/fashion-mnist"  # common.LAPTOP's data_dir (not imported: --table needs no torch)
IMAGES = 5000  # common.LAPTOP's subset: the originals of the rep-k sets, and their test images
FRACTION = 0.1  # of the originals repeated (issue 29): 500 images, enough for a tight AUROC
MIN_SEEDS = 3  # a verdict needs a seed std, and one that means something
KNN_TARGET = 60.0  # %, for epochs-to-accuracy: the laptop SimCLR rows end at 63-66 % (results/laptop.json)
EVAL = ["--analyses", "buckets,novelty,classes", "--space", "loss"]  # the paper reads norms where the loss is


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for laptop-familiarity.json; "
                   "runs and built data sets go to OUT/laptop/familiarity")
    p.add_argument("--only", default=",".join(GRID), help="comma-separated rows of the grid")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run (OMP_NUM_THREADS)")
    p.add_argument("--data-dir", default=SOURCE, help="the Fashion-MNIST idx files the runs and rep-k sets use")
    p.add_argument("--images", type=int, default=IMAGES, help="originals in a rep-k set (tests: a few)")
    p.add_argument("--epochs", type=int, default=None, help="override every row's epochs (tests)")
    p.add_argument("--extra", default="", help="more flags for every run (tests: a tiny budget)")
    p.add_argument("--claims", action="store_true", help="recompute the claims from the json, print them, stop")
    p.add_argument("--table", action="store_true", help="print the README table (claim | verdict | ...) and stop")
    p.add_argument("--figure", metavar="PNG", help="draw the familiarity figure from the json and stop")
    a = p.parse_args(argv)
    if unknown := set(a.only.split(",")) - set(GRID):
        p.error(f"--only {','.join(sorted(unknown))}: not in the grid ({', '.join(GRID)})")
    return a


# ----------------------------------------------------------------------------- the rep-k data sets

def write_idx(path, array):
    """An idx file of unsigned bytes, gzipped: the format of the published Fashion-MNIST files."""
    with gzip.open(path, "wb", compresslevel=6) as fh:
        fh.write(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        fh.write(array.astype("uint8").tobytes())


def repeated_indices(n, seed):
    """The originals repeated, the same for every k at one seed: FRACTION of range(n), sorted."""
    import numpy as np
    return np.sort(np.random.default_rng(seed).choice(n, size=round(FRACTION * n), replace=False))


def build_repeated(source, folder, n, k, seed):
    """A Fashion-MNIST folder with the first n train images, then k - 1 more copies of each repeated one (so it
    appears k times), and the first n test images. Built once, under a lock, atomically; returns its info."""
    import datasets
    import numpy as np
    chosen = repeated_indices(n, seed)
    info = {"source": os.path.abspath(source), "images": n, "k": k, "seed": seed, "fraction": FRACTION,
            "train_images": n + (k - 1) * len(chosen), "repeated": chosen.tolist()}
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:  # two workers may need the same set
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(folder, "familiarity.json")
        if os.path.exists(path) and json.load(open(path)) == info:
            return info
        print(f"building {folder}: {n} images, {len(chosen)} of them {k} times", flush=True)
        d = datasets.load_dataset("fashionmnist", source)
        order = np.concatenate([np.arange(n), np.tile(chosen, k - 1)])  # originals first: train_x[:n] are they
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        # The file names datasets._fashionmnist reads; [:, 0, 2:-2, 2:-2] undoes its padding to 32 px and 3 channels.
        for stem, array in {"train-images-idx3-ubyte": d.train_x[:n, 0, 2:-2, 2:-2].numpy()[order],
                            "train-labels-idx1-ubyte": d.train_y[:n].numpy()[order],
                            "t10k-images-idx3-ubyte": d.test_x[:n, 0, 2:-2, 2:-2].numpy(),
                            "t10k-labels-idx1-ubyte": d.test_y[:n].numpy()}.items():
            write_idx(os.path.join(tmp, stem + ".gz"), array)
        with open(os.path.join(tmp, "familiarity.json"), "w") as fh:
            json.dump(info, fh)
        shutil.rmtree(folder, ignore_errors=True)  # a set built from other constants
        os.replace(tmp, folder)
    return info


def familiarity(checkpoint, folder, info):
    """Norms of the originals (each once, unaugmented) per space: repeated vs the others. AUROC > 0.5 and a
    relative norm > 1 are the paper's direction: the images seen more often get the larger norms."""
    import torch
    import common
    import datasets
    import eval_knn
    model, ckpt = eval_knn.load_model(checkpoint)
    mean, std = ckpt["data_stats"]
    x = datasets.load_dataset("fashionmnist", folder).train_x[: info["images"]]  # (n, 3, 32, 32), the originals
    rep = torch.zeros(len(x), dtype=torch.bool)
    rep[info["repeated"]] = True
    loss_space = "predictor" if getattr(model, "predictor", None) is not None else "projector"  # as eval_knn
    out = {}
    for space, where in (("loss", loss_space), ("backbone", "backbone")):
        norms = common.embed(model, x, mean, std, where).norm(dim=1)  # (n,)
        out[space] = {"relative": (norms[rep].mean() / norms[~rep].mean()).item(),
                      "auroc": eval_knn.auroc(norms[rep], norms[~rep]),
                      "mean_repeated": norms[rep].mean().item(), "mean_others": norms[~rep].mean().item()}
    return out


# ----------------------------------------------------------------------------- one run

def rel(path):  # paths under the repository as a user types them there (the runs' cwd)
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path


def run_one(name, seed, a):
    """Train (or finish training) one run, evaluate it, and return its row."""
    runs = os.path.join(a.out, "laptop", "familiarity")
    folder = os.path.join(runs, f"{name}-s{seed}")
    data, info = [], None
    if name in REPEATS:
        built = os.path.join(runs, "data", f"rep-k{REPEATS[name]}-s{seed}")
        info = build_repeated(a.data_dir, built, a.images, REPEATS[name], seed)
        data = ["--subset", "0", "--data-dir", rel(built)]  # --subset 0: every image of the folder
    elif os.path.abspath(a.data_dir) != SOURCE:
        data = ["--data-dir", rel(a.data_dir)]
    flags = [SCRIPT, "--preset", "laptop", *GRID[name], "--seed", str(seed), *data,
             *(["--epochs", str(a.epochs)] if a.epochs else []), *shlex.split(a.extra), "--out", rel(folder)]
    command, minutes = train(flags, folder, a.threads)
    ckpt, report = os.path.join(folder, "last.pt"), os.path.join(folder, "eval.json")
    evaluate = ["eval_knn.py", rel(ckpt), *EVAL, "--json", rel(report)]
    t0 = time.time()
    subprocess.run([sys.executable, *evaluate], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)},
                   check=True, stdout=subprocess.DEVNULL)
    import safety  # here, not at the top: --table needs no torch
    import torch
    torch.set_num_threads(a.threads)
    lines, _ = safety.read_jsonl(os.path.join(folder, "metrics.jsonl"))
    e = json.load(open(report))
    knn = [line.get("knn_top1") for line in lines]  # None where --knn-every skipped an epoch
    evaluated = f"OMP_NUM_THREADS={a.threads} python {shlex.join(evaluate)}"
    row = {"name": name, "seed": seed, "commands": [command, evaluated],
           "epochs": len(lines), "knn_top1": knn[-1], "knn_per_epoch": knn,
           "epochs_to_target": next((i + 1 for i, v in enumerate(knn) if v is not None and v >= KNN_TARGET), None),
           "emb_norm": lines[-1]["emb_norm_mean"],
           "norm_per_epoch": [round(line["emb_norm_mean"], 4) for line in lines],
           "test_train_ratio": e["norms"]["test"]["mean"] / e["norms"]["train"]["mean"],
           "spearman_norm_accuracy": e["analyses"]["buckets"]["spearman"],
           "spearman_count_norm": e["analyses"]["classes"]["spearman"],  # None on a balanced set
           "novelty": {k: {"relative": v["relative"], "auroc": v["auroc"]}
                       for k, v in e["analyses"]["novelty"]["sets"].items() if k not in ("train", "test")}}
    if info:
        row["familiarity"] = familiarity(ckpt, built, info)
        row["data"] = {k: v for k, v in info.items() if k != "repeated"}
    # minutes: this call's wall time, training and evaluation (the rest only, for a resumed run);
    # train_minutes: the epochs' own time from metrics.jsonl, whatever interrupted them.
    return {**row, "minutes": round(minutes + (time.time() - t0) / 60, 2),
            "train_minutes": round(sum(line["epoch_seconds"] for line in lines) / 60, 2),
            "cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__}


# ----------------------------------------------------------------------------- claims

def by_seed(rows, name, get):
    """{seed: get(row)} over the runs of one grid row; a seed whose number is missing (None, or a row written
    before that number was recorded) is left out."""
    out = {}
    for r in (r for r in rows if r["name"] == name):
        try:
            if (v := get(r)) is not None:
                out[r["seed"]] = v
        except KeyError:
            pass
    return out


def paired(a, b):  # per seed, a - b: the seed's own control removes what the seed shares with it
    return {s: a[s] - b[s] for s in sorted(a) if s in b}


def stat(per_seed):
    """mean, std (sample, n - 1) and the values of {seed: value}; None where there are none."""
    v = list(per_seed.values())
    return {"mean": statistics.mean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else None,
            "per_seed": {str(s): round(x, 4) for s, x in sorted(per_seed.items())}}


def text(s):
    if s["mean"] is None:
        return "no runs yet"
    spread = "" if s["std"] is None else f" ± {s['std']:.3g}"
    return f"{s['mean']:.3g}{spread} (seeds {', '.join(f'{k}: {v:.3g}' for k, v in s['per_seed'].items())})"


def verdict(per_seed):
    """The rule of issue 29. Every effect is signed so that > 0 is the paper's direction: 'shown' needs it > 0 in
    every seed and a mean beyond 2 x the seed std; fewer than MIN_SEEDS seeds show nothing yet."""
    if len(per_seed) < MIN_SEEDS:
        return "not shown", f"{len(per_seed)} seed(s) so far; the rule needs {MIN_SEEDS}"
    m, sd = statistics.mean(per_seed.values()), statistics.stdev(per_seed.values())
    if against := [str(s) for s, v in sorted(per_seed.items()) if v <= 0]:
        return "not shown", f"seed(s) {', '.join(against)} against the paper's direction"
    if m <= 2 * sd:
        return "not shown", f"mean {m:.3g} within 2 x the seed std ({sd:.3g})"
    return "shown", f"> 0 in all {len(per_seed)} seeds, mean {m:.3g} > 2 x std {sd:.3g}"


def claims(rows):
    """The four claims, each from the rows present: (claim, paper's setting, rows, effect, per seed, also)."""
    fam = lambda k, space, key: by_seed(rows, f"rep-k{k}", lambda r: r["familiarity"][space][key])
    nov = lambda name, s, key: by_seed(rows, name, lambda r: r["novelty"].get(s, {}).get(key))
    knn = lambda name: by_seed(rows, name, lambda r: r["knn_top1"])
    held, flip = nov("base", "unseen classes", "auroc"), nov("base", "vflip", "auroc")
    spec = [
        ("frequency", "Images seen more often get larger embedding norms (Sec. 4.2 and its takeaway; Cor. 3.3).",
         "a simulation only: 4 latent classes, a 2-layer network, class imbalance (Fig. 2(c))",
         ["rep-k1", "rep-k16"], "relative norm of the repeated images at k = 16 minus at k = 1 (the same images "
         "seen once), loss space", paired(fam(16, "loss", "relative"), fam(1, "loss", "relative")),
         {**{f"{key} k={k} {space}": stat(fam(k, space, key)) for key in ("relative", "auroc") for space in
             ("loss", "backbone") for k in REPEATS.values()},
          "long tail: Spearman(class count, mean norm) (content and frequency change together)":
              stat(by_seed(rows, "lt", lambda r: r["spearman_count_norm"]))}),
        # eval_knn's AUROC is that of the norm telling test images from the set: > 0.5 when the set's are smaller.
        # Fig. 3 says every unseen set gets smaller norms, so the effect is the weaker of the two natural ones.
        ("novelty", "Embedding norms shrink with distance from the training data: the test set slightly, "
         "unseen data much more (Sec. 5, Fig. 3).", "SimCLR and SimSiam, ResNet-50, CIFAR-10 vs CIFAR-100, 512 epochs",
         ["base"], "AUROC of the norm telling test images from held-out classes 8, 9 or from upside-down test "
         "images (vflip), the smaller of the two, minus 0.5",
         {s: min(v, flip[s]) - 0.5 for s, v in held.items() if s in flip},
         {"test / train mean norm (paper: slightly below 1)":
              stat(by_seed(rows, "base", lambda r: r["test_train_ratio"])),
          **{f"{s} {key}": stat(nov("base", s, key)) for s in ("vflip", "noise") for key in ("relative", "auroc")},
          # Not used for the verdict: eval_knn's Gaussian noise has the data's mean and std but 4.5x the mean
          # squared neighbour-pixel difference (edge energy) of the normalized training images (1.21 against 0.27,
          # first 1,000), and colour on grey data; its norm measures the filters' response to that. The paper's
          # far set is natural images (Fig. 3: CIFAR-100).
          "noise: not used for the verdict": "unnatural: 4.5x the edge energy of the training images",
          **{f"unseen classes AUROC, {n}": stat(nov(n, "unseen classes", "auroc")) for n in ("passes", "width32")}}),
        ("norm-accuracy", "The k-NN accuracy rises monotonically with the embedding norm (Sec. 5, Fig. 4 left).",
         "SimCLR and SimSiam, ResNet-50, CIFAR-10/100 and ImageNet-100, 512 epochs", ["base"],
         "Spearman(test-norm bucket, k-NN accuracy), 20 buckets of norm / max norm, loss space",
         by_seed(rows, "base", lambda r: r["spearman_norm_accuracy"]),
         {f"Spearman, {n}": stat(by_seed(rows, n, lambda r: r["spearman_norm_accuracy"]))
          for n in GRID if n != "base"}),
        ("gradscale", "GradScale (power 1) cancels the norm's slow-down and raises SimCLR's k-NN accuracy "
         "(Sec. 6, Table 4).", "ResNet-50, CIFAR-10/100, ImageNet-100, Tiny-ImageNet; 100 warmup epochs",
         ["p1", "lr0.05"], "final k-NN top-1 (%) of p1 minus lr0.05 (same lr, same warmup)",
         paired(knn("p1"), knn("lr0.05")),
         {**{f"k-NN top-1, {n}": stat(knn(n)) for n in ("p1", "lr0.05", "lr0.08")},
          **{f"epochs to {KNN_TARGET:g} % k-NN, {n} (the seeds that reach it)":
                 stat(by_seed(rows, n, lambda r: r["epochs_to_target"])) for n in ("p1", "lr0.05", "lr0.08")}}),
        ("gradscale-step", "GradScale's gain is more than a larger step: p1 beats plain SimCLR at the lr of p1's "
         "mean step (a control added here).", "no such control in the paper", ["p1", "lr0.08"],
         "final k-NN top-1 (%) of p1 minus lr0.08 (0.05 x p1's mean norm of about 1.6)",
         paired(knn("p1"), knn("lr0.08")), {"k-NN top-1, lr0.08": stat(knn("lr0.08"))}),
    ]
    out = []
    for key, claim, paper, names, effect, per_seed, also in spec:
        v, why = verdict(per_seed)
        first = [min((r for r in rows if r["name"] == n), key=lambda r: r["seed"], default=None) for n in names]
        out.append({"key": key, "claim": claim, "paper_setting": paper, "verdict": v,
                    "evidence": {"effect": effect, **stat(per_seed), "seeds": len(per_seed), "why": why,
                                 "rows": names, "summary": text(stat(per_seed)), "also": also},
                    "grid_command": f"python benchmarks/familiarity.py --only {','.join(names)}",
                    "commands": [c for r in first if r for c in r["commands"]]})  # the lowest seed's
    return out


def update_claims(path):
    """Recompute the claims from the json's rows under the rows' lock, so side-by-side workers agree."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = load(path)
        result["claims"] = claims(result["rows"])
        save(result, path)
    return result


TABLE_2 = "ResNet-50, CIFAR-100 and ImageNet-100, 100 epochs"


def first_claims(rows):
    """The paper's first claim on the laptop, from results/laptop.json (benchmarks/laptop.py), under the same
    3-seed rule: (claim, rows, effect, per seed, the paper's setting). Each effect is > 0 in the paper's direction."""
    knn = lambda n: by_seed(rows, n, lambda r: r["knn_top1"])
    norm = lambda n: by_seed(rows, n, lambda r: r["emb_norm"])
    growth = lambda n: by_seed(rows, n, lambda r: r["norm_per_epoch"][-1] / r["norm_per_epoch"][0] - 1)
    return [
        ("The embedding norm grows during training (Sec. 3, Cor. 3.3).", ["simclr-c1"],
         "final norm / norm after epoch 1, minus 1, SimCLR", growth("simclr-c1"), "ResNet-50, CIFAR (App. C.1)"),
        ("Weight decay keeps the norm small (Sec. 6, Fig. 5).", ["simclr-c1", "simclr-wd5e-4"],
         "1 - final norm at --wd 5e-4 / at --wd 1e-6 (SimCLR's default)",
         {s: 1 - v / norm("simclr-c1")[s] for s, v in norm("simclr-wd5e-4").items() if s in norm("simclr-c1")},
         "SimCLR and SimSiam, ResNet-50 (App. C.1)"),
        ("Cut-initialization helps SimSiam most (Sec. 6, Table 2).", ["simsiam-c1", "simsiam-c3"],
         "k-NN top-1 (%) with --cut 3 minus without", paired(knn("simsiam-c3"), knn("simsiam-c1")), TABLE_2),
        ("Cut-initialization helps SimCLR a little (Sec. 6, Table 2).", ["simclr-c1", "simclr-c3"],
         "k-NN top-1 (%) with --cut 3 minus without", paired(knn("simclr-c3"), knn("simclr-c1")),
         TABLE_2 + ": 1-2 points at SimCLR's default weight decay"),
    ]


def table(result, laptop=None):
    """The README's table: the first claim's rows from laptop.json (if given), then this grid's claims."""
    out = ["| claim | verdict | evidence | command |", "| --- | --- | --- | --- |"]
    paper = lambda v, setting: f"; the paper saw it with {setting}" if v != "shown" else ""
    for claim, names, effect, per_seed, setting in first_claims((laptop or {"rows": []})["rows"]):
        v, why = verdict(per_seed)
        out.append(f"| {claim} | {v} | {effect}: {text(stat(per_seed))}; {why}{paper(v, setting)} | "
                   f"`python benchmarks/laptop.py --only {','.join(names)}` |")
    for c in result.get("claims", []):
        e = c["evidence"]
        out.append(f"| {c['claim']} | {c['verdict']} | {e['effect']}: {e['summary']}; {e['why']}"
                   f"{paper(c['verdict'], c['paper_setting'])} | `{c['grid_command']}` |")
    return "\n".join(out)


def figure(rows, path):
    """Three panels, one per claim of the grid that a plot shows best, each titled with the claim's effect:
    frequency (relative norm against k), novelty (AUROC per row and set), GradScale (k-NN per epoch)."""
    if (plt := pyplot()) is None:
        return None
    effect = {c["key"]: c["evidence"] for c in claims(rows)}
    headline = lambda key, unit="": (f"{effect[key]['mean']:+.3g} ± {effect[key]['std'] or 0:.2g}{unit} "
                                     f"({effect[key]['seeds']} seeds)" if effect[key]["seeds"] else "no runs yet")
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 5))
    for i, seed in enumerate(sorted({r["seed"] for r in rows if r["name"] in REPEATS})):
        done = [(k, r) for n, k in REPEATS.items() for r in rows if r["name"] == n and r["seed"] == seed]
        for space, style, marker in (("loss", "-", "o"), ("backbone", "--", "s")):
            left.plot([k for k, _ in done], [r["familiarity"][space]["relative"] for _, r in done], style,
                      marker=marker, color=f"C{i}", label=f"seed {seed}, {space}")
    sizes = next((r["data"] for r in rows if r["name"] in REPEATS), None)
    n = f"; {round(sizes['fraction'] * sizes['images']):,} repeated of {sizes['images']:,} images" if sizes else ""
    left.axhline(1, color="grey", lw=0.8)
    left.set_xscale("log", base=2)
    left.set_xticks(list(REPEATS.values()), [str(k) for k in REPEATS.values()])
    left.set(xlabel="copies of each repeated image in the training set, k (count)",
             ylabel="mean norm, repeated / other images (ratio)",
             title=f"Frequency alone{n}.\nRelative norm at k = 16 minus at k = 1,\nloss space: {headline('frequency')}")
    left.legend(fontsize=7)
    names = [n for n in ("base", "passes", "width32") if any(r["name"] == n for r in rows)]
    for j, (shift, label) in enumerate(((-0.1, "unseen classes"), (0.1, "vflip"))):
        for i, name in enumerate(names):
            ys = list(by_seed(rows, name, lambda r: r["novelty"][label]["auroc"]).values())
            middle.scatter([i + shift] * len(ys), ys, color=f"C{j}", label=label if i == 0 else None)
    middle.axhline(0.5, color="grey", lw=0.8)
    middle.set_xticks(range(len(names)), names)
    middle.set(xlabel="grid row (one point per seed)", ylabel="AUROC of the norm, test images vs the set",
               title=f"Novelty (Fig. 3): AUROC > 0.5 where\nthe set's norms are smaller. The smaller AUROC\n"
                     f"minus 0.5, base: {headline('novelty')}")
    middle.legend(fontsize=7, title="set (held out: classes 8, 9)", title_fontsize=7)
    for j, name in enumerate(("p1", "lr0.05", "lr0.08")):
        for i, r in enumerate(r for r in rows if r["name"] == name):
            label = f"{name} ({'--power 1, lr 0.05' if name == 'p1' else 'no GradScale'})" if i == 0 else None
            right.plot(range(1, len(r["knn_per_epoch"]) + 1), r["knn_per_epoch"], color=f"C{j}", marker=".",
                       lw=1, label=label)
    right.axhline(KNN_TARGET, color="grey", lw=0.8)
    right.set(xlabel="epoch", ylabel="k-NN top-1 on the test set (%)",
              title=f"GradScale (Sec. 6), one line per seed. Final k-NN,\np1 minus lr0.05: "
                    f"{headline('gradscale', ' points')}\np1 minus lr0.08: {headline('gradscale-step', ' points')}")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main

def main(argv=None):
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "laptop-familiarity.json")
    if a.claims or a.table or a.figure:  # reports from the json only: nothing trains
        if not load(path)["rows"]:
            sys.exit(f"{path} holds no runs yet; run python benchmarks/familiarity.py first")
        result = update_claims(path) if a.claims else load(path)
        if a.claims:
            for c in result["claims"]:
                print(f"{c['key']}: {c['verdict']} ({c['evidence']['why']}); {c['evidence']['effect']}: "
                      f"{c['evidence']['summary']}")
        if a.table:
            print(table(result, load(os.path.join(a.out, "laptop.json"))))
        if a.figure:
            print(f"wrote {figure(result['rows'], a.figure)}")
        return result
    locks = os.path.join(a.out, "laptop", "familiarity")
    os.makedirs(locks, exist_ok=True)
    failed, t0, result = [], time.time(), load(path)
    todo = [(n, int(s)) for s in a.seeds.split(",") for n in a.only.split(",")]
    left = [t for t in todo if t not in {(r["name"], r["seed"]) for r in result["rows"]}]
    print(f"familiarity grid: {len(left)} of {len(todo)} runs left, {a.threads} thread(s) each, into {rel(path)}; "
          f"run folders under {rel(locks)}", flush=True)
    for name, seed in todo:  # seed by seed: a partial grid covers every claim early
        with open(os.path.join(locks, f"{name}-s{seed}.lock"), "w") as lock:
            try:  # another worker holds this run: leave it to that one
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if any((r["name"], r["seed"]) == (name, seed) for r in load(path)["rows"]):
                continue  # read again: finished before this call, or by the other worker meanwhile
            try:
                add_row(run_one(name, seed, a), path, GRID)
            except subprocess.CalledProcessError as e:  # one broken run does not stop the others
                failed.append(f"{name} seed {seed} (exit status {e.returncode})")
                print(f"{name} seed {seed} failed; the grid goes on", file=sys.stderr, flush=True)
                continue
            result = update_claims(path)
            print(f"wrote {path} ({len(result['rows'])} rows)", flush=True)
    result = update_claims(path)
    print(table(result))
    print(f"grid time this call {(time.time() - t0) / 60:.1f} min; wrote {path}\n"
          f"next: python benchmarks/familiarity.py --figure {rel(os.path.join(a.out, 'laptop-familiarity.png'))}")
    if failed:
        sys.exit(f"failed: {'; '.join(failed)}; fix the cause and run the same command again to finish them")
    return result


if __name__ == "__main__":
    main()
