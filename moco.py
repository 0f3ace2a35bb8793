"""MoCo v2: "Improved Baselines with Momentum Contrastive Learning" (Chen et al., 2020, arXiv
2003.04297) and MoCo v3: "An Empirical Study of Training Self-Supervised Vision Transformers" (Chen,
Xie & He, 2021, arXiv 2104.02057), as trained in the embedding-norms paper (Draganov et al., 2025).

A query encoder learns by gradient descent; a key encoder follows it as a moving average of
its weights. InfoNCE asks each query q to find the key k of the other view of its image among
negatives: in v2 a FIFO queue of keys from past batches, in v3 the other keys of the batch (v3
adds a predictor and trains ViTs). The loss only sees the direction of q, so ||q|| grows and
slows learning; --cut and --power counter that.

    python moco.py --version v2 --dataset cifar10 --cut 3
    python moco.py --version v3 --dataset cifar10 --cut 3    # ViT-Small, patch 4

Differences from the official code: torchvision's ViT (learned position embedding, patch 4
below 64 px) where MoCo v3 uses timm's (2-D sin-cos position embedding, patch 16); ResNets use
the CIFAR stem below 64 px; float32 contrastive logits (see the losses); v2 on one device uses
split BN and a key shuffle in place of shuffle-BN over 8 GPUs (see the model).
"""
import copy
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common
import safety
from common import arg
from gradscale import gradscale


@dataclass
class Args(common.Args):
    """MoCo flags, with v2's defaults; defaults() below sets v3's for the flags not typed."""
    version: str = arg("v2", "v2 (queue of past keys as negatives) or v3 (in-batch negatives, predictor, ViT)",
                       ("v2", "v3"))
    arch: str = arg("resnet18", "backbone; v3: vit_small (MoCo v3 paper)",
                    common.Args.__dataclass_fields__["arch"].metadata["choices"])
    optimizer: str = arg("sgd", "optimizer; v3: adamw (MoCo v3 paper)",
                         common.Args.__dataclass_fields__["optimizer"].metadata["choices"])
    lr: float = arg(0.03, "base lr per 256 images (MoCo v2 code); v3: 1.5e-4 (MoCo v3 paper, ViT)", positive=True)
    wd: float = arg(5e-4, "weight decay (MoCo's CIFAR-10 demo; the MoCo v2 paper uses 1e-4 on ImageNet); "
                          "v3: 0.1 (MoCo v3 paper, ViT)", low=0)
    warmup: int = arg(0, "epochs of linear lr warmup (0: plain cosine); v3: 40 (MoCo v3 paper)", low=0)
    temperature: float = arg(0.2, "InfoNCE temperature tau (MoCo v2 paper; MoCo v3 paper, ViT)", positive=True)
    proj_dim: int = arg(128, "projector output dimension, the size of q and k (MoCo v2 paper); v3: 256 "
                             "(MoCo v3 paper)", positive=True)
    mlp_dim: int = arg(4096, "v3 only: hidden width of projector and predictor (MoCo v3 paper); "
                       "v2's hidden width is the backbone's feature width, as in the MoCo v2 code", positive=True)
    m: float = arg(0.99, "key-encoder momentum m in k <- m k + (1 - m) q; default by --version and dataset: v2 0.999 "
                   "on imagenet100 (MoCo v2 paper), else 0.99 (MoCo's CIFAR-10 demo); v3 0.99 at the start, raised "
                   "to 1 by a half cosine (MoCo v3 paper and code)", low=0, high=1)
    queue: int = arg(4096, "v2: queue size K, the number of negatives; default by dataset: 65536 on imagenet100 "
                     "(MoCo v2 paper), else 4096 (MoCo's CIFAR-10 demo)", positive=True)
    bn_splits: int = arg(8, "v2, ResNet: BN statistics over this many sub-batches (divided by torchrun's ranks), keys "
                         "shuffled across them (shuffle-BN on 8 GPUs, MoCo paper Sec. 3.3); 1: off", positive=True)

    def checks(self):
        """What the ranges above cannot say, as (ok, sentence) for common.validate."""
        v2 = self.version == "v2" and not self.resume  # a resumed run was checked when it began
        world = int(os.environ.get("WORLD_SIZE", 1))
        local, splits = self.batch_size // self.accum // world, max(1, self.bn_splits // world)  # per rank (MoCo)
        return [(not v2 or not self.arch.startswith("resnet") or local % splits == 0,
                 f"the {local} images per rank and micro-batch must be a multiple of --bn-splits {self.bn_splits}"
                 + (f" // {world} ranks = {splits}" if world > 1 else "")
                 + "; change --batch-size, --accum or --bn-splits"),
                (not v2 or self.queue >= self.batch_size,
                 f"--queue {self.queue} must hold at least one batch of {self.batch_size} keys")]


def defaults(first):
    """The defaults that depend on --version or --dataset; common.parse_args sets them unless typed."""
    if first.version == "v3":  # MoCo v3 paper, Sec. 5 "Implementation details", ViT
        return dict(arch="vit_small", optimizer="adamw", lr=1.5e-4, wd=0.1, warmup=40, proj_dim=256)
    return dict(m=0.999, queue=65536) if first.dataset == "imagenet100" else {}  # MoCo v2 paper, ImageNet


# ----------------------------------------------------------------------------- model
# The BN leak (MoCo paper, Sec. 3.3): a query and its key, normalized with the same batch's statistics, share a
# "signature" that the queue's old keys lack, and the network can find the positive by it. MoCo runs BN per GPU
# and shuffles the keys across 8 GPUs (shuffle-BN); on one device v2's ResNet takes BN statistics over --bn-splits
# sub-batches and shuffles the keys (as MoCo's CIFAR-10 demo). v3 needs neither: its negatives share the batch.

def mlp(dims, last_bn):
    """MoCo v3's heads: Linear layers through dims with BN and ReLU between them; last_bn
    adds a BN without affine parameters at the end. No biases: BN would cancel them."""
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


class MoCo(nn.Module):
    """Query encoder (backbone, projector, v3's predictor), trained by gradient; key encoder (key_backbone,
    key_projector), a moving average of it; v2's queue of past keys. Its state_dict is the whole method."""

    def __init__(self, args, img_size):
        super().__init__()
        self.backbone, dim = common.make_backbone(args, img_size)
        if args.version == "v2":
            # --bn-splits imitates GPUs on one device; under torchrun each rank is a GPU and splits what is left.
            common.split_batchnorm(self.backbone, max(1, args.bn_splits // common.world()[1]))
            # 2-layer MLP head, hidden width = feature width (MoCo v2 paper and code).
            self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, args.proj_dim))
            self.predictor = None
            # Random unit vectors stand in for keys until K real ones have been enqueued.
            self.register_buffer("queue", F.normalize(torch.randn(args.queue, args.proj_dim), dim=1))  # (K, D)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # the oldest entry
        else:
            # As the official builder (moco/builder.py): 3-layer projector on a ViT, 2-layer on a
            # ResNet, both ending in BN; 2-layer predictor, ending in BN on a ViT only.
            vit = args.arch.startswith("vit")
            hidden = [args.mlp_dim] * (2 if vit else 1)
            self.projector = mlp([dim, *hidden, args.proj_dim], last_bn=True)
            self.predictor = mlp([args.proj_dim, args.mlp_dim, args.proj_dim], last_bn=vit)
        # Cut-init divides the query encoder, and only then is the key encoder copied from it:
        # both start from the same small weights (embedding-norms paper, Table 3).
        common.cut_init(self, args.cut)
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if args.version == "v3" and hasattr(self.backbone, "conv_proj"):
            # MoCo v3 paper, Sec. 4.2: a frozen random patch projection ("stop-grad conv1") avoids the loss
            # spikes that make ViT training unstable. main() leaves it out of the optimizer; cut-init divided it.
            self.backbone.conv_proj.requires_grad_(False)

    def forward(self, x):
        """(h, q, u), u the input of v3's last predictor layer: on a ViT a BN without affine parameters, which
        fixes the batch mean of ||q||^2 at proj_dim whatever the weights, so only ||u|| shows what cut-init does."""
        h = self.backbone(x)  # (B, 512) for ResNet-18, (B, 384) for ViT-Small
        q = self.projector(h)  # (B, proj_dim)
        if self.predictor is None:
            return h, q, None
        u = self.predictor[:-1](q)  # (B, proj_dim) on a ViT
        return h, self.predictor[-1](u), u

    @torch.no_grad()
    def keys(self, x, shuffle=False):
        """k = key_projector(key_backbone(x)) (b, proj_dim), no gradient. shuffle: encode all ranks' images in a
        random order, so that a key rarely shares its query's BN statistics (the BN leak above); keep x's order."""
        if not shuffle:
            return self.key_projector(self.key_backbone(x))
        (rank, size), b = common.world(), len(x)
        everyone = common.gather(x, grad=False)  # (B, 3, H, W): all ranks' key images
        perm = torch.randperm(len(everyone), device=x.device)
        if size > 1:
            torch.distributed.broadcast(perm, 0)  # one shuffle for all ranks
        k = self.key_projector(self.key_backbone(everyone[perm[rank * b: (rank + 1) * b]]))
        k = common.gather(k, grad=False)  # (B, D) keys in shuffled order
        return k[perm.argsort()][rank * b: (rank + 1) * b]  # row i is image i's key again


build_model = MoCo  # the network as initialized for training (eval_knn.py rebuilds it from a checkpoint's args)


# ----------------------------------------------------------------------------- loss
# Both losses take their logits in float32 even under bf16 autocast: bf16 keeps 3 significant digits of a cosine,
# and at tau = 0.2 a logit near 5 would move in steps of 0.03, with up to 65536 negatives in the softmax. The
# official code leaves this matmul to (fp16) autocast, which keeps 3 more bits; here it is one small matmul per step.

def info_nce_queue(q, k, queue, temperature):
    """MoCo v2's InfoNCE: query q_i (B, D) must pick its key k_i (B, D) out of the K
    negatives in queue (K, D, unit rows). The positive is logit 0 of each row."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.normalize(common.at_least_fp32(q), dim=1), F.normalize(common.at_least_fp32(k), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1) cosine similarity to the positive
        l_neg = q @ queue.to(q.dtype).T  # (B, K) cosine similarities to the negatives
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def info_nce_in_batch(q, k, temperature):
    """MoCo v3's InfoNCE: query q_i's positive is k_i, the other B - 1 keys of the batch are
    its negatives. The 2 tau factor (MoCo v3 paper, Alg. 1) offsets the 1/tau the logits put
    on the gradient, so changing tau does not change the step size much. Under torchrun the
    keys of all ranks are gathered (constants), and query i of rank r finds its at r * b + i."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.normalize(common.at_least_fp32(q), dim=1), F.normalize(common.at_least_fp32(k), dim=1)
        k = common.gather(k, grad=False)  # (B, D): the global batch's keys
        logits = q @ k.T / temperature  # (b, B)
        labels = torch.arange(len(q), device=q.device) + common.world()[0] * len(q)
        return F.cross_entropy(logits, labels) * 2 * temperature


def compute_loss(model, x1, x2, args):
    """Forward the views through both encoders: (loss, embedding statistics, the keys to enqueue (v2) or None)."""
    if args.version == "v2":
        h, q, _ = model(x1)
        # GradScale sits right before the loss normalizes q: identity forward, each sample's
        # gradient times ||q||^power backward (power=0: plain MoCo).
        q = gradscale(q, args.power)
        k = F.normalize(model.keys(x2, shuffle=args.bn_splits > 1 or common.world()[1] > 1).float(), dim=1)  # (b, D)
        loss = info_nce_queue(q, k, model.queue, args.temperature)
        return loss, common.embedding_stats(q, h, (q, k), args.opposite_cos), k
    (h1, q1, u1), (h2, q2, u2) = model(x1), model(x2)
    q1, q2 = gradscale(q1, args.power), gradscale(q2, args.power)
    k1, k2 = model.keys(x1), model.keys(x2)  # no gradient: the key encoder only follows
    loss = info_nce_in_batch(q1, k2, args.temperature) + info_nce_in_batch(q2, k1, args.temperature)
    stats = common.embedding_stats(torch.cat([q1, q2]), torch.cat([h1, h2]), (q1, q2), args.opposite_cos)
    if args.arch.startswith("vit"):  # the norm before the predictor's final BN (see MoCo.forward)
        stats["pre_bn_norm_mean"] = torch.cat([u1, u2]).detach().float().norm(dim=1).mean()
    return loss, stats, None


# ----------------------------------------------------------------------------- momentum and queue

def key_momentum(args, progress):
    """v2: a constant m. v3: m rises from args.m to 1 along a half cosine over training, so the keys
    settle as training ends (MoCo v3 code, --moco-m-cos in its ViT recipes; BYOL does the same)."""
    return args.m if args.version == "v2" else 1 - (1 - args.m) * (1 + math.cos(math.pi * progress)) / 2


@torch.no_grad()
def momentum_update(model, m):
    """k <- m k + (1 - m) q for every key-encoder parameter (MoCo paper, Eq. 2). The key
    encoder's BN running statistics are its own, from its own forward passes."""
    for query, key in ((model.backbone, model.key_backbone), (model.projector, model.key_projector)):
        for q, k in zip(query.parameters(), key.parameters()):
            k.lerp_(q, 1 - m)  # m k + (1 - m) q, and exactly k where q == k (a frozen layer)


@torch.no_grad()
def enqueue(model, k):
    """Write the keys k (B, D) over the B oldest entries of the queue, a ring buffer whose
    pointer marks the oldest entry; wraps around when K is not a multiple of B."""
    k = k.detach()  # the queue holds constants: no gradient ever reaches old keys
    idx = (model.queue_ptr + torch.arange(len(k), device=k.device)) % len(model.queue)  # (B,)
    model.queue.index_copy_(0, idx, k.to(model.queue.dtype))
    model.queue_ptr.copy_((model.queue_ptr + len(k)) % len(model.queue))


# ----------------------------------------------------------------------------- training

def make_views(run):
    """The two augmentation recipes."""
    if run.args.version == "v2":
        view = run.augment()  # SimCLR's recipe with blur p=0.5 ("aug+", MoCo v2 paper)
        return view, view
    # BYOL's asymmetric pair, which the MoCo v3 paper adopts (Sec. 5). Crops from 8% of the image up (MoCo v3
    # code's default), from 20% at 64 px or less (its ResNet recipes' --crop-min, and byol.py's at 32 px).
    shared = dict(scale=(0.2 if run.data.size <= 64 else 0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))
    return run.augment(blur_p=1.0, **shared), run.augment(blur_p=0.1, solarize_p=0.2, **shared)


def train_step(model, optimizer, batches, views, run, step):
    """One optimizer step on this rank's --accum micro-batches of uint8 images."""
    common.set_lr(optimizer, run.lr_at(step))
    # The momentum update, once per step and before its micro-batches: the key encoder follows the previous step's.
    momentum_update(model, key_momentum(run.args, run.progress(step)))
    optimizer.zero_grad(set_to_none=True)
    keys = []
    for x in batches:
        x1, x2 = views[0](x), views[1](x)  # two augmented views (b, 3, H, W), made on the device
        with run.autocast():
            loss, stats, k = compute_loss(model, x1, x2, run.args)
        run.scaler.scale(loss / len(batches)).backward()  # v2: they add up to the batch's gradient (v3: main warns)
        run.meter.add(loss, stats, len(batches))
        keys.append(k)
    common.average_gradients(model.parameters())  # over torchrun's ranks; no-op in one process
    run.scaler.step(optimizer)  # optimizer.step(), unless --precision fp16 overflowed
    run.scaler.update()
    if run.args.version == "v2":
        # Once per step, after every micro-batch has used the same negatives (as one big batch
        # would): this step's keys, of every rank, are negatives from the next step on.
        enqueue(model, common.gather(torch.cat(keys), grad=False))


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv, defaults)
    run = common.start("moco", args)
    args = run.args
    if args.version == "v3" and args.accum > 1 and run.rank == 0:  # v2's negatives, the queue, do not shrink
        b = args.batch_size // args.accum
        print(f"warning: with --accum {args.accum} each micro-batch of {b} images is its own contrastive batch, with "
              f"{b - 1} negatives per query instead of {args.batch_size - 1}, while the lr is scaled for the full "
              "batch; lower --accum if memory allows", file=sys.stderr)
    model = build_model(args, run.data.size)
    # Under torchrun v3's BN layers use global-batch statistics (the paper's SyncBN); v2's stay per rank (shuffle-BN).
    model = common.prepare(model, run, sync_bn=args.version == "v3")
    trainable = [p for p in model.parameters() if p.requires_grad]  # not the key encoder, not a frozen patch projection
    optimizer = common.make_optimizer(args, trainable, run.device)
    views = make_views(run)
    for epoch in range(run.restore(model, optimizer), args.epochs):
        model.train()
        for step, batches in run.batches(epoch):
            train_step(model, optimizer, batches, views, run, step)
            run.meter.end_step(step)  # checks the previous step's loss, without waiting for this one
        common.end_epoch(run, model, optimizer, epoch)
    return common.finish(run, model)


if __name__ == "__main__":
    safety.cli(main)
