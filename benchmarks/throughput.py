"""Throughput of a self-supervised epoch: this project's GPU data path against the
backbone alone and against the usual PIL + DataLoader pipeline, in one process.

For each method the same GPU, batch size and image count are timed four ways:

    floor   the backbone alone: forward + backward of both views and an SGD step, on
            tensors made once (no data, no augmentation, no heads, no loss)
    full    the method's real training step as its main() builds it: datasets.Augment
            makes both views from uint8 images on the device, then the method's
            train_step (forward, loss, backward, optimizer step, EMA or queue) and the
            periodic loss check, as its main() loop runs them
    PIL     the same step fed by torchvision PIL transforms in a DataLoader with one
            worker per CPU core (what most SSL code bases do)
    k-NN    common.embed of a bank and a query set, then common.knn_predict

Seconds per epoch = (images // batch size) x the mean time of the timed steps. The
images are random uint8 noise: no transform here costs more or less with the content.

    python benchmarks/throughput.py                                  # H100 measurement
    python benchmarks/throughput.py --arch resnet50 --json r50.json
    python benchmarks/throughput.py --device cpu --images 64 --batch-size 16 --size 16 \\
        --steps 2 --warmup-steps 1 --workers 0 --knn-bank 64 --knn-queries 32   # smoke test

No GPU numbers have been measured with this script yet; see benchmarks/README.md.
"""
import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
import warnings

# The script lives in benchmarks/; the modules it times live one folder up.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402
import datasets  # noqa: E402
import safety  # noqa: E402

# name -> module; "mocov3" is moco.py with --version v3 (its v3 defaults, moco.defaults).
METHODS = {"simclr": "simclr", "simsiam": "simsiam", "byol": "byol", "moco": "moco", "mocov3": "moco"}
DEFAULT_METHODS = ("simclr", "simsiam", "byol", "moco")
KNN_CLASSES = 10  # labels of the bank are random; only the vote's size matters for the time
PREFETCH = 2  # batches each DataLoader worker keeps ready (torch's default prefetch_factor)

# The issue's targets, defined for an H100 at the default settings below.
TARGET_CONFIG = dict(arch="resnet18", batch_size=512, size=32, images=50000, knn_bank=50000, knn_queries=10000)
MAX_FULL_OVER_FLOOR = {"simclr": 1.2, "simsiam": 1.3, "byol": 1.3, "moco": 1.3}
MIN_PIL_OVER_FULL = 3.0
MAX_KNN_SECONDS = 2.0
MAX_PEAK_GB = 20.0


def parse(argv=None):
    p = common.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="", help="comma-separated, from " + ", ".join(METHODS) +
                   "; default: " + ",".join(DEFAULT_METHODS) + ", skipping any that does not import")
    p.add_argument("--arch", default="resnet18", choices=common.Args.__dataclass_fields__["arch"].metadata["choices"],
                   help="backbone, for every method")
    p.add_argument("--images", type=int, default=50000, help="images in one epoch (CIFAR's train set: 50,000)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=512, help="images per step, each giving two views")
    p.add_argument("--steps", type=int, default=50, help="timed steps per phase")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps before each timed window")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--workers", type=int, default=cpu_count(),
                   help="DataLoader workers for the PIL pipeline (default: all CPU cores); 0 runs it in-process")
    p.add_argument("--skip-pil", action="store_true", help="do not time the PIL DataLoader pipeline")
    p.add_argument("--knn-bank", type=int, default=50000, help="k-NN bank images (the train set in eval_knn)")
    p.add_argument("--knn-queries", type=int, default=10000, help="k-NN query images (the test set)")
    p.add_argument("--json", default="", help="also write every number to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="random seed for the images and the models")
    cfg = p.parse_args(argv)
    checks = [(cfg.batch_size > 0, f"--batch-size must be positive (got {cfg.batch_size})"),
              (cfg.images >= cfg.batch_size, f"--images {cfg.images} must hold at least one batch of {cfg.batch_size}"),
              (cfg.size >= 8, f"--size must be at least 8 px (got {cfg.size})"),
              (cfg.steps > 0, f"--steps must be positive (got {cfg.steps})"),
              (cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {cfg.warmup_steps})"),
              (cfg.workers >= 0, f"--workers must be >= 0 (got {cfg.workers})"),
              (cfg.knn_bank > 0 and cfg.knn_queries > 0, "--knn-bank and --knn-queries must be positive")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    cfg.explicit = bool(cfg.methods)
    cfg.methods = [m.strip() for m in cfg.methods.split(",") if m.strip()] if cfg.methods else list(DEFAULT_METHODS)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(METHODS)}")
    return cfg


def cpu_count():
    """Cores this process may use (the affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ----------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step, steps, warmup, device):
    """Mean wall time of `steps` calls of step() after `warmup` untimed ones. CUDA runs
    asynchronously, so the clock starts and stops on an idle GPU: the window then holds
    exactly the work of its steps, and a step's host-side stalls count as they would."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def host_syncs(step, device):
    """How often one call of step() makes the host wait for the GPU, counted by torch's
    sync debug mode (an .item(), a blocking copy such as torch.tensor(list, device=...)).
    Each wait empties the GPU's queue, so the kernels launched right after it run at the
    host's launch rate rather than back to back. None on the CPU, where nothing waits."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    """Most memory tensors held on the GPU since the last reset_peak, in GB (1e9 bytes)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the floor

class BackboneOnly(nn.Module):
    """A bare backbone, stored as `backbone` like the methods store theirs, so that
    common.embed can embed with it."""

    def __init__(self, arch, size):
        super().__init__()
        self.backbone, self.dim = common.make_backbone(common.Args(arch=arch), size)


def measure_floor(cfg, device):
    """Backbone forward + backward on both views and a fused SGD step, on tensors made
    once: the least a symmetric method's step can cost with this backbone and batch.
    (MoCo v2 back-propagates through one view only and runs the other through the key
    encoder without gradient, so its step can cost less than this floor.)"""
    net = BackboneOnly(cfg.arch, cfg.size).to(device, memory_format=torch.channels_last)  # as common.prepare does
    args = dataclasses.replace(common.Args(), batch_size=cfg.batch_size, arch=cfg.arch)  # SGD, momentum 0.9
    optimizer = common.make_optimizer(args, net.parameters(), device)
    x1, x2 = (torch.randn(cfg.batch_size, 3, cfg.size, cfg.size, device=device) for _ in range(2))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with common.autocast(device):
            # Two calls, as the methods embed their views: BN statistics per view.
            h1, h2 = net.backbone(x1), net.backbone(x2)  # (B, dim) each
        # A stand-in loss that touches every feature, so backward runs the whole backbone.
        loss = h1.float().square().mean() + h2.float().square().mean()
        loss.backward()
        optimizer.step()

    reset_peak(device)
    seconds = seconds_per_step(step, cfg.steps, cfg.warmup_steps, device)
    out = {"step_seconds": seconds, "peak_gb": peak_gb(device)}
    del net, optimizer, x1, x2
    free(device)
    return out


# ----------------------------------------------------------------------------- the methods

def load_method(name):
    """Import a method's module; returns (module, None) or (None, the reason it failed)."""
    try:
        return importlib.import_module(METHODS[name]), None
    except Exception as e:  # a script still being written may fail in any way on import
        return None, f"{type(e).__name__}: {e}"


def method_args(name, module, cfg):
    """The method's own defaults, with this benchmark's batch size and backbone; finished
    the way its main() finishes them."""
    args = module.Args(version="v3") if name == "mocov3" else module.Args()
    if hasattr(module, "defaults"):  # moco.py's "by --version" defaults
        args = dataclasses.replace(args, **module.defaults(args))
    args = dataclasses.replace(args, batch_size=cfg.batch_size, arch=cfg.arch)
    problem = common.validate(args)  # refuses e.g. a batch that moco's --bn-splits does not divide
    if problem:
        raise safety.UsageError(problem)
    return args


def param_groups(name, model):
    """The optimizer's param groups, as each script's main() builds them."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # not an EMA target or a frozen layer
    if name == "simsiam":  # group 1, the predictor, keeps the peak lr ("fix-pred-lr", simsiam.train_step)
        predictor = {id(p) for p in model.predictor.parameters()}
        return [{"params": [p for p in trainable if id(p) not in predictor]},
                {"params": list(model.predictor.parameters())}]
    return [{"params": trainable}]


def method_views(module, run):
    """The two Augment recipes the method's main() trains with."""
    if hasattr(module, "make_views"):  # byol.py and moco.py have their own recipes
        return module.make_views(run)
    view = run.augment()  # SimCLR and SimSiam: the default recipe for both views
    return view, view


class Trainer:
    """The body of the method script's own loop, fed one batch at a time: its train_step,
    then the periodic loss check. What is timed here is exactly what main() runs per step."""

    def __init__(self, module, model, optimizer, run):
        self.module, self.model, self.optimizer, self.run = module, model, optimizer, run
        self.step = 0

    def __call__(self, x, views):
        self.module.train_step(self.model, self.optimizer, [x], views, self.run, self.step)
        self.run.meter.end_step(self.step)
        self.step += 1


PRE_MADE = (lambda pair: pair[0], lambda pair: pair[1])  # "views" of an already augmented pair


def measure_method(name, module, args, cfg, run, floor, pil_batches):
    """Time the full GPU-augmented step, then (unless pil_batches is None) the same
    model and step fed by the PIL DataLoader; returns the method's row of the table."""
    run = dataclasses.replace(run, method=name, args=args)  # the method's args; a fresh Meter
    device, data = run.device, run.data
    torch.manual_seed(cfg.seed)
    reset_peak(device)
    model = common.prepare(module.build_model(args, cfg.size), run)
    optimizer = common.make_optimizer(args, param_groups(name, model), device,
                                      nesterov=getattr(args, "nesterov", False))
    steps_per_epoch = run.steps_per_epoch
    trainer = Trainer(module, model, optimizer, run)
    views = method_views(module, run)
    perm = None

    def full_step():
        nonlocal perm
        i = trainer.step % steps_per_epoch
        if i == 0:  # a new epoch, a new order, as in Run.batches
            perm = torch.randperm(len(data.train_x)).to(device)
        x = data.train_x[perm[i * cfg.batch_size: (i + 1) * cfg.batch_size]]  # (B, 3, H, W) uint8
        trainer(x, views)

    full = seconds_per_step(full_step, cfg.steps, cfg.warmup_steps, device)
    row = {"floor_epoch_seconds": floor["epoch_seconds"], "full_step_seconds": full,
           "full_epoch_seconds": full * steps_per_epoch, "full_over_floor": full * steps_per_epoch / floor["epoch_seconds"],
           "full_peak_gb": peak_gb(device), "full_host_syncs_per_step": host_syncs(full_step, device)}
    if pil_batches is not None:
        def pil_step():
            x1, x2 = (v.to(device, non_blocking=True) for v in next(pil_batches))
            trainer((x1, x2), PRE_MADE)

        reset_peak(device)
        # The loader's queue may hold prefetch_factor x workers batches made while the GPU
        # was busy elsewhere; use them up untimed, so the timed steps wait for batches made
        # at the workers' steady rate.
        pil = seconds_per_step(pil_step, cfg.steps, cfg.warmup_steps + PREFETCH * cfg.workers, device)
        row.update(pil_step_seconds=pil, pil_epoch_seconds=pil * steps_per_epoch,
                   pil_over_full=pil * steps_per_epoch / row["full_epoch_seconds"], pil_peak_gb=peak_gb(device))
    peaks = [row[k] for k in ("full_peak_gb", "pil_peak_gb") if row.get(k) is not None]
    row["peak_gb"] = max(peaks) if peaks else None  # on the CPU nothing is counted
    row["args"] = dataclasses.asdict(args)
    del model, optimizer, trainer
    free(device)
    return row


# ----------------------------------------------------------------------------- the PIL pipeline

class PILTwoViews(torch.utils.data.Dataset):
    """uint8 images as PIL images, two views each through torchvision's transforms: the
    SimCLR/SimSiam CIFAR recipe that datasets.Augment reproduces on the GPU."""

    def __init__(self, x, size, mean, std):
        self.x = x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3), what PIL reads
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(mean, std)])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.x[i])
        return self.transform(img), self.transform(img)


def pil_batches(cfg, x, mean, std, device):
    """An endless stream of (x1, x2) batches from one DataLoader; its workers persist
    across epochs and across methods, so their start-up is paid once, untimed."""
    loader = torch.utils.data.DataLoader(
        PILTwoViews(x, cfg.size, mean, std), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
        prefetch_factor=PREFETCH if cfg.workers > 0 else None)
    while True:
        yield from loader


# ----------------------------------------------------------------------------- k-NN

def measure_knn(cfg, device, mean, std):
    """eval_knn's protocol on a bank and queries of random images: feature extraction
    (both sets) and the weighted k-NN search, timed apart. One small untimed pass first,
    as in training, where the k-NN evaluation never runs on a cold process."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    bank = torch.randint(0, 256, (cfg.knn_bank, 3, cfg.size, cfg.size), dtype=torch.uint8, generator=g).to(device)
    queries = torch.randint(0, 256, (cfg.knn_queries, 3, cfg.size, cfg.size), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, KNN_CLASSES, (cfg.knn_bank,), generator=g).to(device)
    net = BackboneOnly(cfg.arch, cfg.size).to(device, memory_format=torch.channels_last)
    reset_peak(device)
    f = common.embed(net, bank[:1024], mean, std)
    common.knn_predict(f, labels[:1024], common.embed(net, queries[:1024], mean, std), KNN_CLASSES)
    sync(device)
    t0 = time.perf_counter()
    bank_f = common.embed(net, bank, mean, std)  # (N, dim)
    query_f = common.embed(net, queries, mean, std)  # (M, dim)
    sync(device)
    t1 = time.perf_counter()
    common.knn_predict(bank_f, labels, query_f, KNN_CLASSES)
    sync(device)
    t2 = time.perf_counter()
    out = {"bank": cfg.knn_bank, "queries": cfg.knn_queries, "dim": bank_f.shape[1],
           "extract_seconds": t1 - t0, "search_seconds": t2 - t1, "total_seconds": t2 - t0,
           "peak_gb": peak_gb(device)}
    del net, bank, queries, bank_f, query_f
    free(device)
    return out


# ----------------------------------------------------------------------------- report

def hardware(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"torch": torch.__version__, "device": str(device), "device_name": name, "cpu_count": cpu_count(),
            "python": platform.python_version()}


def targets(cfg, result):
    """Each target of the issue as (what, measured, met), or None where they do not apply:
    they are defined for a CUDA GPU (an H100) at the default sizes."""
    if result["hardware"]["device"] == "cpu" or any(getattr(cfg, k) != v for k, v in TARGET_CONFIG.items()):
        return None
    rows = []
    for name, m in result["methods"].items():
        if name in MAX_FULL_OVER_FLOOR:
            limit = MAX_FULL_OVER_FLOOR[name]
            rows.append((f"{name} full/floor <= {limit}", m["full_over_floor"], m["full_over_floor"] <= limit))
            if "pil_over_full" in m:
                rows.append((f"{name} PIL/full >= {MIN_PIL_OVER_FULL:g}", m["pil_over_full"],
                             m["pil_over_full"] >= MIN_PIL_OVER_FULL))
            rows.append((f"{name} peak GB <= {MAX_PEAK_GB:g}", m["peak_gb"], m["peak_gb"] <= MAX_PEAK_GB))
    knn = result["knn"]["total_seconds"]
    rows.append((f"k-NN total s <= {MAX_KNN_SECONDS:g}", knn, knn <= MAX_KNN_SECONDS))
    return [{"target": t, "measured": v, "met": ok} for t, v, ok in rows]


def table(result):
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    cfg, hw = result["config"], result["hardware"]
    lines = [f"torch {hw['torch']} | {hw['device']} ({hw['device_name']}) | {hw['cpu_count']} CPU cores | "
             f"{cfg['arch']}, {cfg['images']} images of {cfg['size']} px, batch {cfg['batch_size']}, "
             f"steps timed per phase: {cfg['steps']}",
             f"{'method':<8} | {'floor s/epoch':>13} | {'full s/epoch':>12} | {'full/floor':>10} | "
             f"{'PIL s/epoch':>11} | {'PIL/full':>8} | {'peak GB':>7} | {'syncs/step':>10}"]
    for name, m in result["methods"].items():
        lines.append(f"{name:<8} | {m['floor_epoch_seconds']:>13.3f} | {m['full_epoch_seconds']:>12.3f} | "
                     f"{m['full_over_floor']:>10.2f} | {num(m.get('pil_epoch_seconds'), '.3f'):>11} | "
                     f"{num(m.get('pil_over_full'), '.2f'):>8} | {num(m['peak_gb'], '.2f'):>7} | "
                     f"{num(m['full_host_syncs_per_step'], 'd'):>10}")
    for name, why in result["skipped"].items():
        lines.append(f"{name:<8} | skipped: {why}")
    k = result["knn"]
    lines.append(f"k-NN: {k['bank']} bank, {k['queries']} queries, {k['dim']}-d: extract {k['extract_seconds']:.3f} s"
                 f" + search {k['search_seconds']:.3f} s = {k['total_seconds']:.3f} s, peak GB {num(k['peak_gb'], '.2f')}")
    if result["targets"] is None:
        lines.append("targets: not checked (they are defined for a CUDA GPU at the default sizes)")
    else:
        for t in result["targets"]:
            lines.append(f"target {t['target']}: {t['measured']:.3f} {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv=None):
    cfg = parse(argv)
    device, _ = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, 256, (cfg.images, 3, cfg.size, cfg.size), dtype=torch.uint8, generator=g)  # (N, 3, S, S)
    mean, std = datasets.channel_stats(x)
    y = torch.zeros(cfg.images, dtype=torch.long)
    # A common.Run, so that run.augment() builds the views as in the method scripts.
    data = datasets.Data("noise", x, y, x[:1], y[:1], num_classes=1).to(device)
    run = common.Run("benchmark", common.Args(batch_size=cfg.batch_size), device, data, mean, std, folder="")
    steps_per_epoch = cfg.images // cfg.batch_size

    methods, skipped = {}, {}
    for name in cfg.methods:
        module, why = load_method(name)
        args = None
        if module is not None:
            try:
                args = method_args(name, module, cfg)
            except safety.UsageError as e:
                why = str(e)
        if args is None:
            if cfg.explicit:  # asked for by name: say so rather than quietly leave it out
                raise safety.UsageError(f"--methods {name} cannot run: {why}")
            print(f"skipping {name}: {why}", file=sys.stderr)
            skipped[name] = why
        else:
            methods[name] = (module, args)

    print(f"floor: {cfg.arch} forward + backward + SGD step", file=sys.stderr, flush=True)
    floor = measure_floor(cfg, device)
    floor["epoch_seconds"] = floor["step_seconds"] * steps_per_epoch
    batches = None if cfg.skip_pil else pil_batches(cfg, x, mean, std, device)
    rows = {}
    for name, (module, args) in methods.items():
        print(f"{name}: full step{'' if cfg.skip_pil else ', then the PIL pipeline'}", file=sys.stderr, flush=True)
        rows[name] = measure_method(name, module, args, cfg, run, floor, batches)
    if batches is not None:
        batches.close()  # ends the loader's iterator, and with it the workers
    print("k-NN evaluation", file=sys.stderr, flush=True)
    knn = measure_knn(cfg, device, mean, std)

    config = {k: v for k, v in vars(cfg).items() if k != "explicit"}
    result = {"config": {**config, "steps_per_epoch": steps_per_epoch}, "hardware": hardware(device),
              "floor": floor, "methods": rows, "skipped": skipped, "knn": knn}
    result["targets"] = targets(cfg, result)
    print(table(result), flush=True)
    if cfg.json:
        with open(cfg.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    safety.cli(main)
