"""SimSiam or SimCLR as a newcomer would feed it: the project's model, loss, optimizer and schedule,
but views made by torchvision's PIL transforms in DataLoader worker processes instead of the
project's batched tensor augmentation (datasets.Augment), in the default memory format and
uncompiled. Issue 24 compares the two at the laptop recipe, for accuracy and for speed
(benchmarks/ablation.py runs it as the row `plain-pipeline`; side_by_side.py times both methods).

    python benchmarks/plain_pipeline.py --preset laptop --cut 3 --seed 0 --out runs/plain-c3-s0
    python benchmarks/plain_pipeline.py --preset laptop --cut 3 --workers 0   # views made in this process
    python benchmarks/plain_pipeline.py --method simclr --preset laptop --cut 3

It takes the method script's flags (--preset laptop sets the same recipe) plus --method, --workers and
--threads, and writes metrics.jsonl in the project's format (loss, emb_norm_mean, knn_top1,
epoch_seconds, images_per_second), args.json and last.pt into --out. A run is deterministic
per --seed and --workers; --resume auto --out FOLDER continues an interrupted run exactly.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # throughput.py, beside this file
import common  # noqa: E402
import datasets  # noqa: E402
import safety  # noqa: E402
import simclr  # noqa: E402
import simsiam  # noqa: E402
from common import arg  # noqa: E402
from throughput import PILTwoViews  # noqa: E402


@dataclass
class Plain:
    """The flags of this script on top of the method's: which method, and how the views are made."""
    method: str = arg("simsiam", "the method script whose model, loss and flags are used", ("simsiam", "simclr"))
    workers: int = arg(2, "DataLoader worker processes that make the views (0: in the training process)", low=0)
    threads: int = arg(0, "intra-op threads of the training process (0: torch's default, which follows "
                          "OMP_NUM_THREADS)", low=0)


ARGS = {"simsiam": dataclass(type("Args", (simsiam.Args, Plain), {})),  # simsiam.py's flags (--fix-pred-lr...)
        "simclr": dataclass(type("Args", (simclr.Args, Plain), {}))}  # simclr.py's (--temperature...)


def forward(model, x1, x2, args):
    """(loss, the embeddings the loss normalizes) of the method on two views, as in its script."""
    if args.method == "simclr":
        (_, z1), (_, z2) = model(x1), model(x2)
        return simclr.info_nce(z1, z2, args.temperature), torch.cat([z1, z2])
    (_, z1, p1), (_, z2, p2) = model(x1), model(x2)
    return simsiam.simsiam_loss(p1, p2, z1, z2), torch.cat([p1, p2])


def loader(dataset, args, epoch):
    """The epoch's batches of view pairs. A new loader per epoch, seeded by (seed, epoch): its
    generator draws the order and the workers' seeds, and the transforms use only torch's RNG,
    so an epoch's views do not depend on the epochs before it (a resumed run sees the same).
    The workers start again each epoch, which Linux's fork makes cheap."""
    seed = args.seed * 100003 + epoch
    torch.manual_seed(seed)  # the views' RNG when --workers 0
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                       num_workers=args.workers, generator=torch.Generator().manual_seed(seed))


def resume(args, folder, model, optimizer):
    """Load last.pt for --resume auto and return the epoch to start at (0 for a new run)."""
    path = os.path.join(folder, "last.pt")
    if args.resume not in ("", "auto"):
        raise safety.UsageError(f"--resume {args.resume}: this script resumes only with --resume auto --out FOLDER")
    if args.resume != "auto":
        if {"last.pt", "metrics.jsonl"} & set(os.listdir(folder)):
            raise safety.UsageError(f"{folder} already holds a run; pass --resume auto to continue it, "
                                    "or choose another --out")
        return 0
    if not os.path.exists(path):
        return 0
    ckpt = torch.load(path, weights_only=True)
    if ckpt.get("method") != "plain_pipeline":
        raise safety.UsageError(f"{path} was not written by plain_pipeline.py; choose another --out")
    ignore = ("resume", "out", "workers", "threads", "device")  # what a resumed run may change
    changed = [k for k, v in dataclasses.asdict(args).items() if k not in ignore and ckpt["args"].get(k) != v]
    if changed:
        raise safety.UsageError(f"{path} was trained with other values of --{changed[0].replace('_', '-')}; "
                                "resume it with the flags it started with")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["epoch"]


def main(argv=None):
    first = common.Parser(add_help=False)  # --method picks the flags that the full parse knows
    first.add_argument("--method", default="simsiam", choices=ARGS)
    method = first.parse_known_args(argv)[0].method
    args = common.parse_args(ARGS[method], __doc__, argv)
    unsupported = [flag for flag, used in (("--accum", args.accum != 1), ("--power", args.power != 0),
                                           ("--exclude-classes", args.exclude_classes)) if used]
    if unsupported:
        raise safety.UsageError(f"{unsupported[0]} is not supported by the plain pipeline; run simsiam.py for it")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, why = common.pick_device(args.device)
    torch.manual_seed(args.seed)  # seeded before the data, as common.start does: the same initial weights
    data = datasets.load_dataset(args.dataset, args.data_dir, args.download, args.subset)
    if args.batch_size > len(data.train_x):
        raise safety.UsageError(f"--batch-size {args.batch_size} is larger than the {len(data.train_x)} training "
                                "images; lower it")
    mean, std = datasets.channel_stats(data.train_x)
    model = (simclr if method == "simclr" else simsiam).build_model(args, data.train_x.shape[-1]).to(device)
    groups = model.parameters() if method == "simclr" else [
        {"params": [*model.backbone.parameters(), *model.projector.parameters()]},
        {"params": model.predictor.parameters()}]
    optimizer = common.make_optimizer(args, groups, device, nesterov=getattr(args, "nesterov", False))
    folder = args.out or os.path.join("runs", f"plain-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(folder, exist_ok=True)
    first = resume(args, folder, model, optimizer)
    metrics = os.path.join(folder, "metrics.jsonl")
    # A new run starts the file afresh; a resumed one keeps the lines of its saved epochs.
    kept = safety.read_jsonl(metrics)[0] if first and os.path.exists(metrics) else []
    with open(metrics, "w") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in kept if line["epoch"] <= first)
    with open(os.path.join(folder, "args.json"), "w") as fh:
        json.dump({"method": "plain_pipeline", "args": dataclasses.asdict(args)}, fh, indent=1)
    dataset = PILTwoViews(data.train_x, data.size, mean, std)  # throughput.py's PIL pipeline
    steps_per_epoch = len(dataset) // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, args.warmup * steps_per_epoch
    print(f"plain pipeline | {args.dataset}: {len(data.train_x)} train / {len(data.test_x)} test images | device "
          f"{why} | {args.workers} DataLoader workers, {torch.get_num_threads()} threads | batch {args.batch_size}, "
          f"peak lr {common.peak_lr(args):.4g} | run folder {folder}"
          + (f" | resuming from epoch {first}" if first else ""), flush=True)
    for epoch in range(first, args.epochs):
        t0 = time.time()
        model.train()
        sums = torch.zeros(2, device=device)  # the epoch's summed loss and mean ||p|| (||z||), read at its end
        for i, (x1, x2) in enumerate(loader(dataset, args, epoch)):
            step = epoch * steps_per_epoch + i
            lr = common.peak_lr(args) * common.lr_factor(step, total, warmup)
            # fix-pred-lr: the predictor (group 1) keeps the peak lr, as in simsiam.train_step
            for group in optimizer.param_groups[:1] if getattr(args, "fix_pred_lr", False) else optimizer.param_groups:
                group["lr"] = lr
            x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)  # (B, 3, H, W)
            with common.autocast(device):
                loss, p = forward(model, x1, x2, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach().float(), p.detach().float().norm(dim=1).mean()])
        loss, norm = (sums / steps_per_epoch).tolist()
        if not math.isfinite(loss):
            sys.exit(f"error: the loss became {loss} in epoch {epoch + 1}; lower --lr")
        done = epoch + 1
        line = {"epoch": done, "step": done * steps_per_epoch, "lr": lr, "loss": loss, "emb_norm_mean": norm}
        if done == args.epochs or (args.knn_every and done % args.knn_every == 0):
            line["knn_top1"] = common.knn_eval(model, data, mean, std)
        seconds = time.time() - t0  # with the k-NN evaluation, as common.end_epoch counts it
        line.update(epoch_seconds=round(seconds, 3),
                    images_per_second=round(steps_per_epoch * args.batch_size / seconds, 1))
        with open(metrics, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()), flush=True)
        safety.save_atomic({"method": "plain_pipeline", "epoch": done, "args": dataclasses.asdict(args),
                            "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                           os.path.join(folder, "last.pt"))
    print(f"done: wrote {metrics}", flush=True)


if __name__ == "__main__":
    # Not safety.cli: its message on Ctrl-C speaks of the method scripts' run folders. Here an
    # interrupted run keeps last.pt of its last epoch, and --resume auto continues it.
    try:
        main()
    except safety.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
