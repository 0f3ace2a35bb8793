"""Plumbing shared by the method scripts: arguments, datasets, GPU augmentation,
backbones, cut-initialization, the lr schedule, checkpoints and the training loop.

The methods themselves (heads, losses, stop-gradients, EMA, queues) live in their own
scripts; nothing in this file knows what SimCLR or BYOL is.
"""
import argparse
import dataclasses
import datetime
import gzip
import json
import math
import os
import pickle
import random
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

FORMAT = "normssl-1"  # marks checkpoints and run folders written by this project


class UsageError(Exception):
    """Bad input from the user: printed as one sentence, exit status 2."""


def cli(main):
    """Run main(); a UsageError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last completed epoch is in last.pt", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- arguments

def arg(default, help, choices=None):
    """A dataclass field whose help text becomes the --help line of its flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


DATASETS = ("cifar10", "cifar100", "cifar10-lt", "cifar100-lt", "fashionmnist", "fashionmnist-lt",
            "tinyimagenet", "imagenet100", "flowers102", "synthetic")


@dataclass
class Args:
    """Flags every method shares; each script subclasses this and changes defaults."""
    dataset: str = arg("cifar10", "training data", DATASETS)
    data_dir: str = arg("data", "where the dataset lives (or is downloaded to)")
    download: bool = arg(False, "download the dataset with torchvision if it is missing (needs internet)")
    subset: int = arg(0, "use only the first N train and N test images (0: all); for quick checks")
    exclude_classes: str = arg("", "comma-separated classes to train without, e.g. 5,6,7,8,9: their images leave "
                                   "both splits (k-NN included), and eval_knn.py's novelty analysis compares "
                                   "their test images, never seen, with the rest (paper Fig. 3)")
    arch: str = arg("resnet18", "backbone", ("resnet18", "resnet50", "vit_tiny", "vit_small"))
    epochs: int = arg(512, "training epochs (the embedding-norms paper trains 512)")
    batch_size: int = arg(512, "images per step (each gives two views)")
    accum: int = arg(1, "split each batch into this many accumulated micro-batches")
    optimizer: str = arg("sgd", "optimizer", ("sgd", "adam", "adamw"))
    lr: float = arg(0.3, "base learning rate per 256 images; the peak lr is lr * batch_size / 256")
    wd: float = arg(1e-6, "weight decay")
    momentum: float = arg(0.9, "SGD momentum")
    warmup: int = arg(10, "epochs of linear lr warmup before the cosine decay")
    cut: float = arg(1.0, "cut-initialization constant c: every initial weight is divided by c (1: off)")
    power: float = arg(0.0, "GradScale power p: scale each embedding's gradient by ||z||^p (0: off); "
                        "p != 0 also sets --warmup 100 and --lr to a sixth of its default, each unless typed "
                        "(the paper's GradScale schedule)")
    knn_every: int = arg(10, "evaluate k-NN top-1 every N epochs (and after the last); 0: only at the end")
    save_every: int = arg(50, "keep a copy of the checkpoint as epoch<N>.pt every N epochs (0: never)")
    seed: int = arg(0, "random seed (data order, augmentations, initialization)")
    out: str = arg("", "run folder (default: runs/<method>-<dataset>-<timestamp>)")
    resume: str = arg("", "continue a run from its checkpoint: a path to last.pt, or 'auto' with --out")
    device: str = arg("auto", "cpu, cuda, cuda:N or auto (cuda when available)")


# Flags that may change when resuming without changing what is being trained.
RESUME_SAFE = {"epochs", "knn_every", "save_every", "device", "data_dir", "download", "resume", "out"}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(cls, doc, argv=None):
    """Build a parser from a dataclass of flags; returns (a filled instance, the names of
    the flags given on the command line) so that resuming can tell them from defaults."""
    parser = Parser(description=doc.split("\n\n")[0] if doc else None,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=meta.get("help"))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                choices=meta.get("choices"), help=meta.get("help"))
    args = cls(**vars(parser.parse_args(argv)))
    problem = validate(args)
    if problem:
        parser.error(problem)
    for action in parser._actions:  # parse again without defaults: what is left was typed
        action.default = argparse.SUPPRESS
    args.given = set(vars(parser.parse_args(argv)))
    return args


def validate(args):
    """Return a sentence describing the first invalid flag value, or None."""
    checks = [
        (args.cut > 0, f"--cut must be positive (got {args.cut}); use 1 to turn cut-initialization off"),
        (args.epochs >= 0, f"--epochs must be >= 0 (got {args.epochs})"),
        (args.batch_size > 0, f"--batch-size must be positive (got {args.batch_size})"),
        (args.accum > 0 and args.batch_size % args.accum == 0,
         f"--batch-size {args.batch_size} must be a multiple of --accum {args.accum}"),
        (args.lr > 0, f"--lr must be positive (got {args.lr})"),
        (args.wd >= 0, f"--wd must be >= 0 (got {args.wd})"),
        (args.warmup >= 0, f"--warmup must be >= 0 (got {args.warmup})"),
        (args.subset >= 0, f"--subset must be >= 0 (got {args.subset})"),
        (args.knn_every >= 0 and args.save_every >= 0, "--knn-every and --save-every must be >= 0"),
        (parse_classes(args.exclude_classes) is not None,
         f"--exclude-classes {args.exclude_classes!r} must be class numbers separated by commas, such as 5,6,7"),
    ]
    for ok, message in checks:
        if not ok:
            return message
    return None


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but this machine has no CUDA GPU; use --device cpu")
    return device


def autocast(device):
    """bf16 autocast on CUDA, plain fp32 on the CPU: one code path for both."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- datasets

@dataclass
class Data:
    """A dataset as uint8 images (N, 3, H, W) and int64 labels (N,)."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def size(self):
        return self.train_x.shape[-1]

    def to(self, device):
        return dataclasses.replace(self, **{k: getattr(self, k).to(device)
                                            for k in ("train_x", "train_y", "test_x", "test_y")})


# Long-tailed train splits (embedding-norms paper, Sec. 7): class i keeps int(n * base**-i).
LONG_TAIL = {"cifar10-lt": 1.5, "cifar100-lt": 1.03365, "fashionmnist-lt": 1.5}


def long_tail_indices(labels, base):
    """Indices that keep the first int(n_max * base**-i) images of class i, in original order."""
    labels = torch.as_tensor(labels)
    n_max = int(torch.bincount(labels).max())
    keep = []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[: int(n_max * base ** -c)])
    return torch.cat(keep).sort().values


def load_dataset(name, data_dir, download=False, subset=0):
    """Load a dataset by name; any missing or malformed file raises UsageError."""
    loaders = {"cifar10": _cifar, "cifar100": _cifar, "fashionmnist": _fashionmnist,
               "tinyimagenet": _tinyimagenet, "imagenet100": _imagenet100, "flowers102": _flowers102,
               "synthetic": _synthetic}
    base = name[:-3] if name in LONG_TAIL else name
    if base not in loaders:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    (train_x, train_y), (test_x, test_y) = loaders[base](base, data_dir, download)
    if name in LONG_TAIL:
        keep = long_tail_indices(train_y, LONG_TAIL[name])
        train_x, train_y = train_x[keep], train_y[keep]
    if subset:
        train_x, train_y, test_x, test_y = train_x[:subset], train_y[:subset], test_x[:subset], test_y[:subset]
    return Data(name, train_x.contiguous(), train_y.long(), test_x.contiguous(), test_y.long(),
                num_classes=int(max(train_y.max(), test_y.max())) + 1)


def parse_classes(text):
    """'5, 6,7' -> [5, 6, 7] (sorted, without repeats); '' -> []; None if it is not such a list."""
    try:
        return sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        return None


def drop_classes(data, classes, flag="--exclude-classes"):
    """Leave `classes` out of both splits, as if the dataset never had them (the labels
    keep their numbers); returns (the rest, the test images of the left-out classes)."""
    if not classes:
        return data, data.test_x[:0]
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise UsageError(f"{flag} {bad[0]} is not a class of {data.name}, "
                         f"whose classes are 0 to {data.num_classes - 1}")
    out_train = torch.isin(data.train_y, torch.tensor(classes, device=data.train_y.device))
    out_test = torch.isin(data.test_y, torch.tensor(classes, device=data.test_y.device))
    if out_train.all() or out_test.all():
        raise UsageError(f"{flag} {','.join(map(str, classes))} leaves no images to train or test on; "
                         "leave out fewer classes")
    rest = dataclasses.replace(data, train_x=data.train_x[~out_train], train_y=data.train_y[~out_train],
                               test_x=data.test_x[~out_test], test_y=data.test_y[~out_test])
    return rest, data.test_x[out_test]


def _missing(what, path, how):
    return UsageError(f"{what} not found in {path}; {how}")


def _cifar(name, data_dir, download):
    folder, train_files, test_files, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
    }[name]
    root = os.path.join(data_dir, folder)
    if download and not os.path.isdir(root):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(data_dir, download=True)

    def read(files):
        xs, ys = [], []
        for f in files:
            path = os.path.join(root, f)
            if not os.path.exists(path):
                raise _missing(f"{name} file {f}", root,
                               f"pass --download, or put the extracted '{folder}' folder under --data-dir")
            try:
                with open(path, "rb") as fh:
                    batch = pickle.load(fh, encoding="latin1")
                # The keys are bytes or str depending on how the pickle is decoded.
                batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
                xs.append(torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)))
                ys.append(torch.tensor(batch[key]))
            except Exception as e:
                raise UsageError(f"{path} is not a valid {name} batch file ({type(e).__name__}); "
                                 "delete it and download again")
        return torch.cat(xs), torch.cat(ys)

    return read(train_files), read(test_files)


def read_idx(path):
    """Read an idx file (the MNIST format), gzipped or not, as a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
        if zero != 0 or dtype != 0x08 or len(raw) != 4 + 4 * ndim + math.prod(dims):
            raise ValueError("bad header or length")
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise UsageError(f"{path} is not a valid idx file ({e}); delete it and fetch it again")
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def _fashionmnist(name, data_dir, download):
    # Accept the idx files directly in data_dir (e.g. Debian's /usr/share/datasets/fashion-mnist)
    # or in torchvision's layout data_dir/FashionMNIST/raw.
    folders = [data_dir, os.path.join(data_dir, "FashionMNIST", "raw")]
    if download and not any(os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")) for d in folders):
        torchvision.datasets.FashionMNIST(data_dir, download=True)

    def find(stem):
        for d in folders:
            for suffix in ("", ".gz"):
                if os.path.exists(os.path.join(d, stem + suffix)):
                    return os.path.join(d, stem + suffix)
        raise _missing(f"Fashion-MNIST file {stem}", " or ".join(folders),
                       "install it with 'apt-get install dataset-fashion-mnist' and pass "
                       "--data-dir /usr/share/datasets/fashion-mnist, or pass --download")

    def images(stem):
        x = read_idx(find(stem))  # (N, 28, 28)
        # Pad 28 -> 32 so the CIFAR pipeline applies unchanged; grey -> 3 channels.
        return F.pad(x, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1)

    return ((images("train-images-idx3-ubyte"), read_idx(find("train-labels-idx1-ubyte"))),
            (images("t10k-images-idx3-ubyte"), read_idx(find("t10k-labels-idx1-ubyte"))))


def _load_images(paths, size):
    """Decode image files in parallel, resize the short side to `size` and centre-crop a square."""
    from PIL import Image

    def one(path):
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return torch.stack(list(pool.map(one, paths))) if paths else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def _cached(cache_path, build):
    """Decode a folder dataset once and keep it as a uint8 tensor file next to the data."""
    if os.path.exists(cache_path):
        try:
            d = torch.load(cache_path, weights_only=True)
            return (d["train_x"], d["train_y"]), (d["test_x"], d["test_y"])
        except Exception:
            print(f"warning: ignoring unreadable cache {cache_path}; decoding the images again", file=sys.stderr)
    (train_x, train_y), (test_x, test_y) = build()
    try:
        save_atomic(dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y), cache_path)
    except OSError as e:
        print(f"warning: could not write the cache {cache_path} ({e}); decoding again next time", file=sys.stderr)
    return (train_x, train_y), (test_x, test_y)


IMAGE_EXT = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


def _class_folders(root, classes=None):
    """Paths and labels of root/<class>/**/<image>; classes sorted by name unless given."""
    classes = classes or sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            for f in sorted(files):
                if f.endswith(IMAGE_EXT):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    return paths, torch.tensor(labels, dtype=torch.long), classes


def _tinyimagenet(name, data_dir, download):
    root = data_dir if os.path.exists(os.path.join(data_dir, "wnids.txt")) else os.path.join(data_dir, "tiny-imagenet-200")
    how = "download tiny-imagenet-200.zip from the CS231n site and unzip it under --data-dir"
    for need in ("wnids.txt", "train", os.path.join("val", "val_annotations.txt")):
        if not os.path.exists(os.path.join(root, need)):
            raise _missing(f"Tiny-ImageNet '{need}'", root, how)

    def build():
        with open(os.path.join(root, "wnids.txt")) as fh:
            wnids = sorted(line.strip() for line in fh if line.strip())
        train_paths, train_y, _ = _class_folders(os.path.join(root, "train"), wnids)
        index = {w: i for i, w in enumerate(wnids)}
        val_paths, val_y = [], []
        with open(os.path.join(root, "val", "val_annotations.txt")) as fh:
            for line in fh:
                parts = line.split("\t")
                if len(parts) < 2 or parts[1] not in index:
                    raise UsageError(f"malformed line in {root}/val/val_annotations.txt: {line.strip()!r}")
                val_paths.append(os.path.join(root, "val", "images", parts[0]))
                val_y.append(index[parts[1]])
        return ((_load_images(train_paths, 64), train_y),
                (_load_images(val_paths, 64), torch.tensor(val_y, dtype=torch.long)))

    return _cached(os.path.join(root, "normssl_cache_64.pt"), build)


def _imagenet100(name, data_dir, download):
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise _missing(f"ImageNet-100 folder '{split}'", data_dir,
                           "arrange the 100 classes as <data-dir>/train/<class>/*.JPEG and <data-dir>/val/<class>/*.JPEG")

    def build():
        train_paths, train_y, classes = _class_folders(os.path.join(data_dir, "train"))
        val_paths, val_y, _ = _class_folders(os.path.join(data_dir, "val"), classes)
        print(f"decoding {len(train_paths) + len(val_paths)} ImageNet-100 images once to 128 px...", file=sys.stderr)
        return (_load_images(train_paths, 128), train_y), (_load_images(val_paths, 128), val_y)

    return _cached(os.path.join(data_dir, "normssl_cache_128.pt"), build)


def _flowers102(name, data_dir, download):
    root = data_dir if os.path.exists(os.path.join(data_dir, "setid.mat")) else os.path.join(data_dir, "flowers-102")
    if download and not os.path.exists(os.path.join(root, "setid.mat")):
        torchvision.datasets.Flowers102(data_dir, download=True)
    for need in ("jpg", "imagelabels.mat", "setid.mat"):
        if not os.path.exists(os.path.join(root, need)):
            raise _missing(f"Flowers-102 '{need}'", root, "pass --download, or unpack 102flowers.tgz, "
                           "imagelabels.mat and setid.mat into <data-dir>/flowers-102")
    try:
        from scipy.io import loadmat  # .mat files need scipy; it is optional for everything else
    except ImportError:
        raise UsageError("flowers102 needs scipy to read its .mat label files; run 'pip install scipy'")

    def build():
        labels = torch.tensor(loadmat(os.path.join(root, "imagelabels.mat"))["labels"].flatten() - 1)
        ids = loadmat(os.path.join(root, "setid.mat"))
        # The paper trains on the 6,149-image 'test' split (long-tailed) and evaluates on 'val'.
        split = {k: torch.tensor(ids[k].flatten().astype(np.int64)) for k in ("tstid", "valid")}

        def images(idx):
            return _load_images([os.path.join(root, "jpg", f"image_{i:05d}.jpg") for i in idx.tolist()], 128)

        return ((images(split["tstid"]), labels[split["tstid"] - 1].long()),
                (images(split["valid"]), labels[split["valid"] - 1].long()))

    return _cached(os.path.join(root, "normssl_cache_128.pt"), build)


def _synthetic(name, data_dir, download, n_train=256, n_test=128, classes=4, size=16):
    """Tiny images for tests and smoke runs: each class has its own colour and stripe
    orientation. 16 px keeps a ResNet-18 step on a CPU well under a second."""
    g = torch.Generator().manual_seed(1234)
    colours = torch.rand(classes, 3, 1, 1, generator=g)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")

    def make(n):
        y = torch.arange(n) % classes
        angle = y.float() * math.pi / classes
        stripes = torch.sin((xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]) * 0.8)
        img = colours[y] * (0.6 + 0.4 * stripes[:, None]) + 0.15 * torch.randn(n, 3, size, size, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), y

    return make(n_train), make(n_test)


def channel_stats(x):
    """Per-channel mean and std of uint8 images (N, 3, H, W) in [0, 1], from up to 10k images."""
    x = x[:10000].float() / 255
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def normalize(x, mean, std):
    """uint8 (B, 3, H, W) -> float, standardized per channel, no augmentation."""
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


# ----------------------------------------------------------------------------- augmentation
# Everything below works on a whole batch at once on the data's device, with one random
# draw per image: no DataLoader, no CPU workers, no Python loop over samples. Each op
# follows the semantics of torchvision's transform of the same name (tests compare them).

GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision uses


def sample_crops(n, height, width, scale, ratio, device):
    """Per-image RandomResizedCrop boxes (top, left, h, w), each (n,), torchvision's algorithm:
    up to 10 tries of a random area fraction and log-uniform aspect ratio, else a centre crop."""
    tries = 10
    area = height * width * torch.empty(n, tries, device=device).uniform_(*scale)
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(dim=1, keepdim=True)  # index of the first try that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # Fallback when no try fits: the whole image, clipped to the allowed aspect range.
    in_ratio = width / height
    fw, fh = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height)
    found = ok.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return top, left, h, w


def resized_crop(x, top, left, h, w, size, flip=None):
    """Crop box i of image i (all (B,) tensors) and resize it bilinearly to size x size;
    mirror horizontally where flip is True. x: float (B, C, H, W)."""
    B, C, H, W = x.shape
    steps = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size  # output pixel centres
    # Source coordinates in pixels, as torchvision's resize computes them (half-pixel
    # centres), clamped to the crop so its edge pixels repeat instead of its neighbours.
    xs = (left[:, None] + steps * w[:, None] - 0.5).clamp(min=left[:, None], max=(left + w - 1)[:, None])  # (B, S)
    ys = (top[:, None] + steps * h[:, None] - 0.5).clamp(min=top[:, None], max=(top + h - 1)[:, None])
    if flip is not None:
        xs = torch.where(flip[:, None], xs.flip(1), xs)
    # grid_sample wants coordinates in [-1, 1] with pixel centres at (2i + 1) / n - 1.
    gx = ((2 * xs + 1) / W - 1)[:, None, :].expand(B, size, size)
    gy = ((2 * ys + 1) / H - 1)[:, :, None].expand(B, size, size)
    grid = torch.stack([gx, gy], dim=-1)  # (B, S, S, 2), x first
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(x):
    """Luma of (B, 3, H, W) as (B, 1, H, W)."""
    return GREY[0] * x[:, 0:1] + GREY[1] * x[:, 1:2] + GREY[2] * x[:, 2:3]


def adjust_brightness(x, f):  # f: (B, 1, 1, 1); blend with black
    return (x * f).clamp(0, 1)


def adjust_contrast(x, f):  # blend with the image's mean grey level
    mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x, f):  # blend with the grey image
    return (f * x + (1 - f) * grey(x)).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate hue by shift (B, 1, 1, 1), in turns, through RGB -> HSV -> RGB."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    span = maxc - minc
    flat = span == 0
    safe = torch.where(flat, torch.ones_like(span), span)
    s = span / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    # Hue in sixths of a turn, measured from the dominant channel.
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6 + shift.view(-1, 1, 1), 1.0)
    v = maxc
    # Back to RGB: the standard sextant formulas.
    h6 = h * 6
    i = torch.floor(h6).long() % 6
    frac = h6 - torch.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    table = torch.stack([torch.stack(c, 1) for c in
                         [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 1)  # (B, 6, 3, H, W)
    return table.gather(1, i[:, None, None].expand(-1, 1, 3, -1, -1)).squeeze(1)


def gaussian_blur(x, sigma, kernel_size):
    """Blur image i with its own sigma[i]; separable kernel, reflect padding, as torchvision."""
    B, C, H, W = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)


@dataclass
class Augment:
    """One view's augmentation recipe, applied to a uint8 batch on its own device.

    Defaults are the SimCLR/SimSiam CIFAR recipe (SimSiam paper, Sec. A: crop scale
    0.2-1, jitter 0.4/0.4/0.4/0.1 with p=0.8, greyscale p=0.2); blur is only used for
    images of 64 px and more, as in the CIFAR experiments of those papers."""
    size: int
    mean: tuple
    std: tuple
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0

    def __call__(self, x):
        B, dev = x.shape[0], x.device
        u = lambda: torch.rand(B, 1, 1, 1, device=dev)  # one draw per image
        top, left, h, w = sample_crops(B, x.shape[2], x.shape[3], self.scale, self.ratio, dev)
        x = resized_crop(x.float() / 255, top, left, h, w, self.size, torch.rand(B, device=dev) < self.flip_p)
        x = self.color_jitter(x, u() < self.jitter_p)
        x = torch.where(u() < self.grey_p, grey(x).expand(-1, 3, -1, -1), x)
        if self.blur_p > 0 and self.size >= 64:
            kernel = int(0.1 * self.size) // 2 * 2 + 1  # 10% of the image, odd (SimCLR, App. A)
            sigma = torch.empty(B, device=dev).uniform_(0.1, 2.0)
            x = torch.where(u() < self.blur_p, gaussian_blur(x, sigma, kernel), x)
        if self.solarize_p > 0:
            x = torch.where(u() < self.solarize_p, solarize(x), x)
        mean, std = self.stats(dev)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x

    def stats(self, device):
        """mean and std as (1, 3, 1, 1) tensors on device, made once: a host-to-device copy
        in every step would make the CPU wait for the GPU."""
        cache = self.__dict__.setdefault("_stats", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                             torch.tensor(self.std, device=device).view(1, 3, 1, 1))
        return cache[device]

    def color_jitter(self, x, apply):
        """torchvision's ColorJitter with its own factors and op order for every image;
        images with apply=False get identity factors and pass through unchanged."""
        B, dev = x.shape[0], x.device
        u = lambda lo, hi: torch.empty(B, 1, 1, 1, device=dev).uniform_(lo, hi)
        bri, con, sat, hue = self.jitter
        factors = [torch.where(apply, u(1 - s, 1 + s), 1.0) for s in (bri, con, sat)]
        factors.append(torch.where(apply, u(-hue, hue), 0.0))
        order = torch.rand(B, 4, device=dev).argsort(dim=1)  # a random permutation per image
        return apply_jitter(x, *factors, order, apply)


def apply_jitter(x, fb, fc, fs, fh, order, apply=None):
    """Brightness (op 0), contrast (1), saturation (2) and hue (3) with per-image factors
    (B, 1, 1, 1), image i running them in the order order[i] (B, 4)."""
    B = x.shape[0]
    apply = torch.ones(B, 1, 1, 1, dtype=torch.bool, device=x.device) if apply is None else apply
    for k in range(4):
        op = order[:, k].view(B, 1, 1, 1)
        # Stage k runs, for each image, the op it drew for position k; the other three ops
        # get identity factors (exact no-ops), so no image is indexed out of the batch.
        x = adjust_brightness(x, torch.where(op == 0, fb, 1.0))
        x = adjust_contrast(x, torch.where(op == 1, fc, 1.0))
        x = adjust_saturation(x, torch.where(op == 2, fs, 1.0))
        x = torch.where((op == 3) & apply, adjust_hue(x, fh), x)
    return x


# ----------------------------------------------------------------------------- networks

def make_backbone(arch, img_size):
    """A torchvision ResNet without its fc layer, or a ViT without its head (it then returns
    the class token's features); returns (module, feature dim).
    ResNets on images of 64 px or less get the CIFAR stem: a 3x3 stride-1 conv and no
    max-pool, so a 32 px image is not shrunk to 8 px before the first block. ViTs use
    patch 4 there (a 32 px image is 8x8 tokens, 16 px is 4x4) and ViT's patch 16 above."""
    # (width, heads); both 12 blocks deep with MLP width 4x (DeiT, Touvron et al. 2021, Table 1).
    vits = {"vit_tiny": (192, 3), "vit_small": (384, 6)}
    if arch in vits:
        width, heads = vits[arch]
        patch = 4 if img_size <= 64 else 16
        if img_size % patch:
            raise UsageError(f"--arch {arch} needs an image size divisible by its patch size {patch} "
                             f"(got {img_size} px); use a ResNet for this dataset")
        net = torchvision.models.VisionTransformer(img_size, patch, num_layers=12, num_heads=heads,
                                                   hidden_dim=width, mlp_dim=4 * width)
        net.heads = nn.Identity()  # forward() then ends at the class token: (B, width)
        return net, width
    if arch not in ("resnet18", "resnet50"):
        raise UsageError(f"unknown --arch {arch!r}; choose resnet18, resnet50, vit_tiny or vit_small")
    net = getattr(torchvision.models, arch)(weights=None)
    if img_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


@torch.no_grad()
def cut_init(model, c):
    """Divide every parameter of model by c, once, at initialization (embedding-norms
    paper, Sec. 6 "Cut-Initialization"): smaller weights give smaller embeddings, and the
    cosine-similarity gradient is larger for small embeddings, so learning starts faster."""
    if c != 1:
        for p in model.parameters():
            p.div_(c)
    return model


def features(model, x, space="backbone"):
    """Embed a normalized batch in one of the spaces a method exposes: backbone (h),
    projector (z) or predictor (p). Models name their parts backbone/projector/predictor."""
    h = model.backbone(x)
    if space == "backbone":
        return h
    z = model.projector(h)
    if space == "projector":
        return z
    if getattr(model, "predictor", None) is None:
        raise UsageError("this model has no predictor; use --space backbone or projector")
    return model.predictor(z)


def embedding_stats(z, h):
    """Per-step diagnostics as 0-d tensors (no host sync): the norm of the embedding the
    loss sees (z), the backbone-feature norm (h) and the SimSiam paper's collapse monitor,
    the per-dimension std of the l2-normalized embedding (~1/sqrt(D) healthy, 0 collapsed)."""
    z, h = z.detach().float(), h.detach().float()
    norm = z.norm(dim=1)
    return {"emb_norm_mean": norm.mean(), "emb_norm_std": norm.std(),
            "feat_norm_mean": h.norm(dim=1).mean(),
            "collapse_std": F.normalize(z, dim=1).std(dim=0).mean()}


# ----------------------------------------------------------------------------- optimization

def make_optimizer(args, groups, device):
    """SGD (momentum) / Adam / AdamW over param groups; a group may carry fixed_lr=True."""
    lr = args.lr * args.batch_size / 256  # linear scaling rule (Goyal et al. 2017)
    fused = {"fused": True} if device.type == "cuda" else {}
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, weight_decay=args.wd,
                               nesterov=getattr(args, "nesterov", False), **fused)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, weight_decay=args.wd, **fused)


def lr_factor(step, total, warmup):
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`; per iteration."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, factor):
    for g in optimizer.param_groups:
        g.setdefault("peak_lr", g["lr"])
        # SimSiam keeps the predictor's lr fixed ("fix-pred-lr"); the rest follows the schedule.
        g["lr"] = g["peak_lr"] if g.get("fixed_lr") else g["peak_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a kill mid-write
    leaves the previous file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Load a checkpoint written by this project, tensors only (weights_only=True): a file
    that carries pickled code is refused, never executed."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the pickle names a function or class to import and call
            raise UsageError(f"{path} contains pickled code or objects other than tensors; refusing to load it")
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt?)")
    except Exception:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt?)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{path} was not written by normssl (no '{FORMAT}' marker)")
    return ckpt


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- distributed
# Multi-GPU / multi-node runs start every script unchanged under torchrun, which sets RANK,
# WORLD_SIZE and LOCAL_RANK. Without those variables everything below is a no-op, so a
# single process never touches torch.distributed.

def init_distributed():
    """Join the process group torchrun describes; returns (rank, world size, local rank)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local


def world():
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 that gradients flow back through: every rank's loss may
    depend on every rank's embeddings, so the backward sums the incoming gradient over
    ranks and hands each rank the slice of its own rows."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, size = world()
        return grad.chunk(size)[rank]


class _SumWithGrad(torch.autograd.Function):
    """All-reduce (sum) that gradients flow back through: the sum is used on every rank,
    so each input's gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather(x, grad=True):
    """Concatenate x (b, ...) from all ranks in rank order -> (world * b, ...). With
    grad=False the result is a constant: no gradient goes back to any rank (MoCo's keys)."""
    rank, size = world()
    if size == 1:
        return x
    if grad:
        return _GatherWithGrad.apply(x)
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(size)]
    with torch.no_grad():
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_gradients(params):
    """Average the gradients of params over ranks, in one flat all-reduce. Summing the
    per-rank gradients of per-rank mean losses and dividing by the world size gives the
    gradient of the mean loss over the global batch."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the global batch across ranks, for
    1d and 2d inputs. It keeps BatchNorm's parameter and buffer names, so checkpoints load
    into the plain network. On CUDA, torch's own SyncBatchNorm is used instead; this
    version exists because SyncBatchNorm has no CPU implementation (tests use gloo)."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {x.dim()}D")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype)
        total = _SumWithGrad.apply(torch.cat([x.sum(dims), (x * x).sum(dims), count]))  # (2C + 1,)
        n = total[-1]
        mean = total[: x.shape[1]] / n
        var = total[x.shape[1]: 2 * x.shape[1]] / n - mean * mean  # biased, as BN normalizes with
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def global_batchnorm(module):
    """Swap every BatchNorm in module for one that normalizes over the global batch
    (no-op in a single process)."""
    if world()[1] == 1:
        return module
    if torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module


# ----------------------------------------------------------------------------- runs

@dataclass
class Run:
    """What a method script needs to train: its args, device, data and run folder."""
    method: str
    args: Args
    device: torch.device
    data: Data
    mean: list
    std: list
    folder: str
    ckpt: dict = None  # the checkpoint being resumed, if any
    rank: int = 0  # this process's rank under torchrun, and the number of processes
    world: int = 1

    def augment(self, **recipe):
        return Augment(self.data.size, tuple(self.mean), tuple(self.std), **recipe)


def setup(method, args):
    """Seed, pick the device, load the data onto it and create (or reopen) the run folder.
    Under torchrun every rank runs this; only rank 0 writes to the run folder."""
    rank, size, local_rank = init_distributed()
    ckpt = None
    if args.resume:
        if args.resume == "auto" and not args.out:
            raise UsageError("--resume auto needs --out pointing at the run folder to continue")
        path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
        ckpt = load_checkpoint(path)
        if ckpt["method"] != method:
            raise UsageError(f"{path} is a {ckpt['method']} checkpoint; resume it with {ckpt['method']}.py")
        folder = os.path.dirname(os.path.abspath(path))
        if args.out and os.path.abspath(args.out) != folder:
            raise UsageError(f"a resumed run stays in its own folder {folder}; drop --out or make it match")
        check_resume_target(path, ckpt)
        args = merge_resume_args(ckpt["args"], args)
    else:
        args = gradscale_preset(args)
        folder = args.out or os.path.join(
            "runs", f"{method}-{args.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
            raise UsageError(f"output folder {folder} already exists and is not empty; pass --resume auto "
                             f"--out {folder} to continue a run there, or choose another --out")
    if args.batch_size % (size * args.accum):
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of {size} processes x "
                         f"--accum {args.accum}, so every rank gets equal micro-batches")
    device = pick_device(args.device)
    if size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
    # The same seed on every rank: the networks start identical. Augmentations are
    # reseeded per rank and epoch in train().
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    data = load_dataset(args.dataset, args.data_dir, args.download, args.subset)
    data, _ = drop_classes(data, parse_classes(args.exclude_classes))
    if args.batch_size > len(data.train_x):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(data.train_x)} training images")
    mean, std = ckpt["data_stats"] if ckpt else channel_stats(data.train_x)
    if size > 1:
        import torch.distributed as dist
        dist.barrier()  # every rank has checked the folder before rank 0 creates it
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        if ckpt:
            trim_metrics(os.path.join(folder, "metrics.jsonl"), ckpt["epoch"])
        else:
            with open(os.path.join(folder, "args.json"), "w") as fh:
                json.dump({"format": FORMAT, "method": method, "args": dataclasses.asdict(args)}, fh, indent=1)
    return Run(method, args, device, data.to(device), mean, std, folder, ckpt, rank, size)


# The GradScale schedule. The paper's Sec. 6 ("GradScale Layer") asks for a long linear
# warmup and a smaller base lr, since scaling each gradient by ||z||^p undoes the 1/||z||
# that would otherwise keep the first steps small. The numbers are the authors' own SimCLR
# demo (github.com/Andrew-Draganov/SSLEmbeddingNorms, CLA/experiments/model_comparison.py):
# 100 warmup epochs, peak lr 0.1 where the default is 0.6 at batch 512, i.e. a sixth.
GRADSCALE_WARMUP = 100  # epochs
GRADSCALE_LR_FACTOR = 1 / 6  # of the method's --lr; the demo is SimCLR's, the other methods reuse the ratio


def gradscale_preset(args):
    """With GradScale on (--power != 0), set --warmup 100 and --lr to a sixth of the
    method's default, each unless it was typed: `--power 1` alone is the paper's setting."""
    given = getattr(args, "given", set())
    if not args.power:
        return args
    changes = {}
    if "warmup" not in given and args.warmup < GRADSCALE_WARMUP:
        changes["warmup"] = GRADSCALE_WARMUP
    if "lr" not in given:
        changes["lr"] = args.lr * GRADSCALE_LR_FACTOR
    if changes:
        shown = " ".join(f"--{k} {v:g}" for k, v in changes.items())
        print(f"GradScale preset: {shown} (type either flag to override)", file=sys.stderr)
        args = dataclasses.replace(args, **changes)
        args.given = given
    return args


def check_resume_target(path, ckpt):
    """Refuse to resume from an older epoch<N>.pt when the folder's last.pt is further on:
    continuing would overwrite it."""
    last = os.path.join(os.path.dirname(os.path.abspath(path)), "last.pt")
    if os.path.abspath(path) != last and os.path.exists(last):
        later = load_checkpoint(last)["epoch"]
        if later > ckpt["epoch"]:
            raise UsageError(f"resuming from epoch {ckpt['epoch']} would overwrite {last} (epoch {later}); "
                             "copy the checkpoint into a new folder and resume it there")


def trim_metrics(path, epoch):
    """Drop metrics lines written after the checkpoint being resumed (a kill between the
    metrics line and the checkpoint write), so the log has each epoch once."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = fh.readlines()
    keep = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= epoch]
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as fh:
            fh.writelines(keep)
        os.replace(path + ".tmp", path)


def merge_resume_args(saved, new):
    """The saved args, plus the resume-safe flags typed on this command line; typed flags
    that would change the method are refused."""
    given = getattr(new, "given", set())
    conflicts = [k for k in sorted(given - RESUME_SAFE) if k in saved and getattr(new, k) != saved[k]]
    if conflicts:
        flags = ", ".join(f"--{k.replace('_', '-')} ({saved[k]} -> {getattr(new, k)})" for k in conflicts)
        raise UsageError(f"cannot resume with a different {flags}: these define the run; start a new run instead")
    fields = {f.name for f in dataclasses.fields(new)}
    changed = {k: getattr(new, k) for k in given & RESUME_SAFE}
    merged = type(new)(**{**{k: v for k, v in saved.items() if k in fields}, **changed})
    for k, v in changed.items():
        if k not in ("resume", "out") and saved.get(k) != v:
            print(f"resuming with --{k.replace('_', '-')} {v} (was {saved.get(k)})", file=sys.stderr)
    return merged


class Diverged(UsageError):
    """The loss became NaN or infinite."""


def check_finite(loss, epoch, step, args):
    if not math.isfinite(loss):
        hints = []
        if args.power:
            hints.append(f"GradScale (--power {args.power}) scales gradients by the embedding norm, so it needs a "
                         "smaller --lr or a longer --warmup")
        if args.wd >= 1e-3:
            hints.append(f"--wd {args.wd} is large")
        hints.append(f"--lr {args.lr} may be too high")
        raise Diverged(f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}; "
                       f"{'; '.join(hints)}. Training stopped; last.pt still holds the last good epoch")


class LaggedReader:
    """Reads a step's loss and embedding norm one step late. On CUDA the values are copied
    to pinned host memory as soon as the forward pass has queued them, and an event marks
    the copy; by the time the next step has been queued that event is long done, so the
    CPU never waits for the GPU to finish the step it has just launched."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.queue = []  # (step, host values, event or None)

    def push(self, step, loss, norm):
        values = torch.stack([loss.detach().float(), norm.detach().float()])
        event = None
        if self.cuda:
            host = torch.empty(2, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.queue.append((step, values, event))

    def pop(self, keep=1):
        """Yield (step, loss, norm) of all but the newest `keep` pushed steps."""
        while len(self.queue) > keep:
            step, values, event = self.queue.pop(0)
            if event is not None:
                event.synchronize()
            loss, norm = values.tolist()
            yield step, loss, norm


class Stepper:
    """One optimizer step of the shared loop: lr schedule, the method's before_step hook
    (once per step, e.g. an EMA update), its training_step on each micro-batch under
    autocast, backward, stats summed on the device, gradients averaged over ranks, the
    optimizer step, and the previous step's loss checked. train() runs it;
    benchmarks/throughput.py times exactly this."""

    def __init__(self, model, training_step, optimizer, args, steps_per_epoch, device, before_step=None):
        self.model, self.training_step, self.optimizer, self.args = model, training_step, optimizer, args
        self.before_step = before_step
        self.steps_per_epoch = steps_per_epoch
        self.total = args.epochs * steps_per_epoch
        self.warmup = args.warmup * steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = device
        self.reader = LaggedReader(device)
        self.sums = {}  # per-epoch sums of the stats, on the device
        self.shown = None  # (loss, norm) of the last checked step, for the progress bar

    def __call__(self, step, batches, views):
        """Train on the uint8 micro-batches of one step; returns the lr used."""
        lr = set_lr(self.optimizer, lr_factor(step, self.total, self.warmup))
        progress = step / max(1, self.total)
        if self.before_step:  # once per optimizer step, however many micro-batches follow
            self.before_step(self.model, self.args, progress)
        self.optimizer.zero_grad(set_to_none=True)
        for a, x in enumerate(batches):
            x1, x2 = views[0](x), views[1](x)
            with autocast(self.device):
                loss, stats = self.training_step(self.model, x1, x2, self.args, progress)
            if a == len(batches) - 1:
                self.reader.push(step, loss, stats["emb_norm_mean"])
            (loss / len(batches)).backward()
            for k, v in {"loss": loss.detach(), **stats}.items():
                self.sums[k] = self.sums.get(k, 0) + v.float() / len(batches)
        average_gradients(self.params)
        self.optimizer.step()
        self.check(keep=1)  # the previous step, which the GPU has finished by now
        return lr

    def check(self, keep=0):
        for done, loss, norm in self.reader.pop(keep):
            check_finite(loss, done // self.steps_per_epoch, done % self.steps_per_epoch, self.args)
            self.shown = (loss, norm)


def train(run, model, training_step, groups, views, sync_bn=True, before_step=None):
    """The loop shared by every method.

    training_step(model, x1, x2, args, progress) -> (loss, stats) runs the method on two
    views made by the two Augment recipes in `views`; progress in [0, 1) is the fraction
    of training done, for schedules such as BYOL's EMA. It runs once per micro-batch
    (--accum), so work that must happen once per optimizer step, such as moving an EMA
    target, goes in before_step(model, args, progress) instead. stats are 0-d tensors, summed on
    the device and read once per epoch. The only per-step read is the previous step's
    loss check, which the GPU has finished by then, so the loop never stalls it.

    Under torchrun each rank trains on its own slice of every global batch, gradients are
    averaged over ranks after backward, and (with sync_bn) batch norm uses global-batch
    statistics. Only rank 0 evaluates, logs and writes checkpoints.
    """
    from eval_knn import knn_eval  # eval_knn imports this module, so import it late

    args, device, data = run.args, run.device, run.data
    if sync_bn:
        global_batchnorm(model)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, groups, device)
    steps_per_epoch = len(data.train_x) // args.batch_size
    start_epoch = 0
    if run.ckpt:
        model.load_state_dict(run.ckpt["model"])
        optimizer.load_state_dict(run.ckpt["optimizer"])
        start_epoch = run.ckpt["epoch"]
        set_rng_state(run.ckpt["rng"])
    local = args.batch_size // run.world  # this rank's share of each global batch
    micro = local // args.accum
    stepper = Stepper(model, training_step, optimizer, args, steps_per_epoch, device, before_step)
    from tqdm import tqdm

    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        # The data order depends only on (seed, epoch): every rank draws the same
        # permutation and takes its own slice, and a resumed run sees the same order.
        perm = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        perm = perm.to(device)
        # Augmentations differ per rank and are reproducible per epoch (exact resume).
        torch.manual_seed(args.seed * 100003 + epoch * 1009 + run.rank + 1)
        stepper.sums = {}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=True if run.rank else None, dynamic_ncols=True)
        for i in bar:
            start = i * args.batch_size + run.rank * local
            batches = [data.train_x[perm[start + a * micro: start + (a + 1) * micro]] for a in range(args.accum)]
            lr = stepper(epoch * steps_per_epoch + i, batches, views)
            if stepper.shown and not bar.disable:
                bar.set_postfix(loss=f"{stepper.shown[0]:.4f}", norm=f"{stepper.shown[1]:.3f}", refresh=False)
        bar.close()
        stepper.check()
        sums = stepper.sums
        if run.world > 1:  # log the mean over ranks
            import torch.distributed as dist
            flat = torch.stack([sums[k] for k in sorted(sums)])
            dist.all_reduce(flat)
            sums = dict(zip(sorted(sums), flat / run.world))
        metrics = {k: v.item() / max(1, steps_per_epoch) for k, v in sums.items()}
        if run.rank:
            continue  # rank 0 evaluates, logs and saves
        seconds = time.time() - t0
        last = epoch + 1 == args.epochs
        knn = None
        if last or (args.knn_every and (epoch + 1) % args.knn_every == 0):
            knn = knn_eval(model, data, run.mean, run.std)
        line = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": lr, **metrics, "knn_top1": knn,
                "epoch_seconds": round(seconds, 3),
                "images_per_second": round(steps_per_epoch * args.batch_size / seconds, 1)}
        with open(os.path.join(run.folder, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()), flush=True)
        ckpt = {"format": FORMAT, "method": run.method, "args": dataclasses.asdict(args), "epoch": epoch + 1,
                "step": (epoch + 1) * steps_per_epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng_state(), "data_stats": [run.mean, run.std],
                "num_classes": data.num_classes, "img_size": data.size, "metrics": line}
        save_atomic(ckpt, os.path.join(run.folder, "last.pt"))
        if args.save_every and (epoch + 1) % args.save_every == 0:
            save_atomic(ckpt, os.path.join(run.folder, f"epoch{epoch + 1}.pt"))
    if run.world > 1:
        import torch.distributed as dist
        dist.barrier()  # the other ranks wait for rank 0's last checkpoint before leaving
        dist.destroy_process_group()
    return model
