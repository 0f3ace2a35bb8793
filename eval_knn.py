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
    human       CIFAR-10/100 only: is the human consensus label right (CIFAR-10N / 100N, train
                set) and how much do the human labels disagree (CIFAR-10H entropy, test set),
                per bin of norm / max norm (Fig. 4, middle and right); needs --human-dir
    opposite    two augmented views of each test image: the fraction of positive pairs whose
                embeddings point into opposite half-spaces, cos < --opposite-cos (App. C.2,
                Table S1); in the loss's space unless named, e.g. opposite:backbone
    --compare   loss, norms and k-NN top-1 per epoch of several runs side by side (Fig. 5, S4)

--all runs knn to classes; human and opposite run only when named, since human needs
downloaded label files and opposite is a training-dynamics check, not a confidence facet.

    python eval_knn.py runs/<run>/last.pt
    python eval_knn.py runs/<run>/last.pt --all --space loss --json out.json --figures figs
    python eval_knn.py runs/<run>/last.pt --analyses novelty,probe:backbone \\
        --ood fashionmnist:/usr/share/datasets/fashion-mnist
    python eval_knn.py runs/<run>/last.pt --analyses human --human-dir data/human --figures figs
    python eval_knn.py runs/<run>/epoch1.pt --analyses opposite --opposite-cos 0
    python eval_knn.py --compare runs/simclr-c1 runs/simclr-c3 --figures figs

Everything printed also goes to --json; --figures draws PNGs only where matplotlib is
installed (it is optional). The functions are importable and work on plain tensors.
"""
import argparse
import importlib
import importlib.util
import json
import math
import os
import pickle
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common
from common import embed, knn_eval, knn_predict  # noqa: F401 (knn_eval: for importers)

ANALYSES = ("knn", "buckets", "novelty", "prototypes", "probe", "classes", "human", "opposite")
ALL = ANALYSES[:6]  # what --all runs: human needs downloaded files, opposite is no confidence facet
SPACES = ("backbone", "projector", "predictor", "loss")
OWN_SPACE = {"opposite": "loss"}  # the opposite-halves effect is about the angles the loss sees


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
    """Rebuild a trained network from a checkpoint alone; returns (model, checkpoint).
    Nothing in the file is trusted: its method must be one of common.METHODS before that
    script is imported, its fields and flags must have their types, and its weights must
    fit the network the flags describe before that network is built for real."""
    ckpt = common.check_checkpoint(common.load_checkpoint(path), path)
    module = importlib.import_module(ckpt["method"])  # the script that wrote it, e.g. simclr.py
    args = common.check_args(ckpt["args"], module.Args, path)
    ckpt["args"] = {**ckpt["args"], **vars(args)}  # evaluate() reads the flags from here; fill in missing ones
    check_weights(module, args, ckpt, path)
    model = module.build_model(args, ckpt["img_size"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:2]) or str(e)
        raise common.UsageError(f"{path} does not match the {ckpt['method']} network it names ({detail[:200]})")
    return model.to(device), ckpt


def check_weights(module, args, ckpt, path):
    """Compare the checkpoint's tensors with the network its flags describe, built on the
    meta device (shapes without memory): a missing, extra or misshapen weight is refused
    with one sentence, and crafted flags such as a 10^9-wide projector allocate nothing."""
    method = ckpt["method"]
    try:
        with torch.device("meta"):
            expected = module.build_model(args, ckpt["img_size"]).state_dict()
    except common.UsageError:
        raise
    except Exception as e:  # e.g. a negative width: torch's own error, not a sentence
        raise common.UsageError(f"{path} has flags that build no {method} network ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120] if str(e) else ''}); refusing to load it")
    weights = ckpt["model"]
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    if missing or extra:
        first = f"it lacks {missing[0]!r}" if missing else f"it has an unexpected {extra[0][:60]!r}"
        raise common.UsageError(f"{path} does not match the {method} network its flags describe: {first} "
                                f"({len(missing)} missing, {len(extra)} unexpected tensors); refusing to load it")
    for k, want in expected.items():
        got = weights[k]
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point() or got.is_complex():
            raise common.UsageError(f"{path} does not match the {method} network its flags describe: {k!r} is a "
                                    f"{got.dtype} tensor of shape {tuple(got.shape)} where the network has "
                                    f"{want.dtype} {tuple(want.shape)}; refusing to load it")


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
    correct = torch.as_tensor(correct).flatten().cpu().bool()
    idx = norm_bins(norms, bins)
    rows = []
    for i in range(bins):
        hit = correct[idx == i]
        rows.append({"lo": i / bins, "hi": (i + 1) / bins, "count": len(hit),
                     "accuracy": 100.0 * hit.float().mean().item() if len(hit) else None})
    full = [r for r in rows if r["count"]]
    return {"bins": rows, **rank_correlation([r["lo"] for r in full], [r["accuracy"] for r in full],
                                             "non-empty norm bins", "bin accuracies")}


def norm_bins(norms, bins=20):
    """The bin 0..bins-1 of each norm once norms are divided by their maximum: equal-width
    bins of [0, 1], 20 of width 0.05 in the paper (Fig. 4); the maximum lands in the last."""
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten().cpu()
    rel = norms / norms.max().clamp_min(1e-12)
    return (rel * bins).long().clamp(0, bins - 1)


def rank_correlation(x, y, x_name, y_name):
    """{"spearman": rho}, or where rho is undefined (a constant side, under two points)
    {"spearman": None, "note": the reason in words}, so no one reads a number into a nan."""
    x, y = list(x), list(y)
    rho = spearman(x, y)
    if not math.isnan(rho):
        return {"spearman": rho}
    if len(x) < 2:
        why = f"fewer than two {x_name} to rank"
    elif len(set(x)) == 1:
        why = f"all {len(x)} {x_name} are equal ({x[0]:g})"
    else:
        why = f"all {len(y)} {y_name} are equal ({y[0]:g})"
    return {"spearman": None, "note": f"Spearman undefined: {why}"}


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
    import torchvision
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
    long-tailed training set get the larger norms: a positive correlation. None, with a
    note, on a balanced set, where every count is the same."""
    norms, labels = torch.as_tensor(norms).double().flatten().cpu(), torch.as_tensor(labels).flatten().cpu()
    num_classes = num_classes or int(labels.max()) + 1
    rows = []
    for c in range(num_classes):
        n = norms[labels == c]
        rows.append({"class": c, "count": len(n), "mean_norm": n.mean().item() if len(n) else None})
    full = [r for r in rows if r["count"]]
    counts = [r["count"] for r in full]
    out = {"classes": rows, **rank_correlation(counts, [r["mean_norm"] for r in full], "class counts", "mean norms")}
    if out["spearman"] is None and len(set(counts)) == 1:
        out["note"] = (f"no class frequency to correlate with: all {len(counts)} classes have {counts[0]} "
                       "training images (a balanced set)")
    return out


# ----------------------------------------------------------------------------- human confidence (Fig. 4, middle, right)
# CIFAR-N (Wei et al. 2021) relabelled every CIFAR training image by hand: CIFAR-10N's
# `aggre_label` is the majority of three annotators, CIFAR-100N's `noisy_label` one
# annotator's label. CIFAR-10H (Peterson et al. 2019) has ~50 human labels per CIFAR-10 test
# image, as the distribution `cifar10h-probs.npy`. Both are in the datasets' published order.
# Norms are binned as in `buckets`, divided by their maximum as the paper's text and axis
# say; the authors' notebook subtracts the minimum first, which stretches the bins when the
# smallest norm is far from 0.

HUMAN_FILES = {  # dataset -> (file, where it is published); each in that repository's data/ folder
    "cifar10": (("CIFAR-10_human.pt", "github.com/UCSC-REAL/cifar-10-100n"),
                ("cifar10h-probs.npy", "github.com/jcpeterson/cifar-10h")),
    "cifar100": (("CIFAR-100_human.pt", "github.com/UCSC-REAL/cifar-10-100n"),),
}
HUMAN_LABEL = {"cifar10": "aggre_label", "cifar100": "noisy_label"}  # as the paper's notebook reads them
# Bins holding fewer images are left out of the table's statistic and the figure: 50 for
# CIFAR-N and 10 for CIFAR-10H, as in the authors' notebook ("Norm as Accuracy.ipynb").
MIN_LABELS, MIN_ENTROPY = 50, 10


def check_human_run(run, excluded):
    """Refuse, in one sentence, a run whose training images are not CIFAR-10/100's in their
    published order: the human labels are indexed by that order."""
    dataset = run["dataset"]
    if dataset not in HUMAN_FILES:
        raise common.UsageError(f"--analyses human needs a cifar10 or cifar100 run (human labels exist only for "
                                f"those), but this one trained on {dataset}; drop human from --analyses")
    if run.get("subset") or excluded:
        flag = f"--subset {run['subset']}" if run.get("subset") else "--exclude-classes"
        raise common.UsageError(f"--analyses human needs the full {dataset} training set in its published order, "
                                f"but this run trained with {flag}; evaluate a run trained on all of {dataset}")


def human_paths(dataset, folder):
    """The human-label files of `dataset` in `folder`; a missing one is a one-sentence error
    that says where it is published."""
    paths = []
    for name, repo in HUMAN_FILES[dataset]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise common.UsageError(f"{name} not found in {folder}; download it from {repo} (its data/ folder) "
                                    f"into {folder}, or point --human-dir at the folder that holds it")
        paths.append(path)
    return paths


def numpy_label_globals():
    """All that torch.load(weights_only=True) must allow to rebuild an int64 numpy array
    written by torch.save, under the module names of numpy 1 (numpy.core, the published
    CIFAR-N files) and numpy 2 (numpy._core). Any other dtype, class or function in a file
    stays refused; nothing in it can run."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2 (and 1.26)
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return [(_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.int64))]  # the last is numpy.dtypes.Int64DType


def load_human_labels(path):
    """A CIFAR-10N / CIFAR-100N file: a torch.save'd dict of int64 numpy arrays (CIFAR-100N
    adds plain lists). Tensors and numpy's int64 arrays only (see numpy_label_globals)."""
    try:
        with torch.serialization.safe_globals(numpy_label_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([^']+)'>", str(e))  # what torch refused
        what = f" ({found.group(1) or found.group(2)})" if found else ""
        raise common.UsageError(f"{path} holds pickled objects other than integer label arrays{what}; refusing to "
                                "load it: download the published file again")
    except Exception:
        raise common.UsageError(f"{path} is not a readable torch file (truncated or corrupt?); download it again")
    if not isinstance(obj, dict):
        raise common.UsageError(f"{path} holds a {type(obj).__name__}, not the dict of label arrays CIFAR-N publishes; "
                                "download it again")
    return obj


def label_array(obj, key, path, n, num_classes):
    """obj[key] checked to be n integer labels in 0..num_classes-1, as an int64 tensor."""
    v = obj.get(key)
    if not isinstance(v, np.ndarray) or v.ndim != 1 or v.dtype.kind not in "iu" or len(v) != n:
        found = f"{v.dtype} array of shape {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
        raise common.UsageError(f"{path} should hold '{key}', {n} integer labels, but has {found}; "
                                "is it the file for this dataset?")
    if n and (v.min() < 0 or v.max() >= num_classes):
        raise common.UsageError(f"'{key}' in {path} has labels outside 0..{num_classes - 1}; "
                                "is it the file for the other CIFAR?")
    return torch.from_numpy(v.astype(np.int64))


def load_human_probs(path, n, num_classes=10):
    """CIFAR-10H's label distribution per test image: float (n, 10), rows summing to 1.
    np.load with allow_pickle=False: a file with pickled objects is refused."""
    try:
        p = np.load(path, allow_pickle=False)
    except Exception:
        raise common.UsageError(f"{path} is not a plain .npy array (truncated, or pickled objects?); download it again")
    if p.shape != (n, num_classes) or p.dtype.kind != "f":
        raise common.UsageError(f"{path} should hold {n} x {num_classes} floats (one label distribution per test "
                                f"image), but has {p.dtype} of shape {p.shape}; download it again")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-6):
        raise common.UsageError(f"the rows of {path} are not probability distributions; download it again")
    return torch.from_numpy(p.astype(np.float64))


def label_entropy(probs):
    """Base-2 entropy of each row of a label distribution (N, C), in bits (0 log 0 = 0):
    0 when every human gave the same label, log2(C) when they spread evenly."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    return -torch.special.xlogy(p, p).sum(dim=1) / math.log(2)


def binned(norms, values, bins=20, min_count=1):
    """Per bin of norm / max norm (norm_bins): its range, size and the mean of `values`,
    None where the bin holds fewer than min_count (the paper leaves such bins out)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    idx = norm_bins(norms, bins)
    rows = []
    for i in range(bins):
        v = values[idx == i]
        rows.append({"lo": i / bins, "hi": (i + 1) / bins, "count": len(v),
                     "mean": v.mean().item() if len(v) >= max(min_count, 1) else None})
    return rows


def binned_trend(norms, values, key, bins, min_count, y_name):
    """binned() with the mean named `key`, Spearman(bin, mean) over the bins kept and
    Spearman(norm, value) over all images."""
    rows = [{"lo": r["lo"], "hi": r["hi"], "count": r["count"], key: r["mean"]}
            for r in binned(norms, values, bins, min_count)]
    kept = [r for r in rows if r[key] is not None]
    return {"bins": rows, "min_count": min_count, "images": sum(r["count"] for r in rows),
            **rank_correlation([r["lo"] for r in kept], [r[key] for r in kept], f"norm bins of >= {min_count} images",
                               y_name),
            "spearman_images": spearman(norms, values)}


def human_agreement(norms, human, clean, bins=20, min_count=MIN_LABELS):
    """Fig. 4 middle: per bin of train norm / max norm, the fraction of images whose human
    (consensus) label is the clean label. If the norm encodes confidence, the images the
    network holds confidently are those humans label right: the fraction rises, rho > 0."""
    right = (torch.as_tensor(human).flatten() == torch.as_tensor(clean).flatten()).double()
    return {"fraction_correct": right.mean().item(),
            **binned_trend(norms, right, "fraction_correct", bins, min_count, "fractions correct")}


def human_entropy(norms, probs, bins=20, min_count=MIN_ENTROPY):
    """Fig. 4 right: per bin of test norm / max norm, the mean entropy (bits) of the human
    label distribution. Humans agree more on large-norm images: the entropy falls, rho < 0."""
    h = label_entropy(probs)
    return {"mean_entropy": h.mean().item(), **binned_trend(norms, h, "mean_entropy", bins, min_count, "entropies")}


def human_confidence(dataset, folder, train_norms, train_y, test_norms, test_y, bins=20):
    """Both panels for a cifar10 run, the CIFAR-100N one for cifar100: reads and checks the
    files in `folder` (the clean labels must be the run's train labels, in order) and bins
    the norms. Norms are of the training images for CIFAR-N, of the test images for 10H."""
    paths = human_paths(dataset, folder)
    train_y, test_y = torch.as_tensor(train_y).cpu(), torch.as_tensor(test_y).cpu()
    num_classes = {"cifar10": 10, "cifar100": 100}[dataset]
    obj = load_human_labels(paths[0])
    clean = label_array(obj, "clean_label", paths[0], len(train_y), num_classes)
    human = label_array(obj, HUMAN_LABEL[dataset], paths[0], len(train_y), num_classes)
    if not torch.equal(clean, train_y):
        raise common.UsageError(f"clean_label in {paths[0]} is not the {dataset} training labels in order "
                                f"({(clean != train_y).float().mean().item():.1%} differ); is it the file for this "
                                "dataset?")
    out = {"dataset": dataset, "labels": {"file": paths[0], "human_label": HUMAN_LABEL[dataset],
                      **human_agreement(train_norms, human, clean, bins)}}
    if dataset == "cifar10":
        probs = load_human_probs(paths[1], len(test_y))
        agree = (probs.argmax(1) == test_y).double().mean().item()
        if agree < 0.5:  # humans get ~95% of CIFAR-10 right; a shuffled file gets ~10%
            raise common.UsageError(f"the majority human label of {paths[1]} matches only {agree:.0%} of the cifar10 "
                                    "test labels; the file is not in CIFAR-10 test order, download it again")
        out["entropy"] = {"file": paths[1], **human_entropy(test_norms, probs, bins)}
    return out


# ----------------------------------------------------------------------------- opposite halves (App. C.2)

@torch.no_grad()
def positive_pair_cosines(model, x, augment, space, seed=0, batch_size=512):
    """cos(e1_i, e2_i) of the embeddings of two augmented views of each uint8 image x_i, in
    `space`. The views are drawn under their own seed, so the global random state is left
    as it was and the numbers repeat. BatchNorm uses its running statistics, as embed() does."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cos = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            batch = x[i: i + batch_size].to(device)
            x1, x2 = augment(batch), augment(batch)  # (B, 3, H, W) each, normalized
            with common.autocast(device):
                e1, e2 = common.features(model, x1, space), common.features(model, x2, space)
            cos.append(F.cosine_similarity(e1.float(), e2.float(), dim=1).cpu())  # (B,)
    model.train(was_training)
    return torch.cat(cos)


def opposite_halves(cos, threshold=0.0, bins=20):
    """Table S1: the fraction of positive pairs whose cosine is below `threshold`; at 0 the
    two embeddings lie in opposite half-spaces, the weakest form of the opposite-halves
    effect that would slow the cosine's convergence (Fig. 2a). Also the mean cosine and a
    histogram of the cosines in `bins` equal bins of [-1, 1]."""
    cos = torch.as_tensor(cos, dtype=torch.float64).flatten().cpu()
    below = cos < threshold
    idx = ((cos.clamp(-1, 1) + 1) / 2 * bins).long().clamp(0, bins - 1)  # cos = 1 joins the last bin
    return {"pairs": len(cos), "threshold": threshold, "opposite": int(below.sum()),
            "rate": below.double().mean().item(), "mean_cos": cos.mean().item(),
            "histogram": {"edges": [round(-1 + 2 * i / bins, 9) for i in range(bins + 1)],
                          "counts": torch.bincount(idx, minlength=bins).tolist()}}


# ----------------------------------------------------------------------------- training curves (--compare)

CURVES = ("loss", "emb_norm_mean", "feat_norm_mean", "knn_top1")


def read_metrics(path):
    """The per-epoch lines of a run folder's metrics.jsonl (or of that file itself). A
    resumed run may have logged an epoch twice; the later line wins. A damaged line (a run
    killed mid-write leaves half a line; a disk error, garbage) is skipped with one warning
    for the file, so the epochs that were logged can still be compared."""
    if not os.path.exists(path):
        raise common.UsageError(f"run {path} does not exist; pass run folders written by a method script")
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise common.UsageError(f"{path} has no metrics.jsonl; pass a run folder that has trained at least one epoch")
    lines, damaged = common.read_jsonl(file, valid=metrics_line, shown="epochs")
    if not lines:
        raise common.UsageError(f"{file} is empty; the run has not finished an epoch yet" if not damaged else
                                f"{file} has no readable metrics line ({len(damaged)} damaged); the file is damaged")
    rows = {row["epoch"]: row for row in lines}
    return [rows[e] for e in sorted(rows)]


def metrics_line(row):
    """A metrics line has an integer epoch and numbers (or null) for the curves."""
    number = (int, float, type(None))
    return (type(row.get("epoch")) is int
            and all(isinstance(row.get(k), number) and not isinstance(row.get(k), bool) for k in CURVES))


def run_label(path):
    """'simclr cut 3 power 1 wd 5e-4' from a run folder's args.json (or its last.pt), for
    legends that say what differs between runs; None where neither can be read."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    method = args = None
    try:
        with open(os.path.join(folder, "args.json")) as fh:
            saved = json.load(fh)
        method, args = saved["method"], saved["args"]
    except (OSError, ValueError, KeyError, TypeError):
        if os.path.isfile(os.path.join(folder, "last.pt")):
            try:
                ckpt = common.load_checkpoint(os.path.join(folder, "last.pt"))
                method, args = ckpt["method"], ckpt["args"]
            except (common.UsageError, KeyError):
                pass
    if not isinstance(args, dict):
        return None

    def g(key, default):  # a number from an untrusted file, or the method's default
        return f"{args[key]:g}" if isinstance(args.get(key), (int, float)) else f"{default:g}"
    return f"{method} cut {g('cut', 1)} power {g('power', 0)} wd {g('wd', 0)}"


def legend_labels(paths, names):
    """{name: label} for the runs compare() named from `paths`; runs whose settings are the
    same keep their folder name in brackets, so no two legend entries read alike."""
    labels = {name: run_label(p) or name for p, name in zip(paths, names)}
    counts = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {n: f"{label} [{n}]" if counts[label] > 1 and label != n else label for n, label in labels.items()}


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


def print_compare(runs, labels=None):
    """One table per run, then one summary line per run, all columns aligned."""
    labels = labels or {}
    for name, rows in runs.items():
        label = labels.get(name, name).removesuffix(f" [{name}]")  # the settings; the name is printed already
        print(f"== {name}" + (f"  ({label})" if label != name else "") + f"\n{'epoch':>6}"
              + "".join(f"{k:>15}" for k in CURVES))
        for r in rows:
            print(f"{r['epoch']:>6}" + "".join(fmt(r.get(k), width=15) for k in CURVES))
    w = max(len(name) for name in runs)
    print(f"{'run':<{w}} {'epochs':>6} {'last loss':>10} {'emb norm':>10} {'last k-NN':>10} {'best k-NN':>10}")
    for name, rows in runs.items():
        knn = [r["knn_top1"] for r in rows if r.get("knn_top1") is not None]
        print(f"{name:<{w}} {rows[-1]['epoch']:>6} {fmt(rows[-1].get('loss'))} {fmt(rows[-1].get('emb_norm_mean'))} "
              f"{fmt(knn[-1] if knn else None, '.2f')} {fmt(max(knn) if knn else None, '.2f')}")


# ----------------------------------------------------------------------------- figures
# Each figure_* function returns a matplotlib Figure, made without pyplot (no global state,
# no window, nothing to close), so tests can read its titles and labels. Every figure says
# what it shows, with units, the number of images behind each bar or point, and the
# headline statistic, or why there is none.

def new_figure(ncols=1, width=5.0, height=3.9):
    from matplotlib.figure import Figure  # optional: only draw_figures' callers reach this
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def set_title(ax, *lines):
    import textwrap
    ax.set_title("\n".join(textwrap.fill(line, 80) for line in lines if line), fontsize=8)


def stat_text(r, what="Spearman rho"):
    """'Spearman rho = 0.912', or the note that says why the statistic is undefined."""
    return f"{what} = {r['spearman']:.3f}" if r.get("spearman") is not None else r.get("note", "Spearman undefined")


def bar_counts(ax, bars, counts):
    """The number of images behind each bar, written on top of it."""
    ax.bar_label(bars, labels=[str(c) if c else "" for c in counts], fontsize=6, rotation=90, padding=2)


def in_space(r):
    return f" ({r['space']} features)" if r.get("space") else ""


def context(result):
    """'simclr epoch 512 on cifar10': which checkpoint a figure is about."""
    return f"{result['method']} epoch {result['epoch']} on {result['dataset']}" if "method" in result else ""


def figure_curves(runs, labels=None):
    from matplotlib.ticker import MaxNLocator
    labels = labels or {}
    fig, axes = new_figure(len(CURVES), width=4.6)
    names = {"loss": ("training loss", "loss (mean over the epoch's steps)"),
             "emb_norm_mean": ("embedding norm where the loss sees it", "mean ||z|| (L2 norm)"),
             "feat_norm_mean": ("backbone feature norm", "mean ||h|| (L2 norm)"),
             "knn_top1": ("k-NN top-1 on the test set", "top-1 accuracy (%)")}
    for ax, key in zip(axes, CURVES):
        for name, rows in runs.items():
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            knn = [(r["knn_top1"], r["epoch"]) for r in rows if r.get("knn_top1") is not None]
            best = f": best k-NN {max(knn)[0]:.1f}% (epoch {max(knn)[1]})" if knn else ": no k-NN logged"
            if pts:
                ax.plot(*zip(*pts), marker=".", label=labels.get(name, name) + best)
        ax.set(xlabel="epoch (passes over the training set)", ylabel=names[key][1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        set_title(ax, names[key][0])
    (axes[-1] if axes[-1].has_data() else axes[0]).legend(fontsize=6)  # on the k-NN panel where there is one
    fig.suptitle(f"training curves of {len(runs)} run{'s' * (len(runs) > 1)}, one point per logged epoch", fontsize=9)
    return fig


def figure_buckets(r, ctx=""):
    fig, (ax,) = new_figure()
    full = [b for b in r["bins"] if b["count"]]
    bars = ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=1 / len(r["bins"]), align="edge",
                  edgecolor="white")
    bar_counts(ax, bars, [b["count"] for b in full])
    n = sum(b["count"] for b in full)
    top1 = sum(b["accuracy"] * b["count"] for b in full) / max(n, 1)
    ax.set(xlabel="test embedding norm / max test norm (ratio)", ylabel="k-NN top-1 accuracy (%)", xlim=(0, 1),
           ylim=(0, 118))
    set_title(ax, f"k-NN top-1 per norm bin{in_space(r)}; numbers: test images per bin", ctx,
              f"{stat_text(r)}; overall top-1 {top1:.1f}% of {n} images")
    return fig


def figure_novelty(r, ctx=""):
    fig, (ax,) = new_figure()
    sets = r["sets"]
    bars = ax.bar(range(len(sets)), [v["relative"] for v in sets.values()])
    ax.bar_label(bars, labels=["" if v["auroc"] is None else f"AUROC {v['auroc']:.2f}" for v in sets.values()],
                 fontsize=6, padding=2)
    ax.set_xticks(range(len(sets)), [f"{k}\nn={v['count']}" for k, v in sets.items()], fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="image set (n: images)", ylabel="mean norm / train mean norm (ratio)",
           ylim=(0, 1.2 * max([v["relative"] for v in sets.values()] + [1.0])))
    set_title(ax, f"mean embedding norm per image set{in_space(r)}", ctx,
              "AUROC: how well the norm tells test images from each set (0.5: not at all, 1: always)")
    return fig


def figure_classes(r, ctx=""):
    from matplotlib.ticker import MaxNLocator
    fig, (ax,) = new_figure()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # image counts are whole numbers
    full = [c for c in r["classes"] if c["count"]]
    ax.scatter([c["count"] for c in full], [c["mean_norm"] for c in full], s=12)
    ax.set(xlabel="training images in the class (count)", ylabel="mean train embedding norm (L2 norm)")
    set_title(ax, f"mean norm per class{in_space(r)}; {len(full)} classes, n = each point's x value", ctx,
              stat_text(r, "Spearman rho (frequency, norm)"))
    return fig


def figure_human(r, ctx=""):
    parts = [k for k in ("labels", "entropy") if k in r]
    fig, axes = new_figure(len(parts))
    for ax, key in zip(axes, parts):
        p = r[key]
        y, scale = ("fraction_correct", 100.0) if key == "labels" else ("mean_entropy", 1.0)
        kept = [b for b in p["bins"] if b[y] is not None]
        bars = ax.bar([b["lo"] for b in kept], [scale * b[y] for b in kept], width=1 / len(p["bins"]), align="edge",
                      edgecolor="white")
        bar_counts(ax, bars, [b["count"] for b in kept])
        if key == "labels":
            name = {"cifar10": "CIFAR-10N", "cifar100": "CIFAR-100N"}.get(r.get("dataset"), "CIFAR-N")
            ax.set(xlabel="train embedding norm / max train norm (ratio)", ylabel="human label correct (%)",
                   xlim=(0, 1), ylim=(0, 118))
            what = f"{name}: is the human label ({p['human_label']}) the clean one?" if "human_label" in p else name
            headline = f"{stat_text(p)}; {100 * p['fraction_correct']:.1f}% correct of {p['images']} train images"
        else:
            top = max([scale * b[y] for b in kept] + [0.1])
            ax.set(xlabel="test embedding norm / max test norm (ratio)", ylabel="entropy of the human labels (bits)",
                   xlim=(0, 1), ylim=(0, 1.3 * top))
            what = "CIFAR-10H: how much do the human labels disagree?"
            headline = f"{stat_text(p)}; mean {p['mean_entropy']:.3f} bits over {p['images']} test images"
        set_title(ax, f"{what}{in_space(r)}", ctx, f"{headline}; bins of >= {p['min_count']} images, numbers: images")
    return fig


def figure_opposite(r, ctx=""):
    fig, (ax,) = new_figure()
    edges, counts = r["histogram"]["edges"], r["histogram"]["counts"]
    bars = ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", edgecolor="white")
    bar_counts(ax, bars, counts)
    ax.axvline(r["threshold"], color="tab:red", lw=1, label=f"threshold cos = {r['threshold']:g}")
    ax.legend(fontsize=7, loc="upper left")
    ax.set(xlabel="cosine of the two views' embeddings (unitless)", ylabel="positive pairs (count)", xlim=(-1, 1),
           ylim=(0, 1.2 * max(counts + [1])))
    set_title(ax, f"two augmented views of each test image{in_space(r)}", ctx,
              f"opposite-halves rate {100 * r['rate']:.1f}% ({r['opposite']} of {r['pairs']} pairs below cos "
              f"{r['threshold']:g}); mean cos {r['mean_cos']:.3f}")
    return fig


def figure_prototypes(r, ctx=""):
    from matplotlib.image import imread
    img = imread(r["png"])  # the grid prototypes() saved: 2 px padding around every tile
    rows = len(r["indices"])
    fig, (ax,) = new_figure(width=7.0, height=min(1.4 + 6.4 * img.shape[0] / img.shape[1], 40))
    ax.imshow(img)
    tile = (img.shape[0] - 2) / rows  # a tile and its padding
    counts = r.get("counts") or [None] * rows
    ax.set_yticks([2 + tile * (c + 0.5) - 1 for c in range(rows)],
                  [f"{c}" + (f" (n={n})" if n is not None else "") for c, n in enumerate(counts)],
                  fontsize=7 if rows <= 20 else 4)
    ax.set_xticks([])
    ax.set_xlabel("<- the 10 largest norms | the 10 smallest norms -> (one tile per image)", fontsize=8)
    ax.set_ylabel("class (n: its training images)", fontsize=8)
    set_title(ax, f"largest- and smallest-norm training images per class{in_space(r)}", ctx)
    return fig


FIGURES = {"buckets": figure_buckets, "novelty": figure_novelty, "classes": figure_classes,
           "human": figure_human, "opposite": figure_opposite, "prototypes": figure_prototypes}


def draw_figures(result, folder):
    """Save a PNG of each figure `result` holds into `folder`; returns their paths. matplotlib
    is optional: without it this writes nothing and returns None."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    figures = {}
    if "runs" in result:
        figures["curves.png"] = figure_curves(result["runs"], result.get("labels"))
    for name, r in result.get("analyses", {}).items():
        if name in FIGURES:
            file = f"{name}.png"
            if name == "prototypes" and os.path.abspath(r["png"]) == os.path.abspath(os.path.join(folder, file)):
                file = "prototypes-figure.png"  # keep the plain grid the user asked for there
            figures[file] = FIGURES[name](r, context(result))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for file, fig in figures.items():
        paths.append(os.path.join(folder, file))
        fig.savefig(paths[-1], dpi=120)
    return paths


# ----------------------------------------------------------------------------- command line

def parse_analyses(text, everything, default_space):
    """'buckets,probe:backbone' -> {name: space}; --all adds the analyses in ALL at --space.
    An analysis named without a space gets --space, or its own (OWN_SPACE) if it has one."""
    chosen = {name: default_space for name in (ALL if everything else ("knn",))}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        name, _, space = item.partition(":")
        if name not in ANALYSES:
            raise common.UsageError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
        if space and space not in SPACES:
            raise common.UsageError(f"unknown space {space!r} in --analyses {item}; choose from {', '.join(SPACES)}")
        chosen[name] = space or OWN_SPACE.get(name, default_space)
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
    device, _ = common.pick_device(a.device)
    model, ckpt = load_model(a.checkpoint, device)
    run = ckpt["args"]
    # A run trained without some classes (--exclude-classes) is evaluated as it was trained:
    # on the other classes; the left-out classes' test images are the truly novel set.
    excluded = common.parse_classes(run.get("exclude_classes", "")) or []
    if excluded and heldout and heldout != excluded:
        raise common.UsageError(f"this run was trained without classes {','.join(map(str, excluded))}; "
                                "--heldout-classes may only repeat those (or be left out)")
    human_dir = a.human_dir or a.data_dir or run["data_dir"]
    if "human" in chosen:  # before the dataset is loaded: these refusals cost nothing
        check_human_run(run, excluded)
        human_paths(run["dataset"], human_dir)
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
        print(f"Spearman(norm bin, accuracy) = {fmt(r['spearman'], '.3f', 0)}" + note(r))

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
        out["prototypes"] = {"space": s, "png": png, "indices": idx.tolist(),
                             "counts": torch.bincount(data.train_y.cpu(), minlength=data.num_classes).tolist()}
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
        print(f"Spearman(class frequency, mean norm) = {fmt(r['spearman'], '.3f', 0)}" + note(r))

    if "human" in chosen:
        s = chosen["human"]
        r = out["human"] = {"space": s, **human_confidence(run["dataset"], human_dir, norms("train", s), data.train_y,
                                                           norms("test", s), data.test_y, a.bins)}
        p = r["labels"]
        print(f"\nhuman labels vs norm ({s} features; norm / max norm, {a.bins} bins)\n{p['file']}: "
              f"{p['human_label']} equals clean_label for {100 * p['fraction_correct']:.2f}% of the "
              f"{p['images']} train images; bins of < {p['min_count']} images are left out")
        print(f"{'norm bin':>11} {'images':>7} {'correct (%)':>11}")
        for row in p["bins"]:
            value = None if row["fraction_correct"] is None else 100 * row["fraction_correct"]
            print(f"{row['lo']:>5.2f}-{row['hi']:<5.2f} {row['count']:>7} {fmt(value, '.2f', 11)}")
        print(f"Spearman(norm bin, correct) = {fmt(p['spearman'], '.3f', 0)}{note(p)}; "
              f"per image: {fmt(p['spearman_images'], '.3f', 0)}")
        if "entropy" in r:
            p = r["entropy"]
            print(f"\n{p['file']}: mean entropy of the human labels {p['mean_entropy']:.3f} bits over the "
                  f"{p['images']} test images; bins of < {p['min_count']} images are left out")
            print(f"{'norm bin':>11} {'images':>7} {'entropy (bits)':>14}")
            for row in p["bins"]:
                print(f"{row['lo']:>5.2f}-{row['hi']:<5.2f} {row['count']:>7} {fmt(row['mean_entropy'], '.3f', 14)}")
            print(f"Spearman(norm bin, entropy) = {fmt(p['spearman'], '.3f', 0)}{note(p)}; "
                  f"per image: {fmt(p['spearman_images'], '.3f', 0)}")

    if "opposite" in chosen:
        s = chosen["opposite"]
        # The SimCLR / SimSiam CIFAR recipe (common.Augment's defaults) for both views, as
        # simclr.py and simsiam.py train; byol.py and moco.py --version v3 train with an
        # asymmetric pair, which this does not reproduce.
        augment = common.Augment(data.size, tuple(mean), tuple(std))
        cos = positive_pair_cosines(model, data.test_x, augment, s, a.seed)
        r = out["opposite"] = {"space": s, "views": "common.Augment defaults, seed " + str(a.seed),
                               **opposite_halves(cos, a.opposite_cos)}
        print(f"\nopposite halves ({s} features; two augmented views of each of the {r['pairs']} test images): "
              f"{100 * r['rate']:.2f}% of positive pairs have cos < {a.opposite_cos:g} ({r['opposite']} pairs); "
              f"mean cos {r['mean_cos']:.4f}")
    return result


def note(r):
    """'  (why the statistic is undefined)', or nothing where it is defined."""
    return f"  ({r['note']})" if r.get("note") else ""


def main(argv=None):
    p = argparse.ArgumentParser(description="Weighted k-NN top-1 and the embedding-norm analyses of a checkpoint, "
                                "or the training curves of several runs (--compare).",
                                formatter_class=common.HelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a last.pt or epoch<N>.pt written by one of the method scripts")
    p.add_argument("--k", type=int, default=200, help="neighbours that vote")
    p.add_argument("--t", type=float, default=0.1, help="temperature of the exp(sim / T) vote weights")
    p.add_argument("--space", default="backbone", choices=SPACES,
                   help="features for every analysis without its own: backbone h, projector z, predictor p, "
                        "or loss (where the loss sees the embedding: the predictor if the method has one, "
                        "else the projector; the paper measures norms there)")
    p.add_argument("--analyses", default=None, help="comma-separated NAME[:SPACE] from " + ", ".join(ANALYSES))
    p.add_argument("--all", action="store_true",
                   help="run " + ", ".join(ALL) + " (at --space, unless --analyses gives one its own); human and "
                        "opposite run only when named in --analyses")
    p.add_argument("--bins", type=int, default=20, help="buckets, human: equal-width bins of norm / max norm")
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
    p.add_argument("--human-dir", default=None,
                   help="human: folder with CIFAR-10_human.pt and cifar10h-probs.npy (cifar10) or CIFAR-100_human.pt "
                        "(cifar100), from github.com/UCSC-REAL/cifar-10-100n and github.com/jcpeterson/cifar-10h "
                        "(their data/ folders); None: --data-dir, else the run's data folder")
    p.add_argument("--opposite-cos", type=float, default=0.0,
                   help="opposite: count a positive pair when the cosine of its two embeddings is below this "
                        "(0: opposite half-spaces, the paper's weakest form of the effect)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the noise images, the probe's batch order and the opposite views")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                   help="instead of a checkpoint: run folders (or their metrics.jsonl); prints each run's per-epoch "
                        "loss, norms and k-NN top-1, then a summary line per run")
    p.add_argument("--figures", default=None, help="folder for PNG figures (only where matplotlib is installed)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the one the run used)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else the CPU)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = p.parse_args(argv)
    if a.k < 1 or not (a.t > 0 and math.isfinite(a.t)) or a.bins < 1 or a.probe_epochs < 0 \
            or not -1 <= a.opposite_cos <= 1:
        p.error("--k, --bins must be >= 1, --t must be positive and finite, --probe-epochs >= 0 and "
                "--opposite-cos in [-1, 1]")
    if a.checkpoint and os.path.isdir(a.checkpoint):  # a run folder stands for its last.pt
        a.checkpoint = os.path.join(a.checkpoint, "last.pt")
    inputs = [a.checkpoint, *(a.compare or [])]
    for flag, path in (("--json", a.json), ("--prototypes-out", a.prototypes_out)):
        check_output(flag, path, inputs)
    if a.figures and os.path.exists(a.figures) and not os.path.isdir(a.figures):
        raise common.UsageError(f"--figures {a.figures} is a file; give a folder for the PNGs")
    if a.compare:
        if a.checkpoint:
            raise common.UsageError("give either a checkpoint or --compare RUN [RUN ...], not both")
        runs = compare(a.compare)
        result = {"runs": runs, "labels": legend_labels(a.compare, list(runs))}
        print_compare(runs, result["labels"])
    elif not a.checkpoint:
        raise common.UsageError("give a checkpoint to evaluate, or --compare RUN [RUN ...] to compare training runs")
    else:
        result = evaluate(a)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(plain(result), fh, indent=1)
        print(f"numbers: {a.json}")
    if a.figures:
        written = draw_figures(result, a.figures)
        if written is None:
            print("note: matplotlib is not installed, so no figures were drawn; the numbers are above "
                  "(pip install matplotlib)", file=sys.stderr)
        for path in written or []:
            print(f"figure: {path}")
    return result


def check_output(flag, path, inputs):
    """Refuse, before any work, an output path that would overwrite an input, a checkpoint or
    a run's own files, or that cannot be written."""
    if not path:
        return
    real = os.path.realpath(path)
    if any(i and os.path.realpath(i) == real for i in inputs) or path.endswith(".pt") \
            or os.path.basename(path) in ("metrics.jsonl", "args.json"):
        raise common.UsageError(f"{flag} {path} would overwrite a checkpoint or a run's own file; choose another name")
    if os.path.isdir(path):
        raise common.UsageError(f"{flag} {path} is a folder; give a file name")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise common.UsageError(f"{flag} {path}: cannot write into {folder}; create it or choose another path")


if __name__ == "__main__":
    common.cli(main)
