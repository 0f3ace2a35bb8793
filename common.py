"""Plumbing shared by the method scripts: arguments, precision, backbones, cut-init, embedding
statistics and k-NN, the lr schedule, and the helpers each script's training loop calls (start,
Run.batches, end_epoch, finish). The methods (heads, losses, stop-gradients, EMA, queues, the
loop) live in their own scripts, which this file never imports. Skippable neighbours: datasets.py
(data and GPU augmentation), ddp.py (torchrun), safety.py (run-folder safety and checks).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from datasets import DATASETS, Augment, Data, channel_stats, drop_classes, load_dataset, normalize, parse_classes
import safety
from ddp import average_gradients, gather, init_distributed, split_batchnorm, world  # noqa: F401
from safety import FORMAT, Parser, RunFailed, UsageError, divergence_message, save_atomic


# ----------------------------------------------------------------------------- arguments

def arg(default, help, choices=None, positive=False, low=None, high=None):
    """A dataclass field whose help text becomes the --help line of its flag. positive, or
    low and high (inclusive), are the values validate() accepts."""
    return field(default=default, metadata={"help": help, "choices": choices, "positive": positive,
                                            "low": low, "high": high})


# The laptop recipe (README, "Results on a laptop CPU"): real Fashion-MNIST from Debian's
# dataset-fashion-mnist package, a ResNet-18 of 16 base channels, a short schedule.
# Measured on 2 cores (benchmarks/README.md): ~215 images/s at width 16, so 5,000 images x 10
# epochs is about 4 minutes; the k-NN test set is the first 5,000 test images.
# Compiling costs ~30 s on 2 CPU cores and saved 0.07 s of SimCLR's 0.75 s laptop step, none of SimSiam's
# (benchmarks/README.md): it earns its time back over ~500 steps, so 1,000 leaves the laptop runs (190) eager.
COMPILE_STEPS = 1000
# A SimCLR step of batch 32 at width 64 took 15x as long in bf16 as in fp32 with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon), and about 60x on an AMD EPYC without AVX-512 (issue 28).
BF16_SLOWDOWN = "15 to 60 times"
LAPTOP = dict(dataset="fashionmnist", data_dir="/usr/share/datasets/fashion-mnist", subset=5000, width=16,
              batch_size=256, accum=1, epochs=10, warmup=1, knn_every=0, save_every=0)


@dataclass
class Args:
    """Flags every method shares; each script subclasses this and changes defaults.
    PRESETS maps --preset names to flag values; a script may add its own."""
    PRESETS: ClassVar[dict] = {"laptop": LAPTOP}
    preset: str = arg("", "a recipe for every flag you do not type: laptop (Fashion-MNIST, a narrow ResNet-18, "
                          "minutes on a CPU) or, where the script has it, paper (App. C.1)", ("laptop", "paper"))
    dataset: str = arg("cifar10", "training data", DATASETS)
    data_dir: str = arg("data", "where the dataset lives (or is downloaded to)")
    download: bool = arg(True, "download the dataset with torchvision when it is missing (MD5-checked); "
                               "--no-download where there is no internet")
    subset: int = arg(0, "use only the first N train and N test images (0: all); for quick checks", low=0)
    exclude_classes: str = arg("", "classes to train without, e.g. 5,6,7,8,9: they leave both splits, and "
                                   "eval_knn.py's novelty analysis compares their unseen test images with the rest "
                                   "(paper Fig. 3)")
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
                                         "begins as the identity (official SimSiam, MoCo v3, the norms paper's code)")
    power: float = arg(0.0, "GradScale power p: scale each embedding's gradient by ||z||^p (0: off); p != 0 also "
                        "sets --warmup 100 and --lr to a sixth of its default, unless typed (the paper's schedule)")
    opposite_cos: float = arg(0.0, "log the fraction of positive pairs whose cosine is below this as opposite_rate "
                                   "(opposite half-spaces at 0; norms paper, App. C.2, Table S1)", low=-1, high=1)
    knn_every: int = arg(10, "evaluate k-NN top-1 every N epochs (and after the last); 0: only at the end", low=0)
    save_every: int = arg(50, "keep a copy of the checkpoint as epoch<N>.pt every N epochs (0: never)", low=0)
    seed: int = arg(0, "random seed (data order, augmentations, initialization)")
    out: str = arg("", "run folder (default: runs/<method>-<dataset>-<timestamp>)")
    resume: str = arg("", "continue a run from its checkpoint: a path to last.pt, or 'auto' with --out")
    device: str = arg("auto", "cpu, cuda, cuda:N, mps or auto (CUDA, else Apple MPS, else the CPU)")
    precision: str = arg("auto", "autocast: auto is bf16 on CUDA GPUs of compute capability 8+, fp16 with a "
                                 "gradient scaler on older ones (T4, V100), fp32 on CPU and MPS",
                         ("auto", "bf16", "fp16", "fp32"))
    compile: bool = arg(None, f"torch.compile the training forward (inductor; on the CPU it needs a C++ compiler): "
                              f"faster steps after 30 s or more of compiling; default: on for runs of {COMPILE_STEPS} "
                              f"optimizer steps or more, which earn that time back")

    def problem(self):
        """validate(self): checkpoints' flags pass through the same rules as typed ones (safety.check_args)."""
        return validate(self)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """"(default: X)" after each flag's help, unless the help names it already or X is empty."""

    def _get_help_string(self, action):
        if action.default in ("", None, []) or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(cls, doc, argv=None, defaults=None):
    """The command line as a filled `cls`. Defaults that depend on other flags go in with set_defaults
    before the real parse: defaults(first) (moco's per-version values; `first` is the command line
    read once, preset applied), the --preset, then GradScale's schedule. A typed flag always wins."""
    parser = Parser(description=doc.split("\n\n")[0] if doc else None, formatter_class=HelpFormatter,
                    allow_abbrev=False)  # every typed flag is spelled out, so `given` sees it
    for f in dataclasses.fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, choices=meta["choices"],
                                help=meta["help"])
    argv = sys.argv[1:] if argv is None else list(argv)
    given = {a.dest for a in parser._actions for s in a.option_strings for t in argv if t == s or t.startswith(s + "=")}
    first = parser.parse_known_args(argv)[0]
    if first.preset and first.preset not in cls.PRESETS:
        parser.error(f"--preset {first.preset} is not defined for this method; it has {', '.join(cls.PRESETS)}")
    preset = {k: v for k, v in cls.PRESETS.get(first.preset, {}).items() if k not in given}
    shown = {k: v for k, v in preset.items() if v != getattr(first, k)}
    vars(first).update(preset)
    changes = {k: v for k, v in (defaults(first) if defaults else {}).items() if k not in given}
    vars(first).update(changes)
    # The GradScale schedule (paper, Sec. 6 "GradScale Layer"): scaling each gradient by ||z||^p
    # undoes the 1/||z|| that keeps the first steps small, so it wants a long warmup and a smaller
    # lr. The numbers are the authors' SimCLR demo (github.com/Andrew-Draganov/SSLEmbeddingNorms,
    # CLA/experiments/model_comparison.py): 100 warmup epochs, and a sixth of the default lr.
    scale = {}
    if first.power and "warmup" not in given and first.warmup < 100:
        scale["warmup"] = 100
    if first.power and "lr" not in given:
        scale["lr"] = first.lr / 6
    parser.set_defaults(**{**changes, **preset, **scale})
    args = cls(**vars(parser.parse_args(argv)))
    problem = validate(args)
    if problem:
        parser.error(problem)
    args.given, args.notes = given, []
    if shown:
        typed = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shown.items())
        args.notes.append(f"--preset {args.preset}: {typed} (type a flag to override it)")
    if scale:
        args.notes.append("GradScale preset: " + " ".join(f"--{k} {v:g}" for k, v in scale.items())
                          + " (type either flag to override)")
    return args


def validate(args):
    """A sentence on the first invalid flag value, or None; before any folder or data exists."""
    for f in dataclasses.fields(args):  # the ranges declared with each flag (arg's positive, low, high)
        v, meta, flag = getattr(args, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            return f"{flag} must be a finite number (got {v})"
        if meta.get("positive") and not v > 0:
            return f"{flag} must be positive (got {v})"
        low, high = meta.get("low"), meta.get("high")
        if low is not None and high is not None and not low <= v <= high:
            return f"{flag} must be in [{low}, {high}] (got {v})"
        if low is not None and high is None and not v >= low:
            return f"{flag} must be >= {low} (got {v})"
        if meta.get("choices") and v not in meta["choices"] and v != f.default:  # saved flags; --preset's '' passes
            return f"{flag} must be one of {', '.join(meta['choices'])} (got {v!r})"
    checks = [  # what one flag's range cannot say
        (args.cut > 0, f"--cut must be positive (got {args.cut}); use 1 to turn cut-initialization off"),
        (args.batch_size >= 2, f"--batch-size must be at least 2, one positive pair and a batch to normalize "
                               f"(got {args.batch_size})"),
        (args.batch_size % args.accum == 0,
         f"--batch-size {args.batch_size} must be a multiple of --accum {args.accum}"),
        (args.batch_size // args.accum >= 2, f"--accum {args.accum} leaves micro-batches of "
         f"{args.batch_size // args.accum} image, and batch norm needs 2 or more; lower --accum"),
        (peak_lr(args) <= 1e30, f"--lr {args.lr:g} gives a peak lr of {peak_lr(args):g}, near float32's limit and "
                                "far beyond any that trains (these methods use 1e-4 to 1); lower --lr"),
        (not (getattr(args, "nesterov", False) and args.optimizer == "sgd" and args.momentum == 0),
         "--nesterov needs momentum, but --momentum is 0; pass --no-nesterov or a --momentum above 0"),
        (0 <= args.seed < 2 ** 31, f"--seed must be in [0, 2^31) (got {args.seed})"),
        (parse_classes(args.exclude_classes) is not None,
         f"--exclude-classes {args.exclude_classes!r} must be class numbers separated by commas, such as 5,6,7"),
    ]
    for ok, message in checks + (args.checks() if hasattr(args, "checks") else []):
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
    missing = {"cuda": "CUDA GPU", "mps": "Apple MPS GPU"}.get(device.type)
    if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not mps):
        raise UsageError(f"--device {name} was asked for but this machine has no {missing}; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: only cpu, cuda, cuda:N, mps and auto are supported")
    return device, f"{name} (as asked)"


def at_least_fp32(x):
    """x in float32 if it is in a lower precision (bf16, fp16); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def amp_dtype(device, precision="auto"):
    """The autocast dtype of --precision on this device (None: fp32). auto: bf16 where a CUDA GPU
    has it natively (compute capability 8+: A100, H100), fp16 on older ones, which emulate bf16
    slowly; fp32 on the CPU and MPS (whose autocast support varies across torch versions)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, precision="auto"):
    """The forward pass's precision context: one code path for every device and dtype."""
    dtype = amp_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


# ----------------------------------------------------------------------------- networks

VITS = {"vit_tiny": (192, 3), "vit_small": (384, 12)}  # (width, heads) as DeiT's, but ViT-S with MoCo v3's 12 heads


def make_backbone(args, img_size):
    """(module, feature dim) of --arch: a torchvision ResNet without its fc, or a ViT (12 blocks, MLP 4x: DeiT,
    Touvron et al. 2021, Table 1) that returns its class token. At 64 px or less ResNets get the CIFAR stem (3x3
    stride-1 conv, no max-pool: a 32 px image is not shrunk to 8 px) and ViTs patch 4 (16 above)."""
    import torchvision  # here, not at the top: importing it costs ~2 s, and a bad flag should fail fast
    arch = args.arch
    if arch in VITS:
        width, heads = VITS[arch]
        patch = 4 if img_size <= 64 else 16
        if img_size % patch:
            raise UsageError(f"--arch {arch} needs an image size divisible by its patch size {patch} "
                             f"(got {img_size} px); use a ResNet for this dataset")
        net = torchvision.models.VisionTransformer(img_size, patch, num_layers=12, num_heads=heads,
                                                   hidden_dim=width, mlp_dim=4 * width)
        net.heads = nn.Identity()  # forward() then ends at the class token: (B, width)
        return net, width
    if args.width != 64:
        if arch != "resnet18" or img_size > 64:
            raise UsageError(f"--width {args.width} needs --arch resnet18 on images of 64 px or less")
        return narrow_resnet18(args.width, args.zero_init_residual)
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=args.zero_init_residual)
    if img_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim, net.fc = net.fc.in_features, nn.Identity()
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
    """Per-step diagnostics as 0-d tensors (no host sync): the norms of the embedding the loss
    sees (z) and of the backbone features (h); SimSiam's collapse monitor, the per-dimension std
    of the normalized z (~1/sqrt(D) healthy, 0 collapsed); the fraction of positive pairs
    `pair` = (a, b) with cos(a_i, b_i) < opposite_cos (norms paper, App. C.2); and z itself."""
    z, h = z.detach().float(), h.detach().float()
    norm = z.norm(dim=1)
    cos = F.cosine_similarity(pair[0].detach().float(), pair[1].detach().float(), dim=1)
    return {"emb_norm_mean": norm.mean(), "emb_norm_std": norm.std(), "feat_norm_mean": h.norm(dim=1).mean(),
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
        batch = normalize(x[i: i + batch_size].to(device), mean, std)  # the channels-last first conv converts it
        with autocast(device, "bf16" if amp_dtype(device) == torch.bfloat16 else "fp32"):  # fp16 overflows
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


# ----------------------------------------------------------------------------- checkpoints

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


# ----------------------------------------------------------------------------- runs
# A method script's main() calls these in order: parse_args, start, prepare (then it builds
# its optimizer), run.restore, and per epoch run.batches, its own train_step, end_epoch; finish.

CHECK_EVERY = 10  # steps between reads of the loss: each read makes the CPU wait for the GPU


class Meter:
    """One rank's epoch statistics, summed on the device. The loss is read back only every
    CHECK_EVERY steps and at the end of the epoch, as nanoGPT reads its own: one code path
    for every device, and a NaN stops the run at most CHECK_EVERY steps late."""

    def __init__(self, run):
        self.run, self.sums, self.last = run, {}, {}  # per-epoch sums of 0-d stats; the newest other stats
        self.step, self.shown = 0, None  # (loss, norm) of this step, and of the newest one read back

    def add(self, loss, stats, parts):
        """Record one of `parts` micro-batches of a step: loss (0-d) and embedding_stats."""
        self.step = self.step + torch.stack([loss.detach().float(), stats["emb_norm_mean"].float()]) / parts
        for k, v in {"loss": loss.detach(), **stats}.items():
            if v.dim():
                self.last[k] = v
            else:
                self.sums[k] = self.sums.get(k, 0) + v.float() / parts

    def end_step(self, step):
        """The step's micro-batches are done; every CHECK_EVERY steps, and at the epoch's end, check its loss."""
        spe = self.run.steps_per_epoch
        if (step + 1) % CHECK_EVERY == 0 or (step + 1) % spe == 0:
            loss, norm = self.step.tolist()
            if not math.isfinite(loss):
                where = f"epoch {step // spe + 1}, step {step % spe + 1}"
                raise RunFailed(divergence_message(f"the loss became {loss}", where, self.run.args, self.run.folder))
            self.shown = (loss, norm)
        self.step = 0

    def epoch_means(self):
        """The epoch's mean statistics as floats (averaged over ranks); starts a new epoch."""
        sums, self.sums = self.sums, {}
        if self.run.world > 1:
            flat = torch.stack([sums[k] for k in sorted(sums)])
            torch.distributed.all_reduce(flat)
            sums = dict(zip(sorted(sums), flat / self.run.world))
        return {k: v.item() / max(1, self.run.steps_per_epoch) for k, v in sums.items()}


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
        # fp16 overflows where bf16 does not: its gradients are scaled up before backward and
        # down before the step (skipped when they overflowed). Disabled, the scaler is a no-op.
        fp16 = amp_dtype(self.device, self.args.precision) == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
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
        return autocast(self.device, self.args.precision)

    def augment(self, **recipe):
        return Augment(self.data.size, tuple(self.mean), tuple(self.std), **recipe)

    def restore(self, model, optimizer):
        """Load a resumed run's weights, optimizer state and RNG; returns the epoch to start at."""
        if not self.ckpt:
            return 0
        path = self.ckpt["path"]
        safety.load_state(model, self.ckpt["model"], path, self.method)
        try:
            optimizer.load_state_dict(self.ckpt["optimizer"])  # it checks the groups, not the tensors: as the weights
            for p in (p for group in optimizer.param_groups for p in group["params"]):
                for name, v in optimizer.state[p].items():
                    if torch.is_tensor(v) and ((v.dim() and v.shape != p.shape) or not v.isfinite().all()):
                        bad = "a tensor holding NaN or infinity" if v.shape == p.shape else f"of shape {tuple(v.shape)}"
                        raise UsageError(f"{path} holds an optimizer state that does not fit: its {name} for a "
                                         f"parameter of shape {tuple(p.shape)} is {bad}; resume from another "
                                         "checkpoint of this run, or start a new run")
            set_rng_state(self.ckpt["rng"])
            if self.ckpt.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(self.ckpt["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UsageError(f"{path} holds no usable optimizer or RNG state ({type(e).__name__}: {e}"[:200]
                             + "); resume from another checkpoint of this run, or start a new run")
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
        micro, total, label = local // args.accum, self.steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}"
        # Progress: a tqdm bar on a terminal; elsewhere (CI, nohup, a notebook's log) a plain
        # line every 30 s or every 10 % of the epoch, whichever comes first.
        bar = tqdm(total=total, desc=label, leave=False, dynamic_ncols=True,
                   disable=self.rank != 0 or not sys.stderr.isatty())
        last = (time.time(), 0)
        for i in range(total):
            start = i * args.batch_size + self.rank * local
            yield epoch * total + i, [data.train_x[perm[start + a * micro: start + (a + 1) * micro]]
                                      for a in range(args.accum)]
            shown = self.meter.shown and f" loss {self.meter.shown[0]:.4f} norm {self.meter.shown[1]:.3f}"
            bar.update(1)
            bar.set_postfix_str(shown or "", refresh=False)
            if bar.disable and self.rank == 0 and i + 1 < total and (time.time() - last[0] >= 30
                                                                     or i + 1 - last[1] >= max(1, total // 10)):
                last = (time.time(), i + 1)
                print(f"{label} step {i + 1}/{total} ({100 * (i + 1) / total:.0f}%){shown or ''} "
                      f"{last[0] - self.epoch_start:.0f}s", file=sys.stderr, flush=True)
        bar.close()


def start(method, args):
    """Everything before the model exists: open the run folder (new or resumed; safety.py), pick the device,
    join torchrun's process group (NCCL for CUDA), seed, load the data; print the start line (rank 0 only)."""
    args, ckpt, folder, notes = safety.open_folder(method, args)
    device, why = pick_device(args.device)
    rank, size, local_rank = init_distributed(device.type == "cuda")
    if args.batch_size % (size * args.accum) or args.batch_size // (size * args.accum) < 2:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of {size} processes x --accum "
                         f"{args.accum}, with micro-batches of 2 or more images for batch norm")
    if size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
    if device.type == "mps" and args.precision in ("bf16", "fp16"):
        raise UsageError(f"--precision {args.precision} is not supported on MPS here; use --precision fp32")
    dtype = amp_dtype(device, args.precision)
    why += {None: ", fp32", torch.bfloat16: ", bf16 autocast", torch.float16: ", fp16 autocast with a gradient "
            "scaler"}[dtype]
    if device.type == "cpu" and dtype == torch.bfloat16 and not (torch.cpu._is_avx512_bf16_supported()
                                                                 or torch.cpu._is_amx_tile_supported()):
        notes.append(f"warning: --precision bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX) is emulated, "
                     f"{BF16_SLOWDOWN} slower than fp32 (benchmarks/README.md); use --precision fp32")
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
    args.compile = compile_choice(args.compile, device, len(data.train_x) // args.batch_size * args.epochs, notes)
    if size > 1:
        torch.distributed.barrier()  # every rank has checked the folder before rank 0 creates it
    if rank == 0:
        safety.claim_folder(folder, method, args, ckpt)
        for note in notes:
            print(note, file=sys.stderr)
        accum = f" ({args.accum} x {args.batch_size // args.accum})" if args.accum > 1 else ""
        print(f"{method} | {args.dataset}: {len(data.train_x)} train / {len(data.test_x)} test images, "
              f"{data.size} px | device {why}{', compiled' if args.compile else ''} | batch {args.batch_size}{accum}, "
              f"peak lr {peak_lr(args):.4g} "
              f"(--lr {args.lr:.4g} per 256), warmup {args.warmup} of {args.epochs} epochs | run folder {folder}"
              + (f" | resuming from epoch {ckpt['epoch']}" if ckpt else ""), flush=True)
    return Run(method, args, device, data.to(device), mean, std, folder, ckpt, rank, size)


def compile_choice(compile, device, steps, notes):
    """--compile as typed, else on for runs of COMPILE_STEPS steps or more. Inductor builds C++ kernels on the CPU:
    without a compiler the run goes on uncompiled, with a warning in notes."""
    on = compile if compile is not None else steps >= COMPILE_STEPS and device.type != "mps"
    cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")  # the compiler inductor calls
    if on and device.type == "cpu" and not shutil.which(cxx):
        notes.append(f"warning: no C++ compiler ({cxx}) found for torch.compile, so this run goes on uncompiled; "
                     "install g++ (or set CXX to one), or pass --no-compile")
        return False
    return on


def prepare(model, run, sync_bn=True):
    """Ready a freshly built model for training on run's device: under torchrun (with sync_bn) its batch norms
    use global-batch statistics; it runs channels-last (faster convolutions on GPUs and CPUs alike), and with
    --compile its forward is compiled in place, so checkpoints hold the same keys either way (no _orig_mod.).
    Build the optimizer after this, from the returned model: the BN swap makes new modules."""
    if sync_bn:
        model = split_batchnorm(model, sync=True)  # a no-op in one process
    model.to(run.device, memory_format=torch.channels_last)
    if run.args.compile:
        model.compile()  # only model(x), the training forward; k-NN embeds through model.backbone, uncompiled
    return model


def end_epoch(run, model, optimizer, epoch):
    """Close an epoch: check the weights, run k-NN (every --knn-every epochs and at the end), log a
    metrics line and save last.pt atomically. Returns the line (None on ranks other than 0)."""
    args, done = run.args, epoch + 1
    metrics = run.meter.epoch_means()
    # Overflowed embeddings normalize to zero, so a cosine loss can stay finite while the
    # weights are NaN: check every parameter, buffer and optimizer state tensor (one read).
    tensors = [*model.parameters(), *model.buffers(), *(v for state in optimizer.state.values()
                                                        for v in state.values() if torch.is_tensor(v))]
    if not torch.stack([t.detach().isfinite().all() for t in tensors if t.is_floating_point()]).all():
        raise RunFailed(divergence_message("the weights became NaN or infinite", f"epoch {done}", args, run.folder))
    if run.rank:
        return None
    z = run.meter.last.get("z")
    if z is not None:
        metrics["effective_rank"] = effective_rank(z)
    line = {"epoch": done, "step": done * run.steps_per_epoch, "lr": optimizer.param_groups[0]["lr"], **metrics}
    if done == args.epochs or (args.knn_every and done % args.knn_every == 0):
        line["knn_top1"] = knn_eval(model, run.data, run.mean, run.std)
    seconds = time.time() - run.epoch_start
    line.update(epoch_seconds=round(seconds, 3),
                images_per_second=round(run.steps_per_epoch * args.batch_size / max(seconds, 1e-9), 1))
    with open(os.path.join(run.folder, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps(line) + "\n")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()), flush=True)
    ckpt = {"format": FORMAT, "method": run.method, "args": dataclasses.asdict(args), "epoch": done,
            "step": done * run.steps_per_epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng_state(),
            "data_stats": [run.mean, run.std],
            "num_classes": run.data.num_classes, "img_size": run.data.size, "metrics": line}
    save_atomic(ckpt, os.path.join(run.folder, "last.pt"))
    safety.STATUS["saved"] = done
    if args.save_every and done % args.save_every == 0:
        save_atomic(ckpt, os.path.join(run.folder, f"epoch{done}.pt"))
    run.last_line = line
    return line


def finish(run, model):
    """After the last epoch: the result, where it is and what to run next; then leave the process group."""
    if run.rank == 0 and run.last_line is None:
        print(f"done: no epoch to train (--epochs {run.args.epochs}); {run.folder} holds args.json only", flush=True)
    elif run.rank == 0:
        line = run.last_line
        last, metrics = os.path.join(run.folder, "last.pt"), os.path.join(run.folder, "metrics.jsonl")
        knn, norm = line.get("knn_top1"), line.get("emb_norm_mean")
        print(f"done: k-NN top-1 {'-' if knn is None else f'{knn:.2f} %'}, embedding norm "
              f"{'-' if norm is None else f'{norm:.3f}'}, wall time {time.time() - run.started:.0f} s\n"
              f"wrote {last} and {metrics}\nnext: python eval_knn.py {last} --all", flush=True)
    if run.world > 1:
        torch.distributed.barrier()  # the other ranks wait for rank 0's last checkpoint before leaving
        torch.distributed.destroy_process_group()
    return model
