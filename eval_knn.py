"""Weighted k-NN evaluation and the embedding-norm analyses of "On the Importance of Embedding Norms in
Self-Supervised Learning" (Draganov et al., ICML 2025) for any checkpoint, or --compare: the training curves of runs.

k-NN as in the SimSiam / MoCo code (Wu et al. 2018): each test image's k=200 most cosine-similar train
images (unaugmented) vote with weight exp(sim / T), T=0.1. The paper's second claim is that an embedding's
norm encodes confidence; each analysis tests one facet (--analyses NAME[:SPACE],...; --all: knn to classes):

    knn         k-NN top-1 and mean norms per split and class (always run)
    buckets     k-NN accuracy per bin of test norm / max norm, Spearman(bin, accuracy) (Fig. 4, left)
    novelty     mean norm of shifted sets relative to the train mean, AUROC of the norm (Fig. 3)
    prototypes  per class, the 10 largest- and 10 smallest-norm train images as a PNG (Fig. S6)
    probe       linear classifier on frozen features: top-1 (Table S4)
    classes     mean train norm per class against class frequency (long-tailed data)
    human       per bin of norm, are CIFAR-10N/100N's human labels right, do CIFAR-10H's agree (Fig. 4)
    --compare   loss, norms and k-NN top-1 per epoch of several runs side by side (Fig. 5, S4)

    python eval_knn.py runs/<run>/last.pt --all --space loss --json out.json --figures figs
    python eval_knn.py runs/<run>/last.pt --analyses novelty,probe:backbone --ood fashionmnist:DIR

File readers, tables and figures (matplotlib, optional): eval_extras.py; every flag and output key: docs/evaluation.md.
"""
import functools
import importlib
import json
import math
import os
import warnings

import torch
import torch.nn.functional as F

import common
import datasets
import eval_extras
import safety
from common import embed, knn_predict

ANALYSES = ("knn", "buckets", "novelty", "prototypes", "probe", "classes", "human")
ALL = ANALYSES[:6]  # what --all runs: human needs downloaded files
SPACES = ("backbone", "projector", "predictor", "loss")
MIN_LABELS, MIN_ENTROPY = 50, 10  # human: smaller bins are left out, as in the authors' "Norm as Accuracy.ipynb"


def load_model(path, device="cpu"):
    """Rebuild a trained network from a checkpoint alone; returns (model, checkpoint). Nothing in the file is trusted:
    its method, fields and flags are checked before that script is imported, its weights against a meta-device build."""
    ckpt = safety.check_checkpoint(safety.load_checkpoint(path), path)
    module = importlib.import_module(ckpt["method"])  # the script that wrote it, e.g. simclr.py
    args = safety.check_args(ckpt["args"], module.Args, path)
    ckpt["args"] = {**ckpt["args"], **vars(args)}  # evaluate() reads the flags from here; fill in missing ones
    import torchvision  # noqa: F401 -- first imported inside the meta context below, it fails on torch 2.7
    with torch.device("meta"):  # no memory: a crafted 10^12-wide projector allocates nothing
        shapes = module.build_model(args, ckpt["img_size"])  # check_args has applied the typed flags' rules
    with warnings.catch_warnings(action="ignore"):  # torch warns that loading into meta tensors copies nothing
        safety.load_state(shapes, ckpt["model"], path, ckpt["method"])
    model = module.build_model(args, ckpt["img_size"])
    model.load_state_dict(ckpt["model"])  # strict, and known to fit
    return model.to(device), ckpt


# ----------------------------------------------------------------------------- rank statistics (torch: no scipy)

def ranks(x):
    """Ranks 1..n of the values of x; tied values share the average of their ranks."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten().cpu()
    order = x.argsort()
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each run of ties
    out = torch.empty_like(x)
    out[order] = (last - (counts - 1) / 2)[group]  # mean of the ranks last-count+1 .. last
    return out


def spearman(a, b):
    """The Pearson correlation of the tie-averaged ranks; nan under two points or if one side is constant."""
    ra, rb = ranks(a), ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman needs two sequences of one length, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    scale = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / scale if len(ra) > 1 and scale > 0 else float("nan")


def rank_correlation(x, y, x_name, y_name):  # x, y: lists
    rho = spearman(x, y)
    if not math.isnan(rho):
        return {"spearman": rho}
    why = (f"fewer than two {x_name} to rank" if len(x) < 2 else f"all {len(x)} {x_name} are equal ({x[0]:g})"
           if len(set(x)) == 1 else f"all {len(y)} {y_name} are equal ({y[0]:g})")
    return {"spearman": None, "note": f"Spearman undefined: {why}"}


def auroc(pos, neg):
    """The chance that a random positive outscores a random negative, ties half: Mann-Whitney U / (n_pos n_neg)."""
    pos, neg = (torch.as_tensor(v, dtype=torch.float64).flatten().cpu() for v in (pos, neg))
    if not len(pos) or not len(neg):
        return float("nan")
    u = ranks(torch.cat([pos, neg]))[: len(pos)].sum().item() - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


# ----------------------------------------------------------------------------- analyses

def norm_summary(feats, labels, num_classes):
    norms, labels = feats.norm(dim=1).cpu(), labels.cpu()
    groups = [norms[labels == c] for c in range(num_classes)]  # an empty class's mean is nan; std needs two
    return {"mean": norms.mean().item(), "std": norms.std().item(), "per_class": [
        {"class": c, "count": len(n), "mean": n.mean().item(), "std": n.std().item() if len(n) > 1 else float("nan")}
        for c, n in enumerate(groups)]}


def class_frequency(summary):
    """From the train set's norm_summary, each class's mean norm against its image count: if norms
    grow with familiarity, a long-tailed set's frequent classes get the larger ones (rho > 0)."""
    rows = [{"class": c["class"], "count": c["count"], "mean_norm": c["mean"] if c["count"] else None}
            for c in summary["per_class"]]
    counts = [r["count"] for r in rows if r["count"]]
    if len(set(counts)) == 1:
        return {"classes": rows, "spearman": None, "note": f"no class frequency to correlate with: all {len(counts)} "
                f"classes have {counts[0]} training images (a balanced set)"}
    means = [r["mean_norm"] for r in rows if r["count"]]
    return {"classes": rows, **rank_correlation(counts, means, "class counts", "mean norms")}


def binned(norms, values, key, bins=20, min_count=1, y_name="means"):
    """Norms / max norm in `bins` equal bins of [0, 1] (Fig. 4): per bin its range, size and the mean of `values`
    as `key` (None under min_count images, as the paper leaves them out), and Spearman(bin, mean) over the rest."""
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten().cpu()
    values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    idx = (norms / norms.max().clamp_min(1e-12) * bins).long().clamp(0, bins - 1)
    groups = [values[idx == i] for i in range(bins)]
    rows = [{"lo": i / bins, "hi": (i + 1) / bins, "count": len(v),
             key: v.mean().item() if len(v) >= max(min_count, 1) else None} for i, v in enumerate(groups)]
    kept = [r for r in rows if r[key] is not None]
    x_name = "non-empty norm bins" if min_count <= 1 else f"norm bins of >= {min_count} images"
    return {"bins": rows, **rank_correlation([r["lo"] for r in kept], [r[key] for r in kept], x_name, y_name)}


def shift_images(x, kind, mean, std, seed=0):
    """Unfamiliar images that need no other data set: uint8 x upside down ('vflip', same pixels) or Gaussian 'noise'."""
    if kind == "vflip":
        return x.flip(-2)
    g = torch.Generator().manual_seed(seed)
    img = torch.tensor(mean).view(1, 3, 1, 1) + torch.tensor(std).view(1, 3, 1, 1) * torch.randn(x.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).to(x.device)


def resize(x, size):  # uint8 images (N, 3, H, W), antialiased as PIL resizes
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def novelty(train_norms, test_norms, shifted, reference=None):
    """Fig. 3: for train, test and each set in `shifted` (name -> norms), the mean norm over the train mean, and
    the AUROC of the norm telling the test images (or reference[name]) from it; > 0.5: novel ones get smaller."""
    base = torch.as_tensor(train_norms).double().mean().item()
    sets = {}
    for name, n in {"train": train_norms, "test": test_norms, **shifted}.items():
        n = torch.as_tensor(n).double().cpu()
        sets[name] = {"count": len(n), "mean_norm": n.mean().item(), "relative": n.mean().item() / base,
                      "auroc": None if name in ("train", "test") else auroc((reference or {}).get(name, test_norms), n)}
    return {"train_mean": base, "sets": sets}


def prototypes(images, norms, labels, num_classes, out_png, per=10):
    """Fig. S6: a PNG grid, a row per class: its `per` largest-norm images on the left, `per` smallest on the right."""
    norms, labels = norms.flatten().cpu(), labels.cpu()
    idx = torch.full((num_classes, 2 * per), -1, dtype=torch.long)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        order = members[norms[members].argsort(descending=True, stable=True)]
        top = min(per, (len(order) + 1) // 2)  # no image appears twice in its row
        low = min(per, len(order) - top)
        idx[c, :top] = order[:top]
        idx[c, 2 * per - low:] = order[len(order) - low:]
    tiles = images[idx.clamp(min=0).flatten().to(images.device)].cpu().float() / 255  # (C * 2per, 3, H, W)
    tiles[idx.flatten() < 0] = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    import torchvision  # save_image: 2 px black padding between tiles
    safety.write_atomic(out_png, lambda fh: torchvision.utils.save_image(tiles, fh, "png", nrow=2 * per), "wb")
    return {"png": out_png, "indices": idx.tolist(), "counts": torch.bincount(labels, minlength=num_classes).tolist()}


def linear_probe(train_f, train_y, test_f, test_y, num_classes=None, epochs=100, lr=1e-3, batch_size=1024, seed=0):
    """Top-1 (%) of a linear classifier on frozen features (Table S4), standardized with the train
    statistics; the layer starts at zero, so the batch order (`seed`) is the only randomness."""
    device = train_f.device
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mu, sd = train_f.mean(0), train_f.std(0).nan_to_num(1.0).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f.to(device) - mu) / sd  # (N, D), (M, D)
    train_y, test_y = train_y.to(device), test_y.to(device)
    layer = torch.nn.Linear(train_f.shape[1], num_classes).to(device)
    torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)  # a convex problem: any start works
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for b in torch.randperm(len(xtr), generator=g).to(device).split(batch_size):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(layer(xtr[b]), train_y[b]).backward()
                opt.step()
    with torch.no_grad():
        return {"top1": 100.0 * (layer(xte).argmax(1) == test_y).float().mean().item(), "epochs": epochs, "lr": lr,
                "train_top1": 100.0 * (layer(xtr).argmax(1) == train_y).float().mean().item()}


def human_agreement(norms, human, clean, bins=20, min_count=MIN_LABELS):
    """Fig. 4 middle: per bin of train norm / max norm, the fraction of images whose human
    label is the clean one. If the norm encodes confidence, it rises with the bin: rho > 0."""
    right = (torch.as_tensor(human).flatten() == torch.as_tensor(clean).flatten()).double()
    return {"fraction_correct": right.mean().item(), "min_count": min_count, "images": len(right),
            **binned(norms, right, "fraction_correct", bins, min_count, "fractions correct"),
            "spearman_images": spearman(norms, right)}


def human_entropy(norms, probs, bins=20, min_count=MIN_ENTROPY):
    """Fig. 4 right: per bin of test norm / max norm, the mean entropy (bits) of the human
    label distribution. Humans agree more on large-norm images: it falls, rho < 0."""
    p = torch.as_tensor(probs, dtype=torch.float64)  # (N, C)
    h = -torch.special.xlogy(p, p).sum(dim=1) / math.log(2)  # bits (0 log 0 = 0): 0 if all humans agree
    return {"mean_entropy": h.mean().item(), "min_count": min_count, "images": len(h),
            **binned(norms, h, "mean_entropy", bins, min_count, "entropies"), "spearman_images": spearman(norms, h)}


def human_confidence(dataset, folder, train_norms, train_y, test_norms, test_y, bins=20):
    """Fig. 4 middle (CIFAR-N, train set) and, for cifar10, right (CIFAR-10H, test set). Norms are
    divided by their maximum, as the paper says; the authors' notebook subtracts the minimum first."""
    (path, human, clean), probs = eval_extras.read_human(dataset, folder, train_y.cpu(), test_y.cpu())
    out = {"dataset": dataset, "labels": {"file": path, "human_label": eval_extras.HUMAN_LABEL[dataset],
                                          **human_agreement(train_norms, human, clean, bins)}}
    if probs:
        out["entropy"] = {"file": probs[0], **human_entropy(test_norms, probs[1], bins)}
    return out


# ----------------------------------------------------------------------------- command line

def evaluate(a):
    """Run the analyses asked for on one checkpoint, print and return their numbers."""
    heldout = datasets.parse_classes(a.heldout_classes)  # check the cheap things before loading anything
    if heldout is None:
        raise safety.UsageError(f"--heldout-classes {a.heldout_classes!r} must be class numbers such as 0,1,2")
    for spec in a.ood:
        if spec.partition(":")[0] not in datasets.DATASETS:
            raise safety.UsageError(f"--ood {spec!r} names no dataset; write NAME[:DATA_DIR] with NAME one of "
                                    f"{', '.join(datasets.DATASETS)}")
    implied = {"knn": True, "prototypes": a.prototypes_out, "novelty": a.ood or heldout}  # by the other flags
    chosen = {name: a.space for name in ANALYSES if implied.get(name) or a.all and name in ALL}  # name -> space
    for item in filter(None, (s.strip() for s in (a.analyses or "").split(","))):  # 'buckets,probe:backbone'
        name, _, space = item.partition(":")
        if name not in ANALYSES:
            raise safety.UsageError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
        if space and space not in SPACES:
            raise safety.UsageError(f"unknown space {space!r} in --analyses {item}; choose from {', '.join(SPACES)}")
        chosen[name] = space or a.space
    device, _ = common.pick_device(a.device)
    model, ckpt = load_model(a.checkpoint, device)
    run, mean, std = ckpt["args"], *map(tuple, ckpt["data_stats"])
    data_dir = a.data_dir or run["data_dir"]
    # A run trained with --exclude-classes is evaluated as trained; the left-out classes' images are novel.
    excluded = datasets.parse_classes(run.get("exclude_classes", "")) or []
    if excluded and heldout and heldout != excluded:
        raise safety.UsageError(f"this run was trained without classes {','.join(map(str, excluded))}; "
                                "--heldout-classes may only repeat those (or be left out)")
    if "human" in chosen:
        eval_extras.check_human_run(run, excluded, a.human_dir or data_dir)
    data = datasets.load_dataset(run["dataset"], data_dir, False, run.get("subset", 0))
    data, unseen = (d.to(device) for d in datasets.drop_classes(data, excluded))
    is_out = torch.isin(data.test_y.cpu(), torch.tensor(heldout, dtype=torch.long))  # (M,) held-out test images
    if heldout and not excluded and (is_out.all() or not is_out.any()
                                     or not all(0 <= c < data.num_classes for c in heldout)):
        raise safety.UsageError(f"--heldout-classes must name classes between 0 and {data.num_classes - 1} that "
                                "occur in the test set, leaving some test images on the other side")
    loss_space = "predictor" if getattr(model, "predictor", None) is not None else "projector"
    chosen = {name: loss_space if s == "loss" else s for name, s in chosen.items()}

    @functools.cache
    def feats(split, space):  # (N, D), computed once per split and space
        return embed(model, getattr(data, split + "_x"), mean, std, space)

    def norms(split, space):  # (N,); split may instead be other images, embedded and not kept
        x = feats(split, space) if isinstance(split, str) else embed(model, split, mean, std, space)
        return x.norm(dim=1).cpu()

    @functools.cache
    def correct(space):  # (M,) whether the k-NN vote is right, per test image
        return (knn_predict(feats("train", space), data.train_y, feats("test", space), data.num_classes, a.k, a.t)
                == data.test_y).cpu()

    s = chosen["knn"]
    result = {"checkpoint": a.checkpoint, "method": ckpt["method"], "epoch": ckpt["epoch"], "dataset": run["dataset"],
              "space": s, "k": a.k, "t": a.t, "knn_top1": 100.0 * correct(s).float().mean().item(),
              "norms": {split: norm_summary(feats(split, s), getattr(data, split + "_y"), data.num_classes)
                        for split in ("train", "test")}, "analyses": {}}
    eval_extras.report("knn", result)
    for name in (n for n in ANALYSES[1:] if n in chosen):
        s = chosen[name]
        if name == "buckets":
            r = binned(norms("test", s), 100.0 * correct(s), "accuracy", a.bins, y_name="bin accuracies")
        elif name == "novelty":
            shifted, reference = {"unseen classes": norms(unseen, s)} if excluded else {}, {}
            shifted |= {k: norms(shift_images(data.test_x, k, mean, std, a.seed), s) for k in ("vflip", "noise")}
            for ood, _, folder in (spec.partition(":") for spec in a.ood):
                other = datasets.load_dataset(ood, folder or data_dir, False, run.get("subset", 0))
                while ood in shifted:  # the same dataset twice, from two folders
                    ood += "'"
                shifted[ood] = norms(resize(other.test_x, data.size).to(device), s)
            if heldout and not excluded:  # classes the run trained on: a class-level comparison, not novelty
                shifted["heldout"], reference["heldout"] = norms("test", s)[is_out], norms("test", s)[~is_out]
            r = novelty(norms("train", s), norms("test", s), shifted, reference)
        elif name == "prototypes":
            png = a.prototypes_out or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)),
                                                   f"prototypes-{s}.png")
            r = prototypes(data.train_x, norms("train", s), data.train_y, data.num_classes, png)
        elif name == "probe":
            r = linear_probe(feats("train", s), data.train_y, feats("test", s), data.test_y, data.num_classes,
                             a.probe_epochs, a.probe_lr, seed=a.seed)
        elif name == "classes":
            r = class_frequency(norm_summary(feats("train", s), data.train_y, data.num_classes))
        else:
            r = human_confidence(run["dataset"], a.human_dir or data_dir, norms("train", s), data.train_y,
                                 norms("test", s), data.test_y, a.bins)
        result["analyses"][name] = r = {"space": s, **r}
        eval_extras.report(name, r)
    return result


def main(argv=None):
    p = common.Parser(formatter_class=common.HelpFormatter, description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("checkpoint", nargs="?", help="a last.pt or epoch<N>.pt written by one of the method scripts, or its folder")
    add("--k", type=int, default=200, help="neighbours that vote")
    add("--t", type=float, default=0.1, help="temperature of the exp(sim / T) vote weights")
    add("--space", default="backbone", choices=SPACES, help="features for every analysis without its own: backbone "
        "h, projector z, predictor p, or loss (where the loss sees the embedding, as the paper measures norms)")
    add("--analyses", help="comma-separated NAME[:SPACE] from " + ", ".join(ANALYSES))
    add("--all", action="store_true", help="run " + ", ".join(ALL) + "; human runs only when named")
    add("--bins", type=int, default=20, help="buckets, human: equal-width bins of norm / max norm")
    add("--ood", action="append", default=[], metavar="NAME[:DATA_DIR]", help="novelty (implied): also embed this "
        "dataset's test split at the run's image size and --subset; repeat for several; DATA_DIR: the run's")
    add("--heldout-classes", default="", metavar="C1,C2", help="novelty (implied): these test classes against the rest")
    add("--prototypes-out", help="prototypes (implied): the PNG; None: prototypes-SPACE.png beside the checkpoint")
    add("--probe-epochs", type=int, default=100, help="probe: epochs of Adam over the frozen features")
    add("--probe-lr", type=float, default=1e-3, help="probe: Adam learning rate")
    add("--human-dir", help="human: folder of the CIFAR-N and CIFAR-10H files (docs/evaluation.md); None: --data-dir")
    add("--seed", type=int, default=0, help="seed of the noise images and the probe's batch order")
    add("--compare", nargs="+", default=None, metavar="RUN", help="instead of a checkpoint: run folders (or their "
        "metrics.jsonl); prints each run's loss, norms and k-NN top-1 per epoch, then a summary line per run")
    add("--figures", help="folder for PNG figures (only where matplotlib is installed)")
    add("--data-dir", help="dataset folder (default: the one the run used)")
    add("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else the CPU)")
    add("--json", help="also write the numbers to this JSON file")
    a = p.parse_args(argv)
    for bad, says in [(a.k < 1, f"--k must be >= 1 (got {a.k})"), (a.bins < 1, f"--bins must be >= 1 (got {a.bins})"),
                      (not 0 < a.t < math.inf, f"--t must be positive and finite (got {a.t})"),
                      (not 0 < a.probe_lr < math.inf, f"--probe-lr must be positive and finite (got {a.probe_lr})"),
                      (a.probe_epochs < 0, f"--probe-epochs must be >= 0 (got {a.probe_epochs})")]:
        if bad:
            p.error(says)
    if a.checkpoint and os.path.isdir(a.checkpoint):  # a run folder stands for its last.pt
        a.checkpoint = os.path.join(a.checkpoint, "last.pt")
    if bool(a.checkpoint) == bool(a.compare):
        raise safety.UsageError("give a checkpoint to evaluate, or --compare RUN [RUN ...] to compare training runs"
                                + (", not both" if a.compare else ""))
    eval_extras.check_outputs(a)
    result = eval_extras.compare(a.compare) if a.compare else evaluate(a)  # each prints its tables as it goes
    if a.json:
        numbers = json.loads(json.dumps(result), parse_constant=lambda _: None)  # NaN: null
        safety.write_atomic(a.json, lambda fh: json.dump(numbers, fh, indent=1))
        print(f"numbers: {a.json}")
    if a.figures:
        eval_extras.draw_figures(result, a.figures)
    return result


if __name__ == "__main__":
    safety.cli(main)
