"""Plumbing shared by the method scripts: arguments, datasets, GPU augmentation,
backbones, cut-initialization, embeddings and k-NN, the lr schedule, checkpoints, the DDP
primitives, and the small helpers that each script's training loop calls.

The methods themselves (heads, losses, stop-gradients, EMA, queues, the training loop)
live in their own scripts; nothing in this file knows what SimCLR or BYOL is, and it
imports none of them.
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
import signal
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "normssl-1"  # marks checkpoints and run folders written by this project


class UsageError(Exception):
    """Bad input from the user: printed as one sentence, exit status 2."""


def cli(main):
    """Run main() as a command: bad input (UsageError) is one line on stderr and exit status
    2, a failed run (RunFailed, OSError) one line and 1; Ctrl-C or SIGTERM says what is safe."""
    # Ctrl-C raises KeyboardInterrupt even where the parent started us with SIGINT ignored
    # (a background job of a script), and SIGTERM unwinds the same way.
    handlers = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Finished as e:
        print(e)
        sys.exit(0)
    except (RunFailed, OSError) as e:
        what = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else e
        print(f"error: {what}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"{e.args[0] if e.args else 'interrupted'}; {interrupted_status()}", file=sys.stderr)
        sys.exit(143 if e.args else 130)
    finally:
        unlock_folder()
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def _terminate(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")  # unwinds like Ctrl-C: temporary files are removed


def interrupted_status():
    """What an interrupted run leaves behind, in one sentence."""
    folder, saved = STATUS["folder"], STATUS["saved"]
    if folder is None:
        return "nothing was written"
    again = f"python <script> --resume auto --out {folder}"
    if saved is None:
        return f"no epoch had finished, so {folder} holds no checkpoint; `{again}` starts the run again from epoch 0"
    return f"{os.path.join(folder, 'last.pt')} holds epoch {saved}; `{again}` continues from there"


# ----------------------------------------------------------------------------- arguments

def arg(default, help, choices=None, positive=False, low=None, high=None):
    """A dataclass field whose help text becomes the --help line of its flag. positive, or
    low and high (inclusive), are the values validate() accepts."""
    return field(default=default, metadata={"help": help, "choices": choices, "positive": positive,
                                            "low": low, "high": high})


DATASETS = ("cifar10", "cifar100", "cifar10-lt", "cifar100-lt", "fashionmnist", "fashionmnist-lt",
            "tinyimagenet", "imagenet100", "flowers102", "synthetic")


# The laptop recipe (README, "Results on a laptop CPU"): real Fashion-MNIST from Debian's
# dataset-fashion-mnist package, a ResNet-18 of 16 base channels, a short schedule.
# Measured on 2 cores (benchmarks/README.md): ~215 images/s at width 16, so 5,000 images x 10
# epochs is about 4 minutes; the k-NN test set is the first 5,000 test images.
LAPTOP = dict(dataset="fashionmnist", data_dir="/usr/share/datasets/fashion-mnist", subset=5000, width=16,
              batch_size=256, accum=1, epochs=10, warmup=1, knn_every=0, save_every=0)


@dataclass
class Args:
    """Flags every method shares; each script subclasses this and changes defaults.
    PRESETS maps --preset names to flag values; a script may add its own."""
    PRESETS: ClassVar[dict] = {"laptop": LAPTOP}
    preset: str = arg("", "a named recipe that sets every flag you do not type: laptop (Fashion-MNIST, a narrow "
                          "ResNet-18, minutes on a CPU) or, where the script has it, paper (App. C.1 settings)",
                      ("laptop", "paper"))
    dataset: str = arg("cifar10", "training data", DATASETS)
    data_dir: str = arg("data", "where the dataset lives (or is downloaded to)")
    download: bool = arg(False, "download the dataset with torchvision if it is missing (needs internet)")
    subset: int = arg(0, "use only the first N train and N test images (0: all); for quick checks", low=0)
    exclude_classes: str = arg("", "comma-separated classes to train without, e.g. 5,6,7,8,9: their images leave "
                                   "both splits (k-NN included), and eval_knn.py's novelty analysis compares "
                                   "their test images, never seen, with the rest (paper Fig. 3)")
    arch: str = arg("resnet18", "backbone", ("resnet18", "resnet50", "vit_tiny", "vit_small"))
    epochs: int = arg(512, "training epochs (the embedding-norms paper trains 512)", low=0)
    batch_size: int = arg(512, "images per step (each gives two views)")
    accum: int = arg(1, "split each batch into this many accumulated micro-batches", positive=True)
    optimizer: str = arg("sgd", "optimizer", ("sgd", "adam", "adamw"))
    lr: float = arg(0.3, "base learning rate per 256 images; the peak lr is lr * batch_size / 256", positive=True)
    wd: float = arg(1e-6, "weight decay", low=0)
    momentum: float = arg(0.9, "SGD momentum", low=0, high=1)
    warmup: int = arg(10, "epochs of linear lr warmup before the cosine decay", low=0)
    cut: float = arg(1.0, "cut-initialization constant c: every initial weight is divided by c (1: off)")
    width: int = arg(64, "ResNet-18's base channels; 64 is torchvision's network, fewer builds the same layout "
                         "narrower (the laptop preset uses 16)", positive=True)
    zero_init_residual: bool = arg(True, "ResNets: start each residual block's last BN weight at 0, so every block "
                                         "begins as the identity (official SimSiam, MoCo v3 and the norms paper's code)")
    power: float = arg(0.0, "GradScale power p: scale each embedding's gradient by ||z||^p (0: off); "
                        "p != 0 also sets --warmup 100 and --lr to a sixth of its default, each unless typed "
                        "(the paper's GradScale schedule)")
    opposite_cos: float = arg(0.0, "log the fraction of positive pairs whose cosine is below this as opposite_rate "
                                   "(opposite half-spaces at 0; norms paper, App. C.2, Table S1)", low=-1, high=1)
    knn_every: int = arg(10, "evaluate k-NN top-1 every N epochs (and after the last); 0: only at the end", low=0)
    save_every: int = arg(50, "keep a copy of the checkpoint as epoch<N>.pt every N epochs (0: never)", low=0)
    seed: int = arg(0, "random seed (data order, augmentations, initialization)")
    out: str = arg("", "run folder (default: runs/<method>-<dataset>-<timestamp>)")
    resume: str = arg("", "continue a run from its checkpoint: a path to last.pt, or 'auto' with --out")
    device: str = arg("auto", "cpu, cuda, cuda:N, mps or auto (CUDA, else Apple MPS, else the CPU)")


# Flags that may change when resuming without changing what is being trained.
RESUME_SAFE = {"epochs", "knn_every", "save_every", "device", "data_dir", "download", "resume", "out"}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each flag's help, except where the help already says what
    the default is, or where it is empty."""

    def _get_help_string(self, action):
        if action.default in ("", None, []) or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(cls, doc, argv=None, resolve=None):
    """Build a parser from a dataclass of flags; returns a filled instance whose .given
    holds the names of the flags typed on the command line (resuming tells them from
    defaults). resolve(args), if given, fills defaults that depend on other flags."""
    parser = Parser(description=doc.split("\n\n")[0] if doc else None, formatter_class=HelpFormatter)
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
    for action in parser._actions:  # parse again without defaults: what is left was typed
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    notes = []
    if args.preset and args.preset not in cls.PRESETS:
        parser.error(f"--preset {args.preset} is not defined for this method; it has {', '.join(cls.PRESETS)}")
    if args.preset:  # a named recipe fills every flag that was not typed
        changes = {k: v for k, v in cls.PRESETS[args.preset].items() if k not in given and getattr(args, k) != v}
        args = dataclasses.replace(args, **changes)
        if changes:
            notes.append(f"--preset {args.preset}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
                         + " (type a flag to override it)")
    if resolve:
        args.given = given  # a typed value is never taken for "unset"
        args = resolve(args)
    problem = validate(args)
    if problem:
        parser.error(problem)
    args.given, args.notes = given, notes
    return args


def validate(args):
    """Return a sentence describing the first invalid flag value, or None. Runs before any
    folder is created or any data is loaded."""
    floats = [f.name for f in dataclasses.fields(args) if isinstance(getattr(args, f.name), float)]
    bad = [n for n in floats if not math.isfinite(getattr(args, n))]
    if bad:
        return f"--{bad[0].replace('_', '-')} must be a finite number (got {getattr(args, bad[0])})"
    for f in dataclasses.fields(args):  # the ranges declared with each flag (arg's positive, low, high)
        v, meta, flag = getattr(args, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if meta.get("positive") and not v > 0:
            return f"{flag} must be positive (got {v})"
        low, high = meta.get("low"), meta.get("high")
        if low is not None and high is not None and not low <= v <= high:
            return f"{flag} must be in [{low}, {high}] (got {v})"
        if low is not None and high is None and not v >= low:
            return f"{flag} must be >= {low} (got {v})"
    checks = [  # what one flag's range cannot say
        (args.cut > 0, f"--cut must be positive (got {args.cut}); use 1 to turn cut-initialization off"),
        (args.batch_size >= 2, f"--batch-size must be at least 2, one positive pair and a batch to normalize "
                               f"(got {args.batch_size})"),
        (args.batch_size % args.accum == 0,
         f"--batch-size {args.batch_size} must be a multiple of --accum {args.accum}"),
        (0 <= args.seed < 2 ** 31, f"--seed must be in [0, 2^31) (got {args.seed})"),
        (parse_classes(args.exclude_classes) is not None,
         f"--exclude-classes {args.exclude_classes!r} must be class numbers separated by commas, such as 5,6,7"),
    ]
    for ok, message in checks:
        if not ok:
            return message
    return None


def pick_device(name):
    """The torch device for --device, and why it was chosen, for the start line. auto
    takes CUDA, then Apple's MPS, then the CPU; asking for one that is absent is an error."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"cuda:0 ({torch.cuda.get_device_name(0)})"
        if mps:
            return torch.device("mps"), "mps (Apple GPU; untested here)"
        return torch.device("cpu"), "cpu (no CUDA or MPS found)"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but this machine has no CUDA GPU; use --device cpu")
    if device.type == "mps" and not mps:
        raise UsageError(f"--device {name} was asked for but this machine has no Apple MPS GPU; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: only cpu, cuda, cuda:N, mps and auto are supported")
    return device, f"{name} (as asked)"


def at_least_fp32(x):
    """x in float32 if it is in a lower precision (bf16, fp16); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (the CPU, and MPS, whose autocast
    support varies across torch versions): one code path for all."""
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

# Classes of the datasets that have a fixed number; a label outside [0, n) is refused at
# load time. The folder datasets count their class folders instead.
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "fashionmnist": 10, "flowers102": 102}


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
    for split, y in (("training", train_y), ("test", test_y)):
        if not len(y):
            raise UsageError(f"{name} in {data_dir} has no {split} images; check --data-dir and the folder layout")
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


def _download(name, data_dir, fetch, folder, files, inner=()):
    """Run torchvision's download, fetch(). If it fails (no network, a dead mirror, a bad
    checksum), remove what it created and raise one sentence on how to do without it.
    Only new things go: a folder created for the download, or a new entry in data_dir or
    in one of its `inner` folders that existed before; nothing that was there is touched."""
    import http.client
    import shutil
    created = None  # the outermost folder of data_dir's path that does not exist yet
    path = os.path.abspath(data_dir)
    while not os.path.exists(path):
        created, path = path, os.path.dirname(path)
    before = {d: set(os.listdir(d)) for d in (os.path.join(data_dir, i) for i in ("",) + tuple(inner))
              if os.path.isdir(d)}
    try:
        fetch()
    except BaseException as e:  # Ctrl-C too: no half-downloaded archive is left behind
        if created:
            shutil.rmtree(created, ignore_errors=True)
        for d, kept in before.items():
            for entry in set(os.listdir(d)) - kept if os.path.isdir(d) else ():
                p = os.path.join(d, entry)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.remove(p)
        if not isinstance(e, (OSError, RuntimeError, http.client.HTTPException)):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f"--download could not fetch {name} ({reason}); put {files} in {folder} by hand, or work "
                         "offline on Fashion-MNIST: apt-get install dataset-fashion-mnist, then --dataset "
                         "fashionmnist --data-dir /usr/share/datasets/fashion-mnist") from None


def _cifar(name, data_dir, download):
    folder, train_files, test_files, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
    }[name]
    root = os.path.join(data_dir, folder)
    if download and not os.path.isdir(root):
        import torchvision  # imported where needed: it costs ~2 s, and a bad flag should fail fast
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        _download(name, data_dir, lambda: cls(data_dir, download=True), root, "the extracted python-version batches")

    def read(files):
        xs, ys = [], []
        for f in files:
            path = os.path.join(root, f)
            if not os.path.exists(path):
                raise _missing(f"{name} file {f}", root,
                               f"pass --download, or put the extracted '{folder}' folder under --data-dir")
            try:
                with open(path, "rb") as fh:
                    batch = _CifarUnpickler(fh, path, name).load()
                # The keys are bytes or str depending on how the pickle is decoded.
                batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
                data, labels = batch["data"], _labels(batch[key])
            except UsageError:
                raise
            except Exception as e:
                raise UsageError(f"{path} is not a valid {name} batch file ({type(e).__name__}); "
                                 "delete it and download again")
            # A real batch holds N rows of 3072 bytes (1024 red, then green, then blue) and N labels.
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                    and data.shape[1] == 3 * 32 * 32):
                shape = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else _shown(data)
                raise UsageError(f"{path} holds images as {shape}, not N rows of 3072 uint8 values (3 x 32 x 32); "
                                 f"delete it and download {name} again")
            x = torch.from_numpy(data).reshape(-1, 3, 32, 32)
            problem = _split_problem(x, labels, NUM_CLASSES[name])
            if problem:
                raise UsageError(f"{path} {problem}; delete it and download {name} again")
            xs.append(x)
            ys.append(labels)
        return torch.cat(xs), torch.cat(ys)

    return read(train_files), read(test_files)


class _CifarUnpickler(pickle.Unpickler):
    """pickle.load for CIFAR's python-version batches that cannot run code. A pickle may
    name any importable function for the loader to call (os.system included); this one
    resolves only the few names that a real batch file needs and refuses every other.

    The real files (Python 2 pickles, read with encoding latin1) are dicts of str, lists of
    int and one uint8 ndarray, which pickle rebuilds as numpy's _reconstruct(ndarray, ...)
    filled from a dtype: numpy.core.multiarray under numpy 1, numpy._core.multiarray under
    numpy 2 (both map to the same function). Python 3 writes bytes at protocol 2 as
    _codecs.encode(text, 'latin1'), so that call is allowed too, for latin1 only."""

    RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's _reconstruct, whatever its module

    @staticmethod
    def latin1(text, encoding):
        if not (isinstance(text, str) and encoding == "latin1"):
            raise pickle.UnpicklingError(f"_codecs.encode with encoding {_shown(encoding)}")
        return text.encode("latin1")

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,
               ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,
               ("_codecs", "encode"): latin1}

    def __init__(self, fh, path, name):
        super().__init__(fh, encoding="latin1")
        self.path, self.name = path, name

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UsageError(f"{self.path} asks to import {_shown(f'{module}.{name}', 60)}, which no {self.name} "
                             f"batch file needs; refusing to load it (delete it and download {self.name} again)")
        return self.ALLOWED[module, name]


def _labels(values):
    """A list or array of class numbers as an int64 tensor (N,), or None if it is not one."""
    a = np.asarray(values)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        return None
    return torch.from_numpy(a.astype(np.int64))


def _split_problem(x, y, num_classes, size=None):
    """What is wrong with one split, as a phrase such as 'holds 3 labels for 4 images', or
    None: images must be uint8 (N, 3, S, S), with S == size if given, and labels N integers
    in [0, num_classes). Bad data stops here, not as an index error deep in training."""
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
            and x.shape[2] == x.shape[3] and (size is None or x.shape[2] == size)):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else _shown(x)
        return f"holds images as {got}, not uint8 N x 3 x {size or 'S'} x {size or 'S'}"
    if not (isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point() and not y.is_complex()):
        return "holds labels that are not a list of class numbers"
    if len(y) != len(x):
        return f"holds {len(y)} labels for {len(x)} images"
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        return f"holds label {bad}, outside the {num_classes} classes 0 to {num_classes - 1}"
    return None


IDX_MAX_VALUES = 10 ** 8  # Fashion-MNIST's largest file holds 47M; a header that claims more is refused


def read_idx(path, shape=None):
    """Read an idx file (the MNIST format), gzipped or not, as a uint8 tensor. The header is
    checked first, then exactly the bytes it promises are read: a gzip bomb or a header with
    absurd dimensions is refused before anything large is decompressed. shape: the expected
    dimensions, None for any (e.g. (None, 28, 28) for images)."""
    import zlib  # its error is what a corrupt gzip stream raises
    opener = gzip.open if path.endswith(".gz") else open

    def exactly(fh, n, what):
        data = fh.read(n)
        if len(data) != n:
            raise ValueError(f"it ends after {len(data)} of the {n} bytes of its {what}")
        return data

    try:
        with opener(path, "rb") as fh:
            zero, dtype, ndim = struct.unpack(">HBB", exactly(fh, 4, "header"))
            if zero != 0 or dtype != 0x08:
                raise ValueError("its magic number is not that of an idx file of unsigned bytes")
            dims = struct.unpack(f">{ndim}I", exactly(fh, 4 * ndim, "header"))
            if shape is not None and (len(dims) != len(shape) or any(s not in (None, d) for s, d in zip(shape, dims))):
                want = ", ".join("N" if s is None else str(s) for s in shape)
                raise ValueError(f"it holds an array of shape {dims}, not ({want})")
            count = math.prod(dims)
            if count > IDX_MAX_VALUES:
                raise ValueError(f"its header claims {count} values, more than the {IDX_MAX_VALUES} this reader accepts")
            raw = exactly(fh, count, "data")
            if fh.read(1):
                raise ValueError(f"it goes on past the {count} bytes of data its header promises")
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise UsageError(f"{path} is not a valid idx file ({e}); delete it and fetch it again")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(dims)


def _fashionmnist(name, data_dir, download):
    # Accept the idx files directly in data_dir (e.g. Debian's /usr/share/datasets/fashion-mnist)
    # or in torchvision's layout data_dir/FashionMNIST/raw.
    folders = [data_dir, os.path.join(data_dir, "FashionMNIST", "raw")]
    if download and not any(os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")) for d in folders):
        import torchvision
        _download(name, data_dir, lambda: torchvision.datasets.FashionMNIST(data_dir, download=True),
                  data_dir, "the four *-ubyte.gz files", inner=("FashionMNIST", os.path.join("FashionMNIST", "raw")))

    def find(stem):
        for d in folders:
            for suffix in ("", ".gz"):
                if os.path.exists(os.path.join(d, stem + suffix)):
                    return os.path.join(d, stem + suffix)
        raise _missing(f"Fashion-MNIST file {stem}", " or ".join(folders),
                       "install it with 'apt-get install dataset-fashion-mnist' and pass "
                       "--data-dir /usr/share/datasets/fashion-mnist, or pass --download")

    def split(prefix):
        images, labels = find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte")
        x = read_idx(images, (None, 28, 28))  # (N, 28, 28)
        y = read_idx(labels, (None,)).long()  # (N,)
        if len(x) != len(y):
            raise UsageError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; "
                             "fetch both files again")
        n = NUM_CLASSES[name]
        if len(y) and y.max() >= n:  # idx bytes are never negative
            raise UsageError(f"{labels} holds label {int(y.max())}, outside the {n} classes 0 to {n - 1}; "
                             "fetch it again")
        # Pad 28 -> 32 so the CIFAR pipeline applies unchanged; grey -> 3 channels.
        return F.pad(x, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1), y

    return split("train"), split("t10k")


def _load_images(paths, size):
    """Decode image files in parallel, resize the short side to `size` and centre-crop a square."""
    from PIL import Image

    def one(path):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        except Exception as e:  # missing, truncated, not an image, a decompression bomb: PIL has many errors
            raise UsageError(f"{path} is not a readable image ({type(e).__name__}); replace it with a good copy "
                             "from the dataset's archive")

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return torch.stack(list(pool.map(one, paths))) if paths else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def _cached(cache_path, build, num_classes, size):
    """Decode a folder dataset once and keep it as a uint8 tensor file next to the data. A
    cache that does not hold size-px images of num_classes classes (stale, damaged or
    edited) is decoded again; a build whose labels are out of range is refused."""
    if os.path.exists(cache_path):
        try:
            d = torch.load(cache_path, weights_only=True)
            splits = (d["train_x"], d["train_y"]), (d["test_x"], d["test_y"])
            problem = next(filter(None, (_split_problem(x, y, num_classes, size) for x, y in splits)), None)
        except Exception as e:
            problem = f"is unreadable ({type(e).__name__})"
        if problem is None:
            return splits
        print(f"warning: ignoring the cache {cache_path}, which {problem}; decoding the images again", file=sys.stderr)
    splits = build()
    for (x, y), split in zip(splits, ("training", "test")):
        problem = _split_problem(x, y, num_classes, size) or ("holds no images" if not len(y) else None)
        if problem:  # checked before the cache is written, so that no bad cache is left behind
            raise UsageError(f"{os.path.dirname(cache_path)} ({split} split) {problem}; check the folder layout")
    (train_x, train_y), (test_x, test_y) = splits
    try:
        save_atomic(dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y), cache_path)
    except OSError as e:
        print(f"warning: could not write the cache {cache_path} ({e}); decoding again next time", file=sys.stderr)
    return splits


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
    with open(os.path.join(root, "wnids.txt")) as fh:
        wnids = sorted(line.strip() for line in fh if line.strip())

    def build():
        train_paths, train_y, _ = _class_folders(os.path.join(root, "train"), wnids)
        index = {w: i for i, w in enumerate(wnids)}
        val_paths, val_y = [], []
        with open(os.path.join(root, "val", "val_annotations.txt")) as fh:
            for line in fh:
                parts = line.split("\t")
                if len(parts) < 2 or parts[1] not in index:
                    raise UsageError(f"malformed line in {root}/val/val_annotations.txt: {line.strip()[:80]!r}")
                val_paths.append(os.path.join(root, "val", "images", parts[0]))
                val_y.append(index[parts[1]])
        return ((_load_images(train_paths, 64), train_y),
                (_load_images(val_paths, 64), torch.tensor(val_y, dtype=torch.long)))

    return _cached(os.path.join(root, "normssl_cache_64.pt"), build, len(wnids), 64)


def _imagenet100(name, data_dir, download):
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise _missing(f"ImageNet-100 folder '{split}'", data_dir,
                           "arrange the 100 classes as <data-dir>/train/<class>/*.JPEG and <data-dir>/val/<class>/*.JPEG")
    classes = sorted(d for d in os.listdir(os.path.join(data_dir, "train"))
                     if os.path.isdir(os.path.join(data_dir, "train", d)))

    def build():
        train_paths, train_y, _ = _class_folders(os.path.join(data_dir, "train"), classes)
        val_paths, val_y, _ = _class_folders(os.path.join(data_dir, "val"), classes)
        print(f"decoding {len(train_paths) + len(val_paths)} ImageNet-100 images once to 128 px...", file=sys.stderr)
        return (_load_images(train_paths, 128), train_y), (_load_images(val_paths, 128), val_y)

    return _cached(os.path.join(data_dir, "normssl_cache_128.pt"), build, len(classes), 128)


def _flowers102(name, data_dir, download):
    root = data_dir if os.path.exists(os.path.join(data_dir, "setid.mat")) else os.path.join(data_dir, "flowers-102")
    if download and not os.path.exists(os.path.join(root, "setid.mat")):
        import torchvision
        _download(name, data_dir, lambda: torchvision.datasets.Flowers102(data_dir, download=True),
                  os.path.join(data_dir, "flowers-102"), "jpg/, imagelabels.mat and setid.mat",
                  inner=("flowers-102",))
    for need in ("jpg", "imagelabels.mat", "setid.mat"):
        if not os.path.exists(os.path.join(root, need)):
            raise _missing(f"Flowers-102 '{need}'", root, "pass --download, or unpack 102flowers.tgz, "
                           "imagelabels.mat and setid.mat into <data-dir>/flowers-102")
    try:
        from scipy.io import loadmat  # .mat files need scipy; it is optional for everything else
    except ImportError:
        raise UsageError("flowers102 needs scipy to read its .mat label files; run 'pip install scipy'")

    def read(file, key):
        """An integer array of a .mat file as an int64 tensor (N,)."""
        path = os.path.join(root, file)
        try:
            values = _labels(np.asarray(loadmat(path)[key]).flatten())
        except Exception:  # scipy's errors for a damaged file vary
            values = None
        if values is None:
            raise UsageError(f"{path} has no readable integer array '{key}'; unpack it again from the Flowers-102 "
                             "download")
        return values

    def build():
        labels = read("imagelabels.mat", "labels") - 1  # 1-based in the file
        # The paper trains on the 6,149-image 'test' split (long-tailed) and evaluates on 'val'.
        split = {k: read("setid.mat", k) for k in ("tstid", "valid")}
        for k, idx in split.items():
            if len(idx) and (idx.min() < 1 or idx.max() > len(labels)):
                raise UsageError(f"{root}/setid.mat lists images outside the {len(labels)} of imagelabels.mat in "
                                 f"'{k}'; unpack both files again")
        n = NUM_CLASSES[name]
        if len(labels) and (labels.min() < 0 or labels.max() >= n):
            raise UsageError(f"{root}/imagelabels.mat holds labels outside the {n} classes 1 to {n}; unpack it again")

        def images(idx):
            return _load_images([os.path.join(root, "jpg", f"image_{i:05d}.jpg") for i in idx.tolist()], 128)

        return ((images(split["tstid"]), labels[split["tstid"] - 1]),
                (images(split["valid"]), labels[split["valid"] - 1]))

    return _cached(os.path.join(root, "normssl_cache_128.pt"), build, NUM_CLASSES[name], 128)


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

def make_backbone(args, img_size):
    """The backbone args.arch names: a torchvision ResNet without its fc layer, or a ViT
    without its head (it then returns the class token's features); returns (module, feature dim).
    ResNets on images of 64 px or less get the CIFAR stem: a 3x3 stride-1 conv and no
    max-pool, so a 32 px image is not shrunk to 8 px before the first block. ViTs use
    patch 4 there (a 32 px image is 8x8 tokens, 16 px is 4x4) and ViT's patch 16 above."""
    import torchvision  # here, not at the top: importing it costs ~2 s, and a bad flag should fail fast
    arch = args.arch
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
    if args.width != 64:
        if arch != "resnet18" or img_size > 64:
            raise UsageError(f"--width {args.width} needs --arch resnet18 on images of 64 px or less")
        return narrow_resnet18(args.width, args.zero_init_residual)
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=args.zero_init_residual)
    if img_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def narrow_resnet18(w, zero_init_residual=True):
    """ResNet-18 with the CIFAR stem and w base channels instead of 64 (stages w, 2w, 4w,
    8w), built from torchvision's own BasicBlock and initialized as torchvision does; at
    w = 16 it costs ~1/16 of the FLOPs, for CPU runs. Returns (module, 8w)."""
    from torchvision.models.resnet import BasicBlock

    def stage(cin, cout, stride):
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))

    net = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                        stage(w, w, 1), stage(w, 2 * w, 2), stage(2 * w, 4 * w, 2), stage(4 * w, 8 * w, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 8w)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, BasicBlock) and zero_init_residual:
            nn.init.zeros_(m.bn2.weight)  # each block starts as the identity
    return net, 8 * w


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


def embedding_stats(z, h, pair, opposite_cos=0.0):
    """Per-step diagnostics as 0-d tensors (no host sync): the norm of the embedding the
    loss sees (z), the backbone-feature norm (h), the SimSiam paper's collapse monitor (the
    per-dimension std of the l2-normalized z: ~1/sqrt(D) healthy, 0 collapsed), and the
    opposite-halves rate of the positive pairs in `pair` = (a, b), the two views'
    embeddings: the fraction with cos(a_i, b_i) < opposite_cos (norms paper, App. C.2).
    "z" keeps the embeddings themselves, for the effective rank at the end of the epoch."""
    z, h = z.detach().float(), h.detach().float()
    norm = z.norm(dim=1)
    cos = F.cosine_similarity(pair[0].detach().float(), pair[1].detach().float(), dim=1)
    return {"emb_norm_mean": norm.mean(), "emb_norm_std": norm.std(),
            "feat_norm_mean": h.norm(dim=1).mean(),
            "collapse_std": F.normalize(z, dim=1).std(dim=0).mean(),
            "opposite_rate": (cos < opposite_cos).float().mean(), "z": z}


def effective_rank(z):
    """exp of the entropy of the normalized singular values of z (N, D) (Roy & Vetterli
    2007): D for isotropic embeddings, 1 when they all lie on one line."""
    s = torch.linalg.svdvals(z.float() - z.float().mean(dim=0))
    p = s / s.sum().clamp_min(1e-12)
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())


# ----------------------------------------------------------------------------- embeddings and k-NN

@torch.no_grad()
def embed(model, x, mean, std, space="backbone", batch_size=1024):
    """Features of uint8 images x (N, 3, H, W) in the given space, as float32 (N, D)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        batch = normalize(x[i: i + batch_size].to(device), mean, std)
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out.append(features(model, batch, space).float())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted k-NN labels for test_f (M, D) from train_f (N, D): each test image's k most
    cosine-similar train images vote with weight exp(sim / t) (Wu et al. 2018). Chunked over
    the queries, so a 50k x 10k similarity matrix never has to exist at once."""
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


# ----------------------------------------------------------------------------- optimization

def peak_lr(args):
    """--lr is per 256 images; the peak lr follows the linear scaling rule (Goyal et al. 2017)."""
    return args.lr * args.batch_size / 256


def make_optimizer(args, groups, device, nesterov=False):
    """SGD with momentum, Adam or AdamW (--optimizer) over param groups, at the peak lr."""
    fused = {"fused": True} if device.type == "cuda" else {}
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr(args), momentum=args.momentum, weight_decay=args.wd,
                               nesterov=nesterov, **fused)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=peak_lr(args), weight_decay=args.wd, **fused)


def lr_factor(step, total, warmup):
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`; per iteration."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


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
    except (OSError, RuntimeError) as e:  # a full disk, a lost mount: torch.save says RuntimeError
        kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was saved"
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise RunFailed(f"could not write {path} ({reason}); {kept}; free some space and resume with "
                        f"--resume auto --out {os.path.dirname(os.path.abspath(path))}")
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


METHODS = ("simclr", "simsiam", "byol", "moco")  # the only modules a checkpoint's 'method' may name


def _shown(value, width=40):
    """A short description of a value read from an untrusted file, for an error message:
    its repr cut to `width` characters (reprlib looks at only the first few items of a
    container, however big), or only its type if it is not a plain Python value."""
    import reprlib
    if isinstance(value, (str, bytes, int, float, bool, type(None), list, tuple, dict)):
        text = reprlib.repr(value)
        return text if len(text) <= width else text[: width - 3] + "..."
    return f"a {type(value).__name__}"


def _refuse(path, field, want, got):
    return UsageError(f"{path} is not a valid normssl checkpoint: '{field}' must be {want} but is {got}; "
                      "refusing to load it (use a last.pt or epoch<N>.pt that a method script wrote)")


def check_checkpoint(ckpt, path):
    """Check the fields of a loaded checkpoint that rebuilding its network reads, so that a
    crafted or damaged file stops with one sentence before anything it names is imported or
    built. The method's own flags in 'args' are checked by check_args once the method is
    known. Returns ckpt."""
    def is_int(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    method = ckpt.get("method")
    if not (isinstance(method, str) and method in METHODS):  # checked first: it picks a module to import
        raise _refuse(path, "method", f"one of {', '.join(METHODS)}", _shown(method))
    if not is_int(ckpt.get("epoch"), 0):
        raise _refuse(path, "epoch", "an int >= 0", _shown(ckpt.get("epoch")))
    for name in ("img_size", "num_classes"):
        if not is_int(ckpt.get(name), 1):
            raise _refuse(path, name, "a positive int", _shown(ckpt.get(name)))
    stats = ckpt.get("data_stats")
    if not (isinstance(stats, (list, tuple)) and len(stats) == 2
            and all(isinstance(s, (list, tuple)) and len(s) == 3 and all(map(is_number, s)) for s in stats)
            and all(s > 0 for s in stats[1])):
        raise _refuse(path, "data_stats", "[mean, std] with 3 finite numbers each and std > 0", _shown(stats))
    args = ckpt.get("args")
    if not (isinstance(args, dict) and all(isinstance(k, str) for k in args)):
        raise _refuse(path, "args", "a dict of flag names to values", _shown(args))
    weights = ckpt.get("model")
    if not (isinstance(weights, dict) and weights):
        raise _refuse(path, "model", "a dict of parameter names to tensors", _shown(weights))
    for k, v in weights.items():
        # Plain CPU tensors only: map_location leaves meta tensors on meta, and sparse ones
        # would only fail later, inside load_state_dict.
        if not (isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided
                and v.device.type == "cpu"):
            got = f"{_shown(v)} at {_shown(k)}" if not isinstance(v, torch.Tensor) else \
                f"a {v.layout} {v.device.type} tensor at {_shown(k)}"
            raise _refuse(path, "model", "a dict of parameter names to dense CPU tensors", got)
    return ckpt


def check_args(saved, cls, path):
    """The method's Args rebuilt from a checkpoint's 'args' dict: each saved flag must have
    its field's type (bool, int, finite float, str; an int where a float is expected is
    fine) and, if the field has choices, be one of them or its default. Flags the
    checkpoint lacks (an older run) take their defaults; names that are no field are ignored."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in saved:
            continue
        v, kind, choices = saved[f.name], type(f.default), f.metadata.get("choices")
        if kind is bool:
            ok = isinstance(v, bool)
        elif kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = isinstance(v, kind)
        if not ok or (choices and v not in choices and v != f.default):  # a default such as moco's "" (unset)
            want = f"one of {', '.join(map(str, choices))}" if ok else f"{'an' if kind is int else 'a'} {kind.__name__}"
            raise _refuse(path, f"args.{f.name}", want, _shown(v))
        values[f.name] = float(v) if kind is float else v
    return cls(**values)


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
    """All-gather along dim 0 that gradients flow back through (torch.distributed.nn has
    one, but its backward needs reduce_scatter, which gloo lacks): every rank's loss may
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
    """All-reduce (sum) that gradients flow back through, for GlobalBatchNorm: the sum is used on every rank,
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
    grad=False the result is a constant: no gradient goes back to any rank (e.g. keys from a momentum encoder)."""
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
    """Batch norm whose training statistics cover the global batch across ranks, for 1d and
    2d inputs, keeping BatchNorm's parameter and buffer names (checkpoints load into the
    plain network). It is here because torch's SyncBatchNorm, used on CUDA, has no CPU
    kernel, and torchrun on CPU processes (gloo) is how multi-process training is tested."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {x.dim()}D")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype)
        total = _SumWithGrad.apply(torch.cat([x.sum(dims), count]))  # (C + 1,) over all ranks
        n = total[-1]
        mean = total[:-1] / n
        # Two passes: the variance from squared deviations, not E[x^2] - E[x]^2, which loses
        # every digit in float32 when the mean is large against the spread (e.g. 1e3 +- 1).
        centred = x - mean.view(shape)
        var = _SumWithGrad.apply((centred * centred).sum(dims)) / n  # biased, as BN normalizes with
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = centred / torch.sqrt(var.view(shape) + self.eps)
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
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)  # a momentum encoder's BN stays out of the optimizer
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module


# ----------------------------------------------------------------------------- runs
# A method script's main() calls these in order: parse_args, start, prepare (then it builds
# its optimizer), restore, and per epoch run.batches, its own step, end_epoch; finish.

class Meter:
    """The bookkeeping of one rank's epoch. add() sums a micro-batch's loss and embedding
    statistics on the device; end_step() checks each step's loss one step late. On CUDA
    the loss is copied to pinned host memory as soon as it is queued, and an event marks
    the copy: by the time the next step has been queued that copy is long done, so the
    check never makes the CPU wait for the GPU (no host sync inside the loop)."""

    def __init__(self, run):
        self.run = run
        self.sums, self.last = {}, {}  # per-epoch sums of 0-d stats; the newest non-scalar stats
        self.step_values = None  # (loss, norm) of the step being taken, on the device
        self.pending = []  # (step, host values, event or None), oldest first
        self.shown = None  # (loss, norm) of the newest checked step, for the progress line

    def add(self, loss, stats, parts):
        """Record one of `parts` micro-batches of a step: loss (0-d) and embedding_stats."""
        values = torch.stack([loss.detach().float(), stats["emb_norm_mean"].float()]) / parts
        self.step_values = values if self.step_values is None else self.step_values + values
        for k, v in {"loss": loss.detach(), **stats}.items():
            if v.dim():
                self.last[k] = v
            else:
                self.sums[k] = self.sums.get(k, 0) + v.float() / parts

    def end_step(self, step):
        """The step's micro-batches are done: queue its loss for checking, check the one before."""
        values, event = self.step_values, None
        if values.device.type == "cuda":
            host = torch.empty(2, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.pending.append((step, values, event))
        self.step_values = None
        self.check(keep=1)

    def check(self, keep=0):
        """Read back and check all but the newest `keep` queued steps."""
        spe = self.run.steps_per_epoch
        while len(self.pending) > keep:
            step, values, event = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            loss, norm = values.tolist()
            if not math.isfinite(loss):
                raise Diverged(divergence_message(f"the loss became {loss}", step // spe, self.run,
                                                  f", step {step % spe + 1}"))
            self.shown = (loss, norm)

    def epoch_means(self):
        """The epoch's mean statistics as floats (averaged over ranks); starts a new epoch."""
        self.check()
        sums, self.sums = self.sums, {}
        if self.run.world > 1:
            import torch.distributed as dist
            flat = torch.stack([sums[k] for k in sorted(sums)])
            dist.all_reduce(flat)
            sums = dict(zip(sorted(sums), flat / self.run.world))
        return {k: v.item() / max(1, self.run.steps_per_epoch) for k, v in sums.items()}


class Progress:
    """Where an epoch is: a tqdm bar on a terminal; elsewhere (CI, nohup, a notebook's log)
    a plain line every 30 s or every 10 % of the epoch, whichever comes first."""
    EVERY_SECONDS = 30
    EVERY_FRACTION = 0.1

    def __init__(self, run, epoch):
        self.run, self.total, self.label = run, run.steps_per_epoch, f"epoch {epoch + 1}/{run.args.epochs}"
        self.off = run.rank != 0
        self.bar = None
        if not self.off and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=self.label, leave=False, dynamic_ncols=True)
        self.t0 = self.last_time = time.time()
        self.last_step = 0

    def update(self, done):
        """`done` steps of the epoch are finished."""
        if self.off:
            return
        shown = self.run.meter.shown
        if self.bar is not None:
            self.bar.update(1)
            if shown:
                self.bar.set_postfix(loss=f"{shown[0]:.4f}", norm=f"{shown[1]:.3f}", refresh=False)
            return
        now = time.time()
        if done < self.total and (now - self.last_time >= self.EVERY_SECONDS
                                  or done - self.last_step >= max(1, self.EVERY_FRACTION * self.total)):
            self.last_time, self.last_step = now, done
            state = f" loss {shown[0]:.4f} norm {shown[1]:.3f}" if shown else ""
            print(f"{self.label} step {done}/{self.total} ({100 * done / self.total:.0f}%){state} "
                  f"{now - self.t0:.0f}s", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclass
class Run:
    """What a method script needs to train: its args, device, data and run folder, and the
    schedule's step counts. One per process."""
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

    def __post_init__(self):
        self.meter = Meter(self)
        self.started = self.epoch_start = time.time()
        self.last_line = None  # the newest metrics line

    @property
    def steps_per_epoch(self):
        return len(self.data.train_x) // self.args.batch_size  # the last partial batch is dropped

    @property
    def total_steps(self):
        return self.args.epochs * self.steps_per_epoch

    def lr_at(self, step):
        """The lr of optimizer step `step`: warmup, then cosine (per iteration)."""
        return peak_lr(self.args) * lr_factor(step, self.total_steps, self.args.warmup * self.steps_per_epoch)

    def progress(self, step):
        """The fraction of training done before `step`, in [0, 1): for EMA schedules."""
        return step / max(1, self.total_steps)

    def autocast(self):
        return autocast(self.device)

    def augment(self, **recipe):
        return Augment(self.data.size, tuple(self.mean), tuple(self.std), **recipe)

    def restore(self, model, optimizer):
        """Load a resumed run's weights, optimizer state and RNG; returns the epoch to start at."""
        if not self.ckpt:
            return 0
        model.load_state_dict(self.ckpt["model"])
        optimizer.load_state_dict(self.ckpt["optimizer"])
        set_rng_state(self.ckpt["rng"])
        return self.ckpt["epoch"]

    def batches(self, epoch):
        """Yield (global step, this rank's --accum micro-batches of uint8 images (b, 3, H, W))
        for every step of the epoch, and show progress."""
        args, data = self.args, self.data
        self.epoch_start = time.time()
        # The data order depends only on (seed, epoch): every rank draws the same
        # permutation and takes its own slice, and a resumed run sees the same order.
        order = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        perm = torch.randperm(len(data.train_x), generator=order).to(self.device)
        # Augmentations differ per rank and are reproducible per epoch (exact resume).
        torch.manual_seed(args.seed * 100003 + epoch * 1009 + self.rank + 1)
        local = args.batch_size // self.world  # this rank's share of each global batch
        micro = local // args.accum
        progress = Progress(self, epoch)
        for i in range(self.steps_per_epoch):
            start = i * args.batch_size + self.rank * local
            yield epoch * self.steps_per_epoch + i, [data.train_x[perm[start + a * micro: start + (a + 1) * micro]]
                                                     for a in range(args.accum)]
            progress.update(i + 1)
        progress.close()


class Finished(Exception):
    """Resuming a run that has already done all its epochs: nothing to do, exit status 0."""


# What an interrupted run can tell its user: the folder and the epoch that last.pt holds.
STATUS = {"folder": None, "saved": None, "lock": None}


def start(method, args):
    """Everything before the model exists: join torchrun's process group, resolve --resume,
    pick the device, seed, load the data onto the device and create (or reopen and lock)
    the run folder. Prints the start line. Under torchrun only rank 0 writes."""
    rank, size, local_rank = init_distributed()
    ckpt, notes, folder = None, [], None
    path = resume_path(args)
    if path and os.path.exists(path):
        ckpt = load_checkpoint(path)
        check_checkpoint(ckpt, path)
        if ckpt["method"] != method:
            raise UsageError(f"{path} is a {ckpt['method']} checkpoint; resume it with {ckpt['method']}.py")
        folder = os.path.dirname(os.path.abspath(path))
        if args.out and os.path.abspath(args.out) != folder:
            raise UsageError(f"a resumed run stays in its own folder {folder}; drop --out or make it match")
        check_resume_target(path, ckpt)
        args = merge_resume_args(dataclasses.asdict(check_args(ckpt["args"], type(args), path)), args)
        if ckpt["epoch"] >= args.epochs:
            raise Finished(f"{path} has finished all {ckpt['epoch']} epochs; nothing to do "
                           f"(pass --epochs N with N > {ckpt['epoch']} to train on). Next: python eval_knn.py {path} --all")
    elif args.resume and args.resume != "auto":
        raise UsageError(f"--resume {args.resume}: no checkpoint there; pass a last.pt, its run folder, "
                         "or --resume auto --out FOLDER")
    else:
        args, gradscale_notes = gradscale_preset(args)
        notes = [*getattr(args, "notes", []), *gradscale_notes]
        folder = args.out or os.path.join(
            "runs", f"{method}-{args.dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        leftovers = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"--out {folder} is a file, not a folder; choose another --out")
        if args.resume == "auto" and leftovers <= {"args.json", "metrics.jsonl", "lock"}:
            if leftovers:  # a run stopped before its first checkpoint: start it over
                notes.append(f"{folder} has no checkpoint yet: starting from epoch 0")
        elif leftovers:
            raise UsageError(f"output folder {folder} already exists and is not empty; pass --resume auto "
                             f"--out {folder} to continue a run there, or choose another --out")
    if args.batch_size % (size * args.accum):
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of {size} processes x "
                         f"--accum {args.accum}, so every rank gets equal micro-batches")
    device, why = pick_device(args.device)
    if size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
    # The same seed on every rank: the networks start identical. Augmentations are
    # reseeded per rank and epoch in Run.batches.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    data = load_dataset(args.dataset, args.data_dir, args.download, args.subset)
    data, _ = drop_classes(data, parse_classes(args.exclude_classes))
    if args.batch_size > len(data.train_x):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(data.train_x)} training images")
    if args.warmup >= args.epochs > 0:
        notes.append(f"warning: --warmup {args.warmup} >= --epochs {args.epochs}, so the lr never leaves its "
                     f"warmup and never reaches its peak; lower --warmup or raise --epochs")
    mean, std = ckpt["data_stats"] if ckpt else channel_stats(data.train_x)
    if size > 1:
        import torch.distributed as dist
        dist.barrier()  # every rank has checked the folder before rank 0 creates it
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        lock_folder(folder)
        STATUS.update(folder=folder, saved=ckpt["epoch"] if ckpt else None)
        if ckpt:
            trim_metrics(os.path.join(folder, "metrics.jsonl"), ckpt["epoch"])
        else:
            trim_metrics(os.path.join(folder, "metrics.jsonl"), 0)
            with open(os.path.join(folder, "args.json"), "w") as fh:
                json.dump({"format": FORMAT, "method": method, "args": dataclasses.asdict(args)}, fh, indent=1)
        for note in notes:
            print(note, file=sys.stderr)
        resumed = f" | resuming from epoch {ckpt['epoch']}" if ckpt else ""
        print(f"{method} | {args.dataset}: {len(data.train_x)} train / {len(data.test_x)} test images, "
              f"{data.size} px | device {why} | batch {args.batch_size}"
              f"{f' ({args.accum} x {args.batch_size // args.accum})' if args.accum > 1 else ''}, "
              f"peak lr {peak_lr(args):.4g} (--lr {args.lr:.4g} per 256), warmup {args.warmup} of {args.epochs} "
              f"epochs | run folder {folder}{resumed}", flush=True)
    return Run(method, args, device, data.to(device), mean, std, folder, ckpt, rank, size)


def resume_path(args):
    """The checkpoint --resume names: a file, FOLDER/last.pt, or with 'auto' OUT/last.pt."""
    if not args.resume:
        return None
    if args.resume == "auto":
        if not args.out:
            raise UsageError("--resume auto needs --out pointing at the run folder to continue")
        return os.path.join(args.out, "last.pt")
    return os.path.join(args.resume, "last.pt") if os.path.isdir(args.resume) else args.resume


def lock_folder(folder):
    """Hold FOLDER/lock (our pid, created with O_EXCL) until this process exits, so that two
    runs never write into one folder. A lock whose process is gone is taken over."""
    path = os.path.join(folder, "lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and process_alive(pid):
                raise UsageError(f"{folder} is in use by another run (pid {pid}); wait for it to finish, "
                                 "or choose another --out")
            print(f"taking over {path}: its process ({pid or 'unknown'}) is no longer running", file=sys.stderr)
            os.remove(path)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        import atexit
        atexit.register(unlock_folder, path, os.getpid())
        STATUS["lock"] = path
        return
    raise UsageError(f"could not lock {path}; remove it if no run is using {folder}")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def unlock_folder(path=None, pid=None):
    """Remove the lock this process holds (at exit, or when main() returns or fails)."""
    path, pid = path or STATUS.get("lock"), pid or os.getpid()
    if not path:
        return
    try:
        if int(open(path).read().strip()) == pid:
            os.remove(path)
    except (OSError, ValueError):
        pass


def prepare(model, run, sync_bn=True):
    """Ready a freshly built model for training on run's device: under torchrun (with
    sync_bn) its batch norms use global-batch statistics, and on CUDA it runs channels-last.
    Build the optimizer after this, from the returned model: the BN swap makes new modules."""
    if sync_bn and run.world > 1:
        model = global_batchnorm(model)
    model.to(run.device)
    if run.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def end_epoch(run, model, optimizer, epoch):
    """Close an epoch: check the last step and the weights, evaluate k-NN (every
    --knn-every epochs and at the end), log a metrics line and save last.pt atomically.
    Returns the metrics line (None on ranks other than 0, which only check)."""
    args = run.args
    metrics = run.meter.epoch_means()
    check_weights(model, optimizer, epoch, run)  # before anything is written
    if run.rank:
        return None
    z = run.meter.last.get("z")
    if z is not None:
        metrics["effective_rank"] = effective_rank(z)
    done = epoch + 1
    line = {"epoch": done, "step": done * run.steps_per_epoch, "lr": optimizer.param_groups[0]["lr"], **metrics}
    if done == args.epochs or (args.knn_every and done % args.knn_every == 0):
        line["knn_top1"] = knn_eval(model, run.data, run.mean, run.std)
    seconds = time.time() - run.epoch_start
    line.update(epoch_seconds=round(seconds, 3),
                images_per_second=round(run.steps_per_epoch * args.batch_size / max(seconds, 1e-9), 1))
    with open(os.path.join(run.folder, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps(line) + "\n")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()), flush=True)
    warn_collapse(line, z, done)
    ckpt = {"format": FORMAT, "method": run.method, "args": dataclasses.asdict(args), "epoch": done,
            "step": done * run.steps_per_epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng_state(), "data_stats": [run.mean, run.std],
            "num_classes": run.data.num_classes, "img_size": run.data.size, "metrics": line}
    save_atomic(ckpt, os.path.join(run.folder, "last.pt"))
    STATUS["saved"] = done
    if args.save_every and done % args.save_every == 0:
        save_atomic(ckpt, os.path.join(run.folder, f"epoch{done}.pt"))
    run.last_line = line
    return line


def check_weights(model, optimizer, epoch, run):
    """Overflowed embeddings normalize to zero, so a cosine loss can stay finite while the
    weights are NaN: check every parameter, buffer and optimizer state tensor (one read)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values()
                if torch.is_tensor(v) and v.is_floating_point()]
    finite = torch.stack([t.detach().isfinite().all() for t in tensors if t.is_floating_point()]).all()
    if not finite.item():
        raise Diverged(divergence_message("the weights became NaN or infinite", epoch, run, ""))


COLLAPSE_RATIO = 0.1  # warn when the std of the normalized embeddings is below 1/10 of 1/sqrt(D)


def warn_collapse(line, z, epoch):
    """A collapsed embedding has near-zero spread on the unit sphere: the per-dimension std
    of the normalized embeddings falls far below the 1/sqrt(D) of a spread-out one (SimSiam
    paper, Fig. 2), and their effective rank drops towards 1."""
    if z is None or "collapse_std" not in line:
        return
    healthy = 1 / math.sqrt(z.shape[1])
    if line["collapse_std"] < COLLAPSE_RATIO * healthy:
        print(f"warning: the embeddings look collapsed at epoch {epoch}: the per-dimension std of the normalized "
              f"embeddings is {line['collapse_std']:.2g}, below {COLLAPSE_RATIO:g} x 1/sqrt({z.shape[1]}) = "
              f"{COLLAPSE_RATIO * healthy:.2g}, effective rank {line.get('effective_rank', float('nan')):.1f} of "
              f"{min(z.shape)}. Usual causes: --lr too high, --wd too large, or a --cut too large for the "
              "number of epochs", file=sys.stderr, flush=True)


def finish(run, model):
    """After the last epoch: the result, where it is, and what to run next (rank 0), then
    leave the process group together."""
    if run.rank == 0:
        line = run.last_line or {}
        last, metrics = os.path.join(run.folder, "last.pt"), os.path.join(run.folder, "metrics.jsonl")
        knn = line.get("knn_top1")
        knn = f"{knn:.2f} %" if knn is not None else "-"
        norm = line.get("emb_norm_mean")
        norm = f"{norm:.3f}" if norm is not None else "-"
        print(f"done: k-NN top-1 {knn}, embedding norm {norm}, wall time {time.time() - run.started:.0f} s\n"
              f"wrote {last} and {metrics}\nnext: python eval_knn.py {last} --all", flush=True)
    if run.world > 1:
        import torch.distributed as dist
        dist.barrier()  # the other ranks wait for rank 0's last checkpoint before leaving
        dist.destroy_process_group()
    return model


# The GradScale schedule. The paper's Sec. 6 ("GradScale Layer") asks for a long linear
# warmup and a smaller base lr, since scaling each gradient by ||z||^p undoes the 1/||z||
# that would otherwise keep the first steps small. The numbers are the authors' own SimCLR
# demo (github.com/Andrew-Draganov/SSLEmbeddingNorms, CLA/experiments/model_comparison.py):
# 100 warmup epochs, peak lr 0.1 where the default is 0.6 at batch 512, i.e. a sixth.
GRADSCALE_WARMUP = 100  # epochs
GRADSCALE_LR_FACTOR = 1 / 6  # of the method's --lr; the demo is SimCLR's, the other methods reuse the ratio


def gradscale_preset(args):
    """With GradScale on (--power != 0), set --warmup 100 and --lr to a sixth of the
    method's default, each unless it was typed: `--power 1` alone is the paper's setting.
    Returns (args, [a line saying what changed]); args.json then records the values used."""
    given = getattr(args, "given", set())
    if not args.power:
        return args, []
    changes = {}
    if "warmup" not in given and args.warmup < GRADSCALE_WARMUP:
        changes["warmup"] = GRADSCALE_WARMUP
    if "lr" not in given:
        changes["lr"] = args.lr * GRADSCALE_LR_FACTOR
    if not changes:
        return args, []
    shown = " ".join(f"--{k} {v:g}" for k, v in changes.items())
    args = dataclasses.replace(args, **changes)
    args.given = given
    return args, [f"GradScale preset: {shown} (type either flag to override)"]


def check_resume_target(path, ckpt):
    """Refuse to resume from an older epoch<N>.pt when the folder's last.pt is further on:
    continuing would overwrite it."""
    last = os.path.join(os.path.dirname(os.path.abspath(path)), "last.pt")
    if os.path.abspath(path) != last and os.path.exists(last):
        later = load_checkpoint(last)["epoch"]
        if later > ckpt["epoch"]:
            raise UsageError(f"resuming from epoch {ckpt['epoch']} would overwrite {last} (epoch {later}); "
                             "copy the checkpoint into a new folder and resume it there")


def read_jsonl(path, valid=lambda row: type(row.get("epoch")) is int, shown="lines"):
    """The JSON objects of a metrics.jsonl, one per line, and the numbers of its damaged lines.
    A line is damaged when it is not a JSON object that `valid` accepts (a kill mid-write
    leaves half a line; a disk error, garbage); damaged lines are skipped with one warning."""
    rows, damaged = [], []
    with open(path, errors="replace") as fh:  # undecodable bytes make a damaged line, not a crash
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and valid(row):
                rows.append(row)
            else:
                damaged.append(i)
    if damaged:
        where = ", ".join(map(str, damaged[:3])) + (", ..." if len(damaged) > 3 else "")
        print(f"warning: skipped {len(damaged)} damaged line{'s' * (len(damaged) > 1)} of {path} (line {where})"
              + (f"; the other {len(rows)} {shown} are kept" if rows else ""), file=sys.stderr)
    return rows, damaged


def trim_metrics(path, epoch):
    """Rewrite metrics.jsonl to the epochs up to the checkpoint being resumed: drops lines
    written after it (a kill between the metrics line and the checkpoint) and damaged ones."""
    if not os.path.exists(path):
        return
    keep = [row for row in read_jsonl(path)[0] if row["epoch"] <= epoch]
    with open(path + ".tmp", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in keep)
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


class RunFailed(Exception):
    """The run itself failed (not the input): one sentence, exit status 1."""


class Diverged(RunFailed):
    """The loss or the weights became NaN or infinite."""


def divergence_message(what, epoch, run, where):
    args = run.args
    hints = []
    if args.power:
        hints.append(f"GradScale (--power {args.power:g}) scales gradients by the embedding norm, so it needs a "
                     "smaller --lr or a longer --warmup")
    if args.wd >= 1e-3:
        hints.append(f"--wd {args.wd:g} is large")
    hints.append(f"--lr {args.lr:g} may be too high")
    saved = STATUS["saved"]
    kept = (f"{os.path.join(run.folder, 'last.pt')} still holds epoch {saved}, the last good one" if saved
            else "no checkpoint was written")
    return f"{what} at epoch {epoch + 1}{where}; {'; '.join(hints)}. Training stopped; {kept}"
