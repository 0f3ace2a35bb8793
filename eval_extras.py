"""What eval_knn.py needs besides the analyses, kept apart as CleanRL keeps cleanrl_utils: the human-label
file readers, the tables, --compare and the figures (matplotlib is optional: without it, no figures)."""
import importlib.util
import json
import math
import os
import pathlib
import pickle
import re
import sys
import textwrap

import numpy as np
import torch

import safety

# ----------------------------------------------------------------------------- human labels
# CIFAR-N (Wei et al. 2021) relabelled every CIFAR training image by hand (10N's aggre_label: a majority of three,
# 100N's noisy_label: one person's); CIFAR-10H (Peterson et al. 2019) has ~50 per test image. All in published order.

HUMAN_FILES = {"cifar10": (("CIFAR-10_human.pt", "github.com/UCSC-REAL/cifar-10-100n"),  # file, where published
                            ("cifar10h-probs.npy", "github.com/jcpeterson/cifar-10h")),  # (in its data/ folder)
               "cifar100": (("CIFAR-100_human.pt", "github.com/UCSC-REAL/cifar-10-100n"),)}
HUMAN_LABEL = {"cifar10": "aggre_label", "cifar100": "noisy_label"}  # as the paper's notebook reads them


def check_human_run(run, excluded, folder):
    dataset = run["dataset"]
    if dataset not in HUMAN_FILES:
        raise safety.UsageError(f"--analyses human needs a cifar10 or cifar100 run (human labels exist only for "
                                f"those), but this one trained on {dataset}; drop human from --analyses")
    if run.get("subset") or excluded:
        flag = f"--subset {run['subset']}" if run.get("subset") else "--exclude-classes"
        raise safety.UsageError(f"--analyses human needs the full {dataset} training set in its published order, "
                                f"but this run trained with {flag}; evaluate a run trained on all of {dataset}")
    human_paths(dataset, folder)


def human_paths(dataset, folder):
    for name, repo in HUMAN_FILES[dataset]:
        if not os.path.isfile(os.path.join(folder, name)):
            raise safety.UsageError(f"{name} not found in {folder}; download it from {repo} (its data/ folder) "
                                    f"into {folder}, or point --human-dir at the folder that holds it")
    return [os.path.join(folder, name) for name, _ in HUMAN_FILES[dataset]]


def load_human_labels(path):
    """A CIFAR-10N / 100N file: a torch.save'd dict of int64 numpy arrays (100N adds lists), loaded
    with weights_only=True plus only the numpy names such an array needs: nothing in the file runs."""
    rebuild = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, under numpy 1's name (published files) and 2's
    allowed = [(rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct"),
               np.ndarray, np.dtype, type(np.dtype(np.int64))]  # the last: numpy.dtypes.Int64DType
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([^']+)'>", str(e))  # what torch refused
        raise safety.UsageError(f"{path} holds pickled objects other than integer label arrays"
                                f"{f' ({found.group(1) or found.group(2)})' if found else ''}; refusing to load it: "
                                "download the published file again")
    except Exception:
        raise safety.UsageError(f"{path} is not a readable torch file (truncated or corrupt?); download it again")
    if not isinstance(obj, dict):
        raise safety.UsageError(f"{path} holds a {type(obj).__name__}, not the dict of label arrays CIFAR-N publishes; "
                                "download it again")
    return obj


def label_array(obj, key, path, n):
    v = obj.get(key)
    if not isinstance(v, np.ndarray) or v.ndim != 1 or v.dtype.kind not in "iu" or len(v) != n:
        found = f"{v.dtype} array of shape {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
        raise safety.UsageError(f"{path} should hold '{key}', {n} integer labels, but has {found}; "
                                "is it the file for this dataset?")
    return torch.from_numpy(v.astype(np.int64))


def load_human_probs(path, n, num_classes=10):
    """CIFAR-10H: (n, 10) floats, a label distribution per test image (allow_pickle=False: no objects)."""
    try:
        p = np.load(path, allow_pickle=False)
    except Exception:
        raise safety.UsageError(f"{path} is not a plain .npy array (truncated, or pickled objects?); download it again")
    if p.shape != (n, num_classes) or p.dtype.kind != "f":
        raise safety.UsageError(f"{path} should hold {n} x {num_classes} floats (one label distribution per test "
                                f"image), but has {p.dtype} of shape {p.shape}; download it again")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-6):
        raise safety.UsageError(f"the rows of {path} are not probability distributions; download it again")
    return torch.from_numpy(p.astype(np.float64))


def read_human(dataset, folder, train_y, test_y):
    """((path, human, clean) of CIFAR-N, (path, probs) of CIFAR-10H or None), checked to be in run order."""
    paths = human_paths(dataset, folder)
    obj = load_human_labels(paths[0])
    clean = label_array(obj, "clean_label", paths[0], len(train_y))
    human = label_array(obj, HUMAN_LABEL[dataset], paths[0], len(train_y))
    if not torch.equal(clean, train_y):
        raise safety.UsageError(f"clean_label in {paths[0]} is not the {dataset} training labels in order ("
                                f"{(clean != train_y).float().mean():.1%} differ); is it the file for this dataset?")
    if len(human) and not 0 <= human.min() <= human.max() <= clean.max():
        raise safety.UsageError(f"'{HUMAN_LABEL[dataset]}' in {paths[0]} has labels of no {dataset} class; "
                                "download it again")
    if dataset != "cifar10":
        return (paths[0], human, clean), None
    probs = load_human_probs(paths[1], len(test_y))
    agree = (probs.argmax(1) == test_y).double().mean().item()
    if agree < 0.5:  # humans get ~95% of CIFAR-10 right; a shuffled file gets ~10%
        raise safety.UsageError(f"the majority human label of {paths[1]} matches only {agree:.0%} of the cifar10 "
                                "test labels; the file is not in CIFAR-10 test order, download it again")
    return (paths[0], human, clean), (paths[1], probs)


# ----------------------------------------------------------------------------- outputs and tables

def check_outputs(a):
    """Refuse, before any work, an output that would overwrite a checkpoint or a run's own file or cannot be written."""
    for flag, path in [(f, p) for f, p in (("--json", a.json), ("--prototypes-out", a.prototypes_out)) if p]:
        real = os.path.realpath(path)  # a link is judged by what it leads to; a file named as a run's own is one
        if real.endswith(".pt") or os.path.basename(real) in ("metrics.jsonl", "args.json", "lock"):
            raise safety.UsageError(f"{flag} {path} would overwrite {real}, a run's own file; choose another path")
        if os.path.isdir(real):
            raise safety.UsageError(f"{flag} {path} is a folder; give a file name")
        if flag == "--prototypes-out" and not path.lower().endswith(".png"):
            raise safety.UsageError(f"--prototypes-out {path}: the grid is saved as a PNG, so name it *.png")
        folder = os.path.dirname(real)
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise safety.UsageError(f"{flag} {path}: cannot write into {folder} (not a writable folder); pick another")
    if a.figures and os.path.isfile(a.figures):
        raise safety.UsageError(f"--figures {a.figures} is a file; give a folder for the PNGs")


def fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(title, columns, rows, foot=None):
    """Print title, header, rows and foot; columns: (header, width (< 0: align left), format spec)."""
    def line(cells):
        return " ".join(f"{c:{'<' if w < 0 else '>'}{abs(w)}}" for c, (_, w, _) in zip(cells, columns))
    body = [line(fmt(v, spec) for v, (_, _, spec) in zip(row, columns)) for row in rows]
    print("\n".join(filter(None, [title, line(h for h, _, _ in columns), *body, foot])))


LINES = {  # the analyses that print one line instead of a table
    "prototypes": "\nprototypes ({space} features): {png}; a row per class, the 10 largest train norms on the left, "
                  "the 10 smallest on the right",
    "probe": "\nlinear probe ({space} features, {epochs} epochs of Adam): top-1 = {top1:.2f}% "
             "(train {train_top1:.2f}%)"}


def report(name, r):
    """Print one result of eval_knn.evaluate: for "knn" the whole result, else the analysis' entry."""
    def rho(r, what, per_image=False):  # 'Spearman(what) = 0.912', or '-' and why it is undefined
        return (f"Spearman({what}) = {fmt(r['spearman'], '.3f')}" + (f"  ({r['note']})" if r.get("note") else "")
                + (f"; per image: {fmt(r['spearman_images'], '.3f')}" if per_image else ""))

    def bins(title, r, key, column, foot, scale=1.0):  # a table of eval_knn.binned's bins
        table(title, [("norm bin", 11, ""), ("images", 7, ""), column], [(f"{b['lo']:>5.2f}-{b['hi']:<5.2f}",
              b["count"], None if b[key] is None else scale * b[key]) for b in r["bins"]], foot)
    s = r["space"]
    if name in LINES:
        print(LINES[name].format(**r))
    elif name == "knn":
        table(f"{r['method']} epoch {r['epoch']} on {r['dataset']}: weighted {r['k']}-NN top-1 = "
              f"{r['knn_top1']:.2f}% ({s} features)", [("split", -6, ""), ("mean norm", 10, ".4f"), ("std", 10, ".4f")],
              [(split, n["mean"], n["std"]) for split, n in r["norms"].items()])
        table(None, [("class", 5, ""), ("train n", 8, ""), ("train norm", 11, ".4f"), ("test norm", 10, ".4f")],
              [(a["class"], a["count"], a["mean"], b["mean"])
               for a, b in zip(r["norms"]["train"]["per_class"], r["norms"]["test"]["per_class"])])
    elif name == "buckets":
        bins(f"\nnorm vs k-NN accuracy ({s} features; test norm / max test norm, {len(r['bins'])} bins)", r,
             "accuracy", ("k-NN top-1", 10, ".2f"), rho(r, "norm bin, accuracy"))
    elif name == "novelty":
        table(f"\nnovelty ({s} features): mean norm relative to the train mean; AUROC of the norm telling test "
              f"images (positives) from each set", [("set", -16, ""), ("images", 7, ""), ("mean norm", 10, ".4f"),
                                                    ("relative", 9, ".3f"), ("AUROC", 7, ".3f")],
              [(k, v["count"], v["mean_norm"], v["relative"], v["auroc"]) for k, v in r["sets"].items()])
    elif name == "classes":
        table(f"\nnorm per class ({s} features, train set)", [("class", 5, ""), ("images", 7, ""),
                                                               ("mean norm", 10, ".4f")],
              [(c["class"], c["count"], c["mean_norm"]) for c in r["classes"]], rho(r, "class frequency, mean norm"))
    elif name == "human":
        p, e = r["labels"], r.get("entropy")
        bins(f"\nhuman labels vs norm ({s} features; norm / max norm, {len(p['bins'])} bins)\n{p['file']}: "
             f"{p['human_label']} equals clean_label for {p['fraction_correct']:.2%} of the {p['images']} train "
             f"images; bins of < {p['min_count']} images are left out", p, "fraction_correct",
             ("correct (%)", 11, ".2f"), rho(p, "norm bin, correct", True), 100)
        if e:
            bins(f"\n{e['file']}: mean entropy of the human labels {e['mean_entropy']:.3f} bits over the "
                 f"{e['images']} test images; bins of < {e['min_count']} images are left out", e, "mean_entropy",
                 ("entropy (bits)", 14, ".3f"), rho(e, "norm bin, entropy", True))


# ----------------------------------------------------------------------------- --compare: training curves

CURVES = {"loss": ("training loss", "loss (mean over the epoch's steps)"),  # metrics.jsonl key -> title, y label
          "emb_norm_mean": ("embedding norm where the loss sees it", "mean ||z|| (L2 norm)"),
          "feat_norm_mean": ("backbone feature norm", "mean ||h|| (L2 norm)"),
          "knn_top1": ("k-NN top-1 on the test set", "top-1 accuracy (%)")}


def read_metrics(path):
    """A run's metrics.jsonl, a row per epoch (of one logged twice by a resume, the later); damaged lines skipped."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise safety.UsageError(f"{path} has no metrics.jsonl; pass a run folder that has trained at least one epoch")
    lines, damaged = safety.read_jsonl(file, shown="epochs", valid=lambda row: type(row.get("epoch")) is int and all(
        type(row.get(k)) in (int, float, type(None)) for k in CURVES))  # a number (or null) for each curve
    if not lines:
        raise safety.UsageError(f"{file} is empty; the run has not finished an epoch yet" if not damaged else
                                f"{file} has no readable metrics line ({len(damaged)} damaged); the file is damaged")
    return sorted({row["epoch"]: row for row in lines}.values(), key=lambda row: row["epoch"])


def run_label(path):
    """'simclr cut 3 power 1 wd 5e-4' from a run's args.json, else its last.pt; None if neither reads."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for file, read in (("args.json", lambda f: json.loads(pathlib.Path(f).read_text())),
                       ("last.pt", safety.load_checkpoint)):
        try:
            saved = read(os.path.join(folder, file))
            method, args = saved["method"], dict(saved["args"])
        except (OSError, ValueError, KeyError, TypeError, safety.UsageError):
            continue
        g = {k: f"{args[k]:g}" if isinstance(args.get(k), (int, float)) else f"{d:g}"  # untrusted: else the default
             for k, d in (("cut", 1), ("power", 0), ("wd", 0))}
        return f"{method} cut {g['cut']} power {g['power']} wd {g['wd']}"
    return None


def compare(paths):
    """Print a table and a summary line per run; returns {"runs": {name: metrics}, "labels": {name: legend}}."""
    runs, settings = {}, {}
    for p in paths:  # all read before anything is printed: a bad one stops the command first
        base = os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))))
        name = next(n for n in [base] + [f"{base} ({i})" for i in range(2, len(paths) + 1)] if n not in runs)
        runs[name], settings[name] = read_metrics(p), run_label(p) or name
    for name, rows in runs.items():
        table(f"== {name}" + (f"  ({settings[name]})" if settings[name] != name else ""), [("epoch", 6, "")] + [
              (k, 14, ".4f") for k in CURVES], [[r["epoch"]] + [r.get(k) for k in CURVES] for r in rows])
    knn = {name: [r["knn_top1"] for r in rows if r.get("knn_top1") is not None] for name, rows in runs.items()}
    table(None, [("run", -max(map(len, runs)), ""), ("epochs", 6, ""), ("last loss", 10, ".4f"),
                 ("emb norm", 10, ".4f"), ("last k-NN", 10, ".2f"), ("best k-NN", 10, ".2f")],
          [(name, rows[-1]["epoch"], rows[-1].get("loss"), rows[-1].get("emb_norm_mean"), (knn[name] or [None])[-1],
            max(knn[name], default=None)) for name, rows in runs.items()])
    twice = {s for s in settings.values() if list(settings.values()).count(s) > 1}
    return {"runs": runs, "labels": {n: f"{s} [{n}]" if s in twice and s != n else s for n, s in settings.items()}}


# ----------------------------------------------------------------------------- figures
# Figures made without pyplot (no global state), saying what they show, units, counts, statistics.

def new_figure(ncols=1, width=5.0, height=3.9):  # its `ncols` axes, left to right, are fig.axes
    from matplotlib.figure import Figure  # optional: only draw_figures' callers get here
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    fig.subplots(1, ncols)
    return fig


def label(ax, xlabel, ylabel, *title, size=None, **settings):
    """Axis labels, ax.set(**settings), a title of the non-empty lines wrapped at 80 characters; returns the figure."""
    ax.set(**settings)
    ax.set_xlabel(xlabel, fontsize=size), ax.set_ylabel(ylabel, fontsize=size)
    ax.set_title("\n".join(textwrap.fill(line, 80) for line in title if line), fontsize=8)
    return ax.figure


def stat_text(r, what="Spearman rho"):
    return f"{what} = {r['spearman']:.3f}" if r.get("spearman") is not None else r.get("note", "Spearman undefined")


def bars(ax, bins, key, scale=1.0):
    """The bins (eval_knn.binned's) that have a value, as bars with their image counts on top; returns them."""
    kept = [b for b in bins if b[key] is not None]
    drawn = ax.bar([b["lo"] for b in kept], [scale * b[key] for b in kept], width=1 / len(bins),
                   align="edge", edgecolor="white")
    ax.bar_label(drawn, labels=[str(b["count"] or "") for b in kept], fontsize=6, rotation=90, padding=2)
    return kept


def figure_curves(runs, labels=None):
    fig = new_figure(len(CURVES), width=4.6)
    for ax, (key, (title, ylabel)) in zip(fig.axes, CURVES.items()):
        for name, rows in runs.items():
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            knn = [(r["knn_top1"], r["epoch"]) for r in rows if r.get("knn_top1") is not None]
            best = f": best k-NN {max(knn)[0]:.1f}% (epoch {max(knn)[1]})" if knn else ": no k-NN logged"
            if pts:
                ax.plot(*zip(*pts), marker=".", label=(labels or {}).get(name, name) + best)
        label(ax, "epoch (passes over the training set)", ylabel, title)
        ax.locator_params(axis="x", integer=True)  # epochs are whole numbers
    (fig.axes[-1] if fig.axes[-1].has_data() else fig.axes[0]).legend(fontsize=6)  # the k-NN panel unless it is empty
    fig.suptitle(f"training curves of {len(runs)} run{'s' * (len(runs) > 1)}, one point per logged epoch", fontsize=9)
    return fig


def figure_buckets(r, ctx=""):
    [ax] = new_figure().axes
    full = bars(ax, r["bins"], "accuracy")
    n = sum(b["count"] for b in full)
    top1 = sum(b["accuracy"] * b["count"] for b in full) / max(n, 1)
    return label(ax, "test embedding norm / max test norm (ratio)", "k-NN top-1 accuracy (%)",
                 f"k-NN top-1 per norm bin ({r['space']} features); numbers: test images per bin", ctx,
                 f"{stat_text(r)}; overall top-1 {top1:.1f}% of {n} images", xlim=(0, 1), ylim=(0, 118))


def figure_novelty(r, ctx=""):
    [ax] = new_figure().axes
    sets = r["sets"]
    ax.bar_label(ax.bar(range(len(sets)), [v["relative"] for v in sets.values()]), fontsize=6, padding=2,
                 labels=["" if v["auroc"] is None else f"AUROC {v['auroc']:.2f}" for v in sets.values()])
    ax.set_xticks(range(len(sets)), [f"{k}\nn={v['count']}" for k, v in sets.items()], fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    return label(ax, "image set (n: images)", "mean norm / train mean norm (ratio)",
                 f"mean embedding norm per image set ({r['space']} features)", ctx,
                 "AUROC: how well the norm tells test images from each set (0.5: not at all, 1: always)",
                 ylim=(0, 1.2 * max([v["relative"] for v in sets.values()] + [1.0])))


def figure_classes(r, ctx=""):
    [ax] = new_figure().axes
    ax.locator_params(axis="x", integer=True)  # image counts are whole numbers
    full = [c for c in r["classes"] if c["count"]]
    ax.scatter([c["count"] for c in full], [c["mean_norm"] for c in full], s=12)
    return label(ax, "training images in the class (count)", "mean train embedding norm (L2 norm)",
                 f"mean norm per class ({r['space']} features); {len(full)} classes, n = each point's x value", ctx,
                 stat_text(r, "Spearman rho (frequency, norm)"))


def figure_human(r, ctx=""):
    fig = new_figure(1 + ("entropy" in r))
    p, tail, space = r["labels"], "bins of >= {} images, numbers: images", f" ({r['space']} features)"
    bars(fig.axes[0], p["bins"], "fraction_correct", 100.0)
    label(fig.axes[0], "train embedding norm / max train norm (ratio)", "human label correct (%)",
          f"{'CIFAR-10N' if r['dataset'] == 'cifar10' else 'CIFAR-100N'}: is the human label ({p['human_label']}) "
          f"the clean one?{space}", ctx, f"{stat_text(p)}; {100 * p['fraction_correct']:.1f}% correct of "
          f"{p['images']} train images; {tail.format(p['min_count'])}", xlim=(0, 1), ylim=(0, 118))
    if "entropy" in r:
        p = r["entropy"]
        top = max([b["mean_entropy"] for b in bars(fig.axes[1], p["bins"], "mean_entropy")] + [0.1])
        label(fig.axes[1], "test embedding norm / max test norm (ratio)", "entropy of the human labels (bits)",
              f"CIFAR-10H: how much do the human labels disagree?{space}", ctx, f"{stat_text(p)}; mean "
              f"{p['mean_entropy']:.3f} bits over {p['images']} test images; {tail.format(p['min_count'])}",
              xlim=(0, 1), ylim=(0, 1.3 * top))
    return fig


def figure_prototypes(r, ctx=""):
    from matplotlib.image import imread
    img = imread(r["png"])  # the grid prototypes() saved: 2 px padding around every tile
    rows = len(r["indices"])
    [ax] = new_figure(width=7.0, height=min(1.4 + 6.4 * img.shape[0] / img.shape[1], 40)).axes
    ax.imshow(img)
    tile = (img.shape[0] - 2) / rows  # a tile and its padding
    ax.set_yticks([2 + tile * (c + 0.5) - 1 for c in range(rows)], [f"{c} (n={n})" for c, n in enumerate(r["counts"])],
                  fontsize=7 if rows <= 20 else 4)
    return label(ax, "<- the 10 largest norms | the 10 smallest norms -> (one tile per image)",
                 "class (n: its training images)", f"largest- and smallest-norm training images per class "
                 f"({r['space']} features)", ctx, size=8, xticks=[])


FIGURES = {"buckets": figure_buckets, "novelty": figure_novelty, "classes": figure_classes,
           "human": figure_human, "prototypes": figure_prototypes}


def draw_figures(result, folder):
    """Save and print a PNG of each figure `result` holds; None (nothing written) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("note: matplotlib is not installed, so no figures were drawn; the numbers are above "
              "(pip install matplotlib)", file=sys.stderr)
        return None
    figures = {"curves.png": figure_curves(result["runs"], result.get("labels"))} if "runs" in result else {}
    ctx = f"{result['method']} epoch {result['epoch']} on {result['dataset']}" if "method" in result else ""
    for name, r in result.get("analyses", {}).items():
        if name in FIGURES:  # where the prototypes grid itself was asked for as figs/prototypes.png, it stays
            grid = os.path.abspath(r.get("png", "")) == os.path.abspath(os.path.join(folder, f"{name}.png"))
            figures["prototypes-figure.png" if grid else f"{name}.png"] = FIGURES[name](r, ctx)
    os.makedirs(folder, exist_ok=True)
    for file, fig in figures.items():
        safety.write_atomic(os.path.join(folder, file), lambda fh: fig.savefig(fh, format="png", dpi=120), "wb")
        print(f"figure: {os.path.join(folder, file)}")
    return [os.path.join(folder, file) for file in figures]
