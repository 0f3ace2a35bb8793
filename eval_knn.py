"""Weighted k-NN evaluation and the embedding-norm analyses of "On the Importance of
Embedding Norms in Self-Supervised Learning" (Draganov et al., ICML 2025) for any checkpoint.

The k-NN protocol is the classic one (Wu et al. 2018, as in the SimSiam / MoCo code bases):
embed train and test images without augmentation, L2-normalize, and let each test image's
k=200 most cosine-similar train images vote with weight exp(sim / T), T=0.1.

The paper's second claim is that the norm of an embedding encodes the network's
confidence. Each analysis below tests one facet of it; pick them with --analyses (or --all),
each in its own feature space if wanted (NAME:SPACE):

    knn         k-NN top-1 and mean norms per split and class (always run; the default)
    buckets     test norms divided by their maximum, cut into 20 equal bins: k-NN accuracy
                per bin and Spearman(bin, accuracy) (paper Fig. 4, left)
    novelty     mean norm of train, test and shifted sets relative to the train mean, and the
                AUROC with which the norm tells test images from each shifted set (Fig. 3)
    prototypes  per class, the 10 largest- and 10 smallest-norm train images as a PNG (Fig. S6)
    probe       linear classifier on frozen, precomputed features: top-1 (Table S4)
    classes     mean train norm per class against class frequency, Spearman (long-tailed data)
    --compare   loss, norms and k-NN top-1 per epoch of several runs side by side (Fig. 5, S4)

    python eval_knn.py runs/<run>/last.pt
    python eval_knn.py runs/<run>/last.pt --all --space loss --json out.json --figures figs
    python eval_knn.py runs/<run>/last.pt --analyses novelty,probe:backbone \\
        --ood fashionmnist:/usr/share/datasets/fashion-mnist
    python eval_knn.py --compare runs/simclr-c1 runs/simclr-c3 --figures figs

Everything printed also goes to --json; --figures draws PNGs only where matplotlib is
installed (it is optional). The functions are importable and work on plain tensors.
"""
import argparse
import importlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import common

ANALYSES = ("knn", "buckets", "novelty", "prototypes", "probe", "classes")
SPACES = ("backbone", "projector", "predictor", "loss")


# ----------------------------------------------------------------------------- embeddings and k-NN

@torch.no_grad()
def embed(model, x, mean, std, space="backbone", batch_size=1024):
    """Features of uint8 images x (N, 3, H, W) in the given space, as float32 (N, D)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        batch = common.normalize(x[i: i + batch_size].to(device), mean, std)
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with common.autocast(device):
            out.append(common.features(model, batch, space).float())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted k-NN labels for test_f (M, D) from train_f (N, D); chunked over the queries
    so a 50k x 10k similarity matrix never has to exist at once."""
    train_f = F.normalize(train_f, dim=1)
    k = min(k, len(train_f))
    preds = []
    for i in range(0, len(test_f), chunk):
        sim = F.normalize(test_f[i: i + chunk], dim=1) @ train_f.T  # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weight = (top_sim / t).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[top_idx], weight)  # (m, C) weighted class votes
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_eval(model, data, mean, std, k=200, t=0.1, space="backbone"):
    """k-NN top-1 accuracy (%) of the model's features on data's test set."""
    train_f = embed(model, data.train_x, mean, std, space)
    test_f = embed(model, data.test_x, mean, std, space)
    pred = knn_predict(train_f, data.train_y.to(train_f.device), test_f, data.num_classes, k, t)
    return 100.0 * (pred == data.test_y.to(pred.device)).float().mean().item()


def norm_summary(feats, labels, num_classes):
    """Mean and std of the embedding norm, overall and per class."""
    norms = feats.norm(dim=1).cpu()
    labels = labels.cpu()
    per_class = []
    for c in range(num_classes):
        n = norms[labels == c]
        per_class.append({"class": c, "count": len(n), "mean": n.mean().item() if len(n) else float("nan"),
                          "std": n.std().item() if len(n) > 1 else float("nan")})
    return {"mean": norms.mean().item(), "std": norms.std().item(), "per_class": per_class}


def load_model(path, device="cpu"):
    """Rebuild a trained network from a checkpoint alone; returns (model, checkpoint)."""
    ckpt = common.load_checkpoint(path)
    module = importlib.import_module(ckpt["method"])  # the script that wrote it, e.g. simclr.py
    fields = {f for f in module.Args.__dataclass_fields__}
    args = module.Args(**{k: v for k, v in ckpt["args"].items() if k in fields})
    model = module.build_model(args, ckpt["img_size"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise common.UsageError(f"{path} does not match the {ckpt['method']} network it names "
                                f"({str(e).splitlines()[0]})")
    return model.to(device), ckpt


# ----------------------------------------------------------------------------- rank statistics
# Written out in torch so that scipy is not needed; both work on 1-D tensors or lists.

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
    """Spearman's rank correlation: the Pearson correlation of the tie-averaged ranks.
    nan when there are fewer than two points or one side is constant."""
    ra, rb = ranks(a), ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman needs two sequences of one length, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    scale = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / scale if len(ra) > 1 and scale > 0 else float("nan")


def auroc(pos, neg):
    """Area under the ROC curve of a score that should be larger for `pos` than for `neg`:
    the probability that a random positive outscores a random negative, ties counting
    half. It equals the Mann-Whitney U statistic of the positives over n_pos * n_neg."""
    pos = torch.as_tensor(pos, dtype=torch.float64).flatten().cpu()
    neg = torch.as_tensor(neg, dtype=torch.float64).flatten().cpu()
    if not len(pos) or not len(neg):
        return float("nan")
    u = ranks(torch.cat([pos, neg]))[: len(pos)].sum().item() - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


# ----------------------------------------------------------------------------- analyses

def norm_buckets(norms, correct, bins=20):
    """k-NN accuracy against embedding norm (paper Fig. 4, left). Norms are divided by their
    maximum and cut into `bins` equal-width bins of [0, 1]; accuracy is None in empty bins.
    If norms encode confidence, accuracy rises with the bin: Spearman close to +1."""
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten().cpu()
    correct = torch.as_tensor(correct).flatten().cpu().bool()
    rel = norms / norms.max().clamp_min(1e-12)
    idx = (rel * bins).long().clamp(0, bins - 1)  # the maximum itself belongs to the last bin
    rows = []
    for i in range(bins):
        hit = correct[idx == i]
        rows.append({"lo": i / bins, "hi": (i + 1) / bins, "count": len(hit),
                     "accuracy": 100.0 * hit.float().mean().item() if len(hit) else None})
    full = [r for r in rows if r["count"]]
    return {"bins": rows, "spearman": spearman([r["lo"] for r in full], [r["accuracy"] for r in full])}


def shift_images(x, kind, mean, std, seed=0):
    """Out-of-distribution versions of uint8 images x (N, 3, H, W) that need no other data
    set: 'vflip' turns them upside down (same pixels, unfamiliar layout); 'noise' replaces
    them with Gaussian noise of the data's per-channel pixel mean and std."""
    if kind == "vflip":
        return x.flip(-2)
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        img = m + s * torch.randn(x.shape, generator=g)  # pixels in [0, 1]
        return (img.clamp(0, 1) * 255).round().to(torch.uint8).to(x.device)
    raise ValueError(f"unknown shift {kind!r}")


def resize(x, size):
    """uint8 images (N, 3, H, W) resized to size x size px, so another data set's images
    fit the network (antialiased bilinear, like PIL's resize)."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def novelty(train_norms, test_norms, shifted, reference=None):
    """Embedding norms of unfamiliar inputs (paper Fig. 3). For train, test and each set in
    `shifted` (name -> norms): the mean norm relative to the train mean, and the AUROC with
    which the norm separates in-distribution test embeddings (the positives: the paper finds
    novel samples get *smaller* norms) from that set. `reference` (name -> norms) replaces
    the whole test set as the in-distribution side for a set, e.g. the non-held-out classes."""
    base = torch.as_tensor(train_norms).double().mean().item()
    sets = {}
    for name, n in {"train": train_norms, "test": test_norms, **shifted}.items():
        n = torch.as_tensor(n).double().cpu()
        ind = (reference or {}).get(name, test_norms)
        sets[name] = {"count": len(n), "mean_norm": n.mean().item(), "relative": n.mean().item() / base,
                      "auroc": None if name in ("train", "test") else auroc(ind, n)}
    return {"train_mean": base, "sets": sets}


def prototypes(images, norms, labels, num_classes, out_png, per=10):
    """Per class, the `per` largest-norm and the `per` smallest-norm images (paper Fig. S6),
    one class per row of a PNG grid, ordered from the largest norm (left) to the smallest
    (right). A class with fewer than 2 * per images gets black tiles in the middle of its
    row. Returns the (C, 2 * per) image indices, -1 for a blank tile."""
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
    torchvision.utils.save_image(tiles, out_png, nrow=2 * per)  # 2 px black padding between tiles
    return idx


def linear_probe(train_f, train_y, test_f, test_y, num_classes=None, epochs=100, lr=1e-3,
                 batch_size=1024, wd=0.0, seed=0):
    """Top-1 (%) of a linear softmax classifier on frozen, precomputed features (paper
    Table S4 reports linear-probe accuracy). Features are standardized with the train
    statistics and the layer starts at zero, so the only randomness, the batch order, comes
    from `seed`. The features are computed once, so an epoch is a few small matrix products."""
    device = train_f.device
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mu, sd = train_f.mean(0), train_f.std(0).nan_to_num(1.0).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f.to(device) - mu) / sd  # (N, D), (M, D)
    train_y, test_y = train_y.to(device), test_y.to(device)
    layer = nn.Linear(train_f.shape[1], num_classes).to(device)
    nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)  # a convex problem: any start works
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(xtr), generator=g).to(device)
            for i in range(0, len(xtr), batch_size):
                b = perm[i: i + batch_size]
                loss = F.cross_entropy(layer(xtr[b]), train_y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        top1 = 100.0 * (layer(xte).argmax(1) == test_y).float().mean().item()
        train_top1 = 100.0 * (layer(xtr).argmax(1) == train_y).float().mean().item()
    return {"top1": top1, "train_top1": train_top1, "epochs": epochs, "lr": lr}


def per_class_norms(norms, labels, num_classes=None):
    """Mean norm and image count of each class, and Spearman(count, mean norm) over the
    classes present. If norms grow with how familiar an input is, the frequent classes of a
    long-tailed training set get the larger norms: a positive correlation. nan on a
    balanced set, where every count is the same."""
    norms, labels = torch.as_tensor(norms).double().flatten().cpu(), torch.as_tensor(labels).flatten().cpu()
    num_classes = num_classes or int(labels.max()) + 1
    rows = []
    for c in range(num_classes):
        n = norms[labels == c]
        rows.append({"class": c, "count": len(n), "mean_norm": n.mean().item() if len(n) else None})
    full = [r for r in rows if r["count"]]
    return {"classes": rows, "spearman": spearman([r["count"] for r in full], [r["mean_norm"] for r in full])}


# ----------------------------------------------------------------------------- training curves (--compare)

CURVES = ("loss", "emb_norm_mean", "feat_norm_mean", "knn_top1")


def read_metrics(path):
    """The per-epoch lines of a run folder's metrics.jsonl (or of that file itself). A
    resumed run may have logged an epoch twice; the later line wins."""
    if not os.path.exists(path):
        raise common.UsageError(f"run {path} does not exist; pass run folders written by a method script")
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise common.UsageError(f"{path} has no metrics.jsonl; pass a run folder that has trained at least one epoch")
    rows = {}
    with open(file) as fh:
        for i, line in enumerate(fh, 1):
            try:
                if line.strip():
                    row = json.loads(line)
                    rows[row["epoch"]] = row
            except (json.JSONDecodeError, TypeError, KeyError):
                raise common.UsageError(f"line {i} of {file} is not a metrics line; the file is damaged")
    if not rows:
        raise common.UsageError(f"{file} is empty; the run has not finished an epoch yet")
    return [rows[e] for e in sorted(rows)]


def compare(paths):
    """Read several runs' metrics; returns {name: rows} with unique names (folder names)."""
    runs = {}
    for p in paths:
        base = os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))))
        name, i = base, 1
        while name in runs:
            i += 1
            name = f"{base} ({i})"
        runs[name] = read_metrics(p)
    return runs


# ----------------------------------------------------------------------------- output

def fmt(v, spec=".4f", width=10):
    return f"{'-':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{width}{spec}}"


def plain(obj):
    """NaN and inf are not JSON: write them as null."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def print_compare(runs):
    """One table per run, then one summary line per run, all columns aligned."""
    for name, rows in runs.items():
        print(f"== {name}\n{'epoch':>6}" + "".join(f"{k:>15}" for k in CURVES))
        for r in rows:
            print(f"{r['epoch']:>6}" + "".join(fmt(r.get(k), width=15) for k in CURVES))
    w = max(len(name) for name in runs)
    print(f"{'run':<{w}} {'epochs':>6} {'last loss':>10} {'emb norm':>10} {'last k-NN':>10} {'best k-NN':>10}")
    for name, rows in runs.items():
        knn = [r["knn_top1"] for r in rows if r.get("knn_top1") is not None]
        print(f"{name:<{w}} {rows[-1]['epoch']:>6} {fmt(rows[-1].get('loss'))} {fmt(rows[-1].get('emb_norm_mean'))} "
              f"{fmt(knn[-1] if knn else None, '.2f')} {fmt(max(knn) if knn else None, '.2f')}")


def draw_figures(result, folder):
    """PNG figures of what `result` holds. matplotlib is optional: without it this draws
    nothing and returns False."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    os.makedirs(folder, exist_ok=True)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=120)
        plt.close(fig)

    if "runs" in result:
        fig, axes = plt.subplots(1, len(CURVES), figsize=(4.5 * len(CURVES), 3.5))
        for ax, key in zip(axes, CURVES):
            for name, rows in result["runs"].items():
                pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=".", label=name)
            ax.set(xlabel="epoch", title=key)
        axes[0].legend(fontsize=7)
        save(fig, "curves.png")
    out = result.get("analyses", {})
    if "buckets" in out:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        bins = out["buckets"]["bins"]
        full = [b for b in bins if b["count"]]
        ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=1 / len(bins), align="edge",
               edgecolor="white")
        ax.set(xlabel="embedding norm / max norm", ylabel="k-NN top-1 (%)", xlim=(0, 1))
        save(fig, "buckets.png")
    if "novelty" in out:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        sets = out["novelty"]["sets"]
        ax.bar(list(sets), [v["relative"] for v in sets.values()])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(ylabel="mean norm / train mean")
        ax.tick_params(axis="x", labelrotation=30)
        save(fig, "novelty.png")
    if "classes" in out:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        full = [c for c in out["classes"]["classes"] if c["count"]]
        ax.scatter([c["count"] for c in full], [c["mean_norm"] for c in full], s=10)
        ax.set(xlabel="train images in the class", ylabel="mean embedding norm")
        save(fig, "classes.png")
    return True


# ----------------------------------------------------------------------------- command line

def parse_analyses(text, everything, default_space):
    """'buckets,probe:backbone' -> {name: space}; --all adds every analysis at --space."""
    chosen = {name: default_space for name in (ANALYSES if everything else ("knn",))}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        name, _, space = item.partition(":")
        if name not in ANALYSES:
            raise common.UsageError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
        if space and space not in SPACES:
            raise common.UsageError(f"unknown space {space!r} in --analyses {item}; choose from {', '.join(SPACES)}")
        chosen[name] = space or default_space
    return chosen


def parse_ood(spec):
    """'fashionmnist:/data/fm' -> ('fashionmnist', '/data/fm'); the folder may be left out."""
    name, _, folder = spec.partition(":")
    if name not in common.DATASETS:
        raise common.UsageError(f"--ood {spec!r} names no dataset; write NAME[:DATA_DIR] with NAME one of "
                                f"{', '.join(common.DATASETS)}")
    return name, folder


def evaluate(a):
    """Run the analyses asked for on one checkpoint, print their tables and return the
    numbers. Features are computed once per (split, space) and reused."""
    chosen = parse_analyses(a.analyses, a.all, a.space)  # check the cheap things before loading anything
    if a.prototypes_out:
        chosen.setdefault("prototypes", a.space)
    heldout = common.parse_classes(a.heldout_classes)
    if heldout is None:
        raise common.UsageError(f"--heldout-classes {a.heldout_classes!r} must be class numbers such as 0,1,2")
    oods = [parse_ood(spec) for spec in a.ood]
    if a.ood or heldout:
        chosen.setdefault("novelty", a.space)
    device = common.pick_device(a.device)
    model, ckpt = load_model(a.checkpoint, device)
    run = ckpt["args"]
    # A run trained without some classes (--exclude-classes) is evaluated as it was trained:
    # on the other classes; the left-out classes' test images are the truly novel set.
    excluded = common.parse_classes(run.get("exclude_classes", "")) or []
    if excluded and heldout and heldout != excluded:
        raise common.UsageError(f"this run was trained without classes {','.join(map(str, excluded))}; "
                                "--heldout-classes may only repeat those (or be left out)")
    data = common.load_dataset(run["dataset"], a.data_dir or run["data_dir"], False, run.get("subset", 0))
    data, unseen = common.drop_classes(data, excluded)
    data = data.to(device)
    mean, std = ckpt["data_stats"]
    is_out = torch.isin(data.test_y.cpu(), torch.tensor(heldout, dtype=torch.long))  # (M,) held-out test images
    if heldout and not excluded and (is_out.all() or not is_out.any()
                                     or not all(0 <= c < data.num_classes for c in heldout)):
        raise common.UsageError(f"--heldout-classes must name classes between 0 and {data.num_classes - 1} that "
                                "occur in the test set, leaving some test images on the other side")
    loss_space = "predictor" if getattr(model, "predictor", None) is not None else "projector"
    chosen = {name: loss_space if s == "loss" else s for name, s in chosen.items()}
    images = {"train": data.train_x, "test": data.test_x}
    cache, preds = {}, {}

    def feats(split, space):
        if (split, space) not in cache:
            cache[split, space] = embed(model, images[split], mean, std, space)
        return cache[split, space]

    def norms(split, space):
        return feats(split, space).norm(dim=1).cpu()  # (N,)

    def knn(space):
        if space not in preds:
            preds[space] = knn_predict(feats("train", space), data.train_y, feats("test", space),
                                       data.num_classes, a.k, a.t)
        return preds[space]

    s = chosen["knn"]
    top1 = 100.0 * (knn(s) == data.test_y).float().mean().item()
    result = {"checkpoint": a.checkpoint, "method": ckpt["method"], "epoch": ckpt["epoch"], "dataset": run["dataset"],
              "space": s, "k": a.k, "t": a.t, "knn_top1": top1,
              "norms": {"train": norm_summary(feats("train", s), data.train_y, data.num_classes),
                        "test": norm_summary(feats("test", s), data.test_y, data.num_classes)}, "analyses": {}}
    print(f"{ckpt['method']} epoch {ckpt['epoch']} on {run['dataset']}: weighted {a.k}-NN top-1 = {top1:.2f}% "
          f"({s} features)")
    print(f"{'split':<6} {'mean norm':>10} {'std':>10}")
    for split in ("train", "test"):
        print(f"{split:<6} {fmt(result['norms'][split]['mean'])} {fmt(result['norms'][split]['std'])}")
    print(f"{'class':>5} {'train n':>8} {'train norm':>11} {'test norm':>10}")
    for tr, te in zip(result["norms"]["train"]["per_class"], result["norms"]["test"]["per_class"]):
        print(f"{tr['class']:>5} {tr['count']:>8} {fmt(tr['mean'], width=11)} {fmt(te['mean'])}")
    out = result["analyses"]

    if "buckets" in chosen:
        s = chosen["buckets"]
        r = out["buckets"] = {"space": s, **norm_buckets(norms("test", s), (knn(s) == data.test_y).cpu(), a.bins)}
        print(f"\nnorm vs k-NN accuracy ({s} features; test norm / max test norm, {a.bins} bins)")
        print(f"{'norm bin':>11} {'images':>7} {'k-NN top-1':>10}")
        for row in r["bins"]:
            print(f"{row['lo']:>5.2f}-{row['hi']:<5.2f} {row['count']:>7} {fmt(row['accuracy'], '.2f')}")
        print(f"Spearman(norm bin, accuracy) = {fmt(r['spearman'], '.3f', 0)}")

    if "novelty" in chosen:
        s, shifted, reference = chosen["novelty"], {}, {}
        if excluded:
            images["unseen classes"] = unseen.to(device)
        for kind in ("vflip", "noise"):
            images[kind] = shift_images(data.test_x, kind, mean, std, a.seed)
        for name, folder in oods:
            other = common.load_dataset(name, folder or a.data_dir or run["data_dir"], False, run.get("subset", 0))
            key = name
            while key in images:  # the same dataset twice, from two folders
                key += "'"
            images[key] = resize(other.test_x, data.size).to(device)
        for key in list(images)[2:]:
            shifted[key] = norms(key, s)
            del images[key]  # only the features are needed from here on
        if heldout and not excluded:  # classes the run trained on: a class-level comparison, not novelty
            shifted["heldout"], reference["heldout"] = norms("test", s)[is_out], norms("test", s)[~is_out]
        r = out["novelty"] = {"space": s, **novelty(norms("train", s), norms("test", s), shifted, reference)}
        print(f"\nnovelty ({s} features): mean norm relative to the train mean; AUROC of the norm "
              f"telling test images (positives) from each set")
        print(f"{'set':<16} {'images':>7} {'mean norm':>10} {'relative':>9} {'AUROC':>7}")
        for name, row in r["sets"].items():
            print(f"{name:<16} {row['count']:>7} {fmt(row['mean_norm'])} {fmt(row['relative'], '.3f', 9)} "
                  f"{fmt(row['auroc'], '.3f', 7)}")

    if "prototypes" in chosen:
        s = chosen["prototypes"]
        png = a.prototypes_out or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), f"prototypes-{s}.png")
        idx = prototypes(data.train_x, norms("train", s), data.train_y, data.num_classes, png)
        out["prototypes"] = {"space": s, "png": png, "indices": idx.tolist()}
        print(f"\nprototypes ({s} features): {png}; a row per class, the 10 largest train norms on the left, "
              f"the 10 smallest on the right")

    if "probe" in chosen:
        s = chosen["probe"]
        r = out["probe"] = {"space": s, **linear_probe(feats("train", s), data.train_y, feats("test", s), data.test_y,
                                                      data.num_classes, a.probe_epochs, a.probe_lr, seed=a.seed)}
        print(f"\nlinear probe ({s} features, {a.probe_epochs} epochs of Adam): top-1 = {r['top1']:.2f}% "
              f"(train {r['train_top1']:.2f}%)")

    if "classes" in chosen:
        s = chosen["classes"]
        r = out["classes"] = {"space": s, **per_class_norms(norms("train", s), data.train_y, data.num_classes)}
        print(f"\nnorm per class ({s} features, train set)\n{'class':>5} {'images':>7} {'mean norm':>10}")
        for row in r["classes"]:
            print(f"{row['class']:>5} {row['count']:>7} {fmt(row['mean_norm'])}")
        print(f"Spearman(class frequency, mean norm) = {fmt(r['spearman'], '.3f', 0)}"
              + ("  (all classes equally frequent)" if math.isnan(r["spearman"]) else ""))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="Weighted k-NN top-1 and the embedding-norm analyses of a checkpoint, "
                                "or the training curves of several runs (--compare).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a last.pt or epoch<N>.pt written by one of the method scripts")
    p.add_argument("--k", type=int, default=200, help="neighbours that vote")
    p.add_argument("--t", type=float, default=0.1, help="temperature of the exp(sim / T) vote weights")
    p.add_argument("--space", default="backbone", choices=SPACES,
                   help="features for every analysis without its own: backbone h, projector z, predictor p, "
                        "or loss (where the loss sees the embedding: the predictor if the method has one, "
                        "else the projector; the paper measures norms there)")
    p.add_argument("--analyses", default=None, help="comma-separated NAME[:SPACE] from " + ", ".join(ANALYSES))
    p.add_argument("--all", action="store_true",
                   help="run every analysis (at --space, unless --analyses gives one its own)")
    p.add_argument("--bins", type=int, default=20, help="buckets: equal-width bins of norm / max norm")
    p.add_argument("--ood", action="append", default=[], metavar="NAME[:DATA_DIR]",
                   help="novelty (implied): also embed this dataset's test split, resized to the run's image size "
                        "(the run's --subset applies); repeat for several; DATA_DIR defaults to the run's")
    p.add_argument("--heldout-classes", default="", metavar="C1,C2",
                   help="novelty (implied): compare the test images of these classes with those of the other "
                        "classes; for a run trained with --exclude-classes this is automatic (the set 'unseen "
                        "classes'), for any other run it compares classes the network did see")
    p.add_argument("--prototypes-out", default=None,
                   help="prototypes (implied): the PNG to write; None: prototypes-SPACE.png beside the checkpoint")
    p.add_argument("--probe-epochs", type=int, default=100, help="probe: epochs of Adam over the frozen features")
    p.add_argument("--probe-lr", type=float, default=1e-3, help="probe: Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise images and the probe's batch order")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                   help="instead of a checkpoint: run folders (or their metrics.jsonl); prints each run's per-epoch "
                        "loss, norms and k-NN top-1, then a summary line per run")
    p.add_argument("--figures", default=None, help="folder for PNG figures (only where matplotlib is installed)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the one the run used)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = p.parse_args(argv)
    if a.k < 1 or a.t <= 0 or a.bins < 1 or a.probe_epochs < 0:
        p.error("--k, --bins must be >= 1, --t must be positive and --probe-epochs >= 0")
    if a.compare:
        if a.checkpoint:
            raise common.UsageError("give either a checkpoint or --compare RUN [RUN ...], not both")
        result = {"runs": compare(a.compare)}
        print_compare(result["runs"])
    elif not a.checkpoint:
        raise common.UsageError("give a checkpoint to evaluate, or --compare RUN [RUN ...] to compare training runs")
    else:
        result = evaluate(a)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(plain(result), fh, indent=1)
    if a.figures and not draw_figures(result, a.figures):
        print("note: matplotlib is not installed, so no figures were drawn; the numbers are above", file=sys.stderr)
    return result


if __name__ == "__main__":
    common.cli(main)
