"""MoCo v2: "Improved Baselines with Momentum Contrastive Learning" (Chen, Fan, Girshick & He,
2020, arXiv 2003.04297) and MoCo v3: "An Empirical Study of Training Self-Supervised Vision
Transformers" (Chen, Xie & He, 2021, arXiv 2104.02057), as trained in "On the Importance of
Embedding Norms in Self-Supervised Learning" (Draganov et al., 2025).

A query encoder learns by gradient descent; a key encoder follows it as a moving average of
its weights and gets no gradient. InfoNCE asks each query q to find the key k of the other
view of its image among negatives: in v2 a FIFO queue of keys from past batches, in v3 the
other keys of the same batch (v3 adds a predictor on the query side and trains ViTs). The
loss only sees the direction of q, so ||q|| grows and slows learning; --cut and --power
counter that.

    python moco.py --version v2 --dataset cifar10 --cut 3
    python moco.py --version v3 --dataset cifar10 --cut 3    # ViT-Small, patch 4

MoCo v3's heads follow the official moco/builder.py layer for layer: Linear layers without
bias, hidden width --mlp-dim 4096, BN + ReLU between layers; the projector has 3 layers on a
ViT and 2 on a ResNet and ends in BN(affine=False); the 2-layer predictor ends in
BN(affine=False) on a ViT and in a plain Linear on a ResNet. Differences from the official
code that remain: torchvision's ViT (learned position embedding, patch 4 below 64 px) where
the official code uses a timm ViT with fixed 2-D sin-cos position embedding and patch 16;
ResNets use the CIFAR stem below 64 px; the contrastive logits are computed in float32
(see the losses); v2 on one device shuffles keys over --bn-splits BN sub-batches in place
of shuffle-BN over 8 GPUs.
"""
import copy
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common
from common import arg
from gradscale import gradscale


@dataclass
class Args(common.Args):
    """MoCo flags. Flags whose default says "by --version" are filled by resolve() from
    DEFAULTS below unless typed; args.json and the start line show the values used."""
    version: str = arg("v2", "v2 (queue of past keys as negatives) or v3 (in-batch negatives, predictor, ViT)",
                       ("v2", "v3"))
    arch: str = arg("", "backbone; default by --version: v2 resnet18, v3 vit_small (MoCo v3 paper)",
                    common.Args.__dataclass_fields__["arch"].metadata["choices"])
    optimizer: str = arg("", "optimizer; default by --version: v2 sgd, v3 adamw (MoCo v3 paper)",
                         common.Args.__dataclass_fields__["optimizer"].metadata["choices"])
    lr: float = arg(0.0, "base lr per 256 images; default by --version: v2 0.03 (MoCo v2 code), "
                         "v3 1.5e-4 (MoCo v3 paper, ViT)", positive=True)
    wd: float = arg(-1.0, "weight decay; default by --version: v2 5e-4 (MoCo's CIFAR-10 demo; the MoCo v2 paper "
                          "uses 1e-4 on ImageNet), v3 0.1 (MoCo v3 paper, ViT)", low=0)
    warmup: int = arg(-1, "epochs of linear lr warmup; default by --version: v2 0 (plain cosine), "
                          "v3 40 (MoCo v3 paper)", low=0)
    temperature: float = arg(0.2, "InfoNCE temperature tau (MoCo v2 paper; MoCo v3 paper, ViT)",
                             positive=True)
    proj_dim: int = arg(0, "projector output dimension, the size of q and k; default by --version: v2 128 "
                           "(MoCo v2 paper), v3 256 (MoCo v3 paper)", positive=True)
    mlp_dim: int = arg(4096, "v3 only: hidden width of projector and predictor (MoCo v3 paper); "
                       "v2's hidden width is the backbone's feature width, as in the MoCo v2 code", positive=True)
    m: float = arg(-1.0, "key-encoder momentum m in k <- m k + (1 - m) q; default by --version and dataset: v2 0.999 "
                   "on imagenet100 (MoCo v2 paper), else 0.99 (MoCo's CIFAR-10 demo); v3 0.99 at the start, raised "
                   "to 1 by a half cosine (MoCo v3 paper and code)", low=0, high=1)
    queue: int = arg(0, "v2: queue size K, the number of negatives; default by dataset: 65536 on imagenet100 "
                     "(MoCo v2 paper), else 4096 (MoCo's CIFAR-10 demo)", positive=True)
    bn_splits: int = arg(8, "v2, ResNet: BN statistics over this many sub-batches, keys shuffled across them "
                         "(shuffle-BN of 8 GPUs, MoCo paper Sec. 3.3); 1 turns it off", positive=True)


# The per-version defaults, in one place: MoCo v2 paper and code (with its CIFAR-10 demo
# where the paper is ImageNet-only), and MoCo v3 paper, Sec. 5, "Implementation details".
DEFAULTS = {
    "v2": dict(arch="resnet18", optimizer="sgd", lr=0.03, wd=5e-4, warmup=0, proj_dim=128, m=0.99, queue=4096),
    "v3": dict(arch="vit_small", optimizer="adamw", lr=1.5e-4, wd=0.1, warmup=40, proj_dim=256, m=0.99, queue=4096),
}
UNSET = {"arch": "", "optimizer": "", "lr": 0.0, "wd": -1.0, "warmup": -1, "proj_dim": 0, "m": -1.0, "queue": 0}


def resolve(args):
    """Fill every flag left at "by --version" from DEFAULTS (a typed flag is kept, even if
    it equals the "unset" value, so --wd -1 is refused rather than replaced). ImageNet-100
    counts as ImageNet-scale for v2's momentum and queue."""
    defaults = dict(DEFAULTS[args.version])
    if args.version == "v2" and args.dataset == "imagenet100":
        defaults.update(m=0.999, queue=65536)
    typed = getattr(args, "given", set())
    filled = {k: v for k, v in defaults.items() if getattr(args, k) == UNSET[k] and k not in typed}
    resolved = dataclasses.replace(args, **filled)
    if hasattr(args, "given"):
        resolved.given = args.given
    return resolved


# ----------------------------------------------------------------------------- model
# The BN leak (MoCo paper, Sec. 3.3), and our single-device answer. BN normalizes each
# sample with statistics of its batch, so a query and its key computed from the same
# images share a batch "signature" that the old keys in the queue lack: the network can
# find the positive by that signature and learn little about the images. MoCo runs BN
# separately on each of 8 GPUs and shuffles the key batch across GPUs ("shuffle-BN"), so
# a key is normalized together with other images than its query. We do the same on one
# device: v2's ResNet computes BN statistics over --bn-splits sub-batches, and the key
# batch is shuffled before and unshuffled after the key encoder (as in MoCo's CIFAR-10
# demo). v3 needs neither: its negatives come from the same batch as its positives, so a
# batch signature singles nothing out, and the paper's SyncBN is what full-batch BN on
# one device already is.

class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalizes each of `splits` equal sub-batches with its
    own statistics, as plain BN does on each of `splits` GPUs. In eval mode it is plain BN."""

    def __init__(self, num_features, splits):
        super().__init__(num_features)
        self.splits = splits

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        B, C, H, W = x.shape
        S = self.splits
        # Lay the S sub-batches side by side as channels, (B/S, S*C, H, W): one batch_norm
        # call then gives each sub-batch its own mean and variance.
        y = x.reshape(S, B // S, C, H, W).transpose(0, 1).reshape(B // S, S * C, H, W)
        mean, var = self.running_mean.repeat(S), self.running_var.repeat(S)
        y = F.batch_norm(y, mean, var, self.weight.repeat(S), self.bias.repeat(S), True, self.momentum, self.eps)
        with torch.no_grad():  # S devices would keep S running averages; keep their mean
            self.running_mean.copy_(mean.view(S, C).mean(0))
            self.running_var.copy_(var.view(S, C).mean(0))
            self.num_batches_tracked.add_(1)
        return y.reshape(B // S, S, C, H, W).transpose(0, 1).reshape(B, C, H, W)


def split_batchnorm(module, splits):
    """Replace every BatchNorm2d inside module by a SplitBatchNorm with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            split = SplitBatchNorm(child.num_features, splits)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, splits)


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
    """Query encoder (backbone, projector and, in v3, predictor), trained by gradient; key
    encoder (key_backbone, key_projector), a moving average of it; v2's queue of past keys.
    All in one module, so its state_dict is the whole method."""

    def __init__(self, args, img_size):
        super().__init__()
        self.backbone, dim = common.make_backbone(args, img_size)
        if args.version == "v2":
            if args.bn_splits > 1:
                split_batchnorm(self.backbone, args.bn_splits)
            # 2-layer MLP head, hidden width = feature width (MoCo v2 paper and code).
            self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, args.proj_dim))
            self.predictor = None
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
            # MoCo v3 paper, Sec. 4.2: a frozen random patch projection ("stop-grad conv1")
            # avoids the loss spikes that make ViT training unstable. It is excluded from the
            # optimizer in main(); cut-init has already divided it like every other weight.
            self.backbone.conv_proj.requires_grad_(False)
        if args.version == "v2":
            # Random unit vectors stand in for keys until K real ones have been enqueued.
            self.register_buffer("queue", F.normalize(torch.randn(args.queue, args.proj_dim), dim=1))  # (K, D)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # the oldest entry

    def forward(self, x):
        h = self.backbone(x)  # (B, 512) for ResNet-18, (B, 384) for ViT-Small
        q = self.projector(h)  # (B, proj_dim)
        return h, (q if self.predictor is None else self.predictor(q))

    @torch.no_grad()
    def keys(self, x, shuffle=False):
        """k = key_projector(key_backbone(x)) (b, proj_dim); no gradient flows into the key
        encoder. shuffle: feed the images in a random order, so that a key rarely shares
        its BN statistics (sub-batch, or rank under torchrun) with its query; return in
        x's order. Under torchrun the shuffle spans all ranks' images (MoCo's shuffle-BN)."""
        if not shuffle:
            return self.key_projector(self.key_backbone(x))
        rank, size = common.world()
        b = len(x)
        everyone = common.gather(x, grad=False)  # (B, 3, H, W): all ranks' key images
        perm = torch.randperm(len(everyone), device=x.device)
        if size > 1:
            torch.distributed.broadcast(perm, 0)  # one shuffle for all ranks
        k = self.key_projector(self.key_backbone(everyone[perm[rank * b: (rank + 1) * b]]))
        k = common.gather(k, grad=False)  # (B, D) keys in shuffled order
        return k[perm.argsort()][rank * b: (rank + 1) * b]  # row i is image i's key again


def build_model(args, img_size):
    """The network as initialized for training (eval_knn.py rebuilds it from a checkpoint's args)."""
    return MoCo(resolve(args), img_size)


# ----------------------------------------------------------------------------- loss

# Both losses take their logits in float32 even under bf16 autocast: bf16 keeps 3 significant
# digits of a cosine, and at tau = 0.2 a logit near 5 would move in steps of 0.03, with up
# to 65536 negatives in the softmax. The official code leaves this matmul to (fp16)
# autocast, which keeps 3 more bits; here it is one small matmul per step.

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
    its negatives. The 2 tau factor (MoCo v3 paper, Alg. 1) offsets the 1/tau the logits
    put on the gradient, so changing tau does not change the step size much.
    Under torchrun the keys of all ranks are gathered without gradient (they are constants
    anyway), and query i of rank r finds its positive at r * b + i."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.normalize(common.at_least_fp32(q), dim=1), F.normalize(common.at_least_fp32(k), dim=1)
        k = common.gather(k, grad=False)  # (B, D): the global batch's keys
        rank = common.world()[0]
        logits = q @ k.T / temperature  # (b, B)
        labels = torch.arange(len(q), device=q.device) + rank * len(q)
        return F.cross_entropy(logits, labels) * 2 * temperature


def compute_loss(model, x1, x2, args):
    """Forward the views through the query and key encoders, and the loss: (loss,
    embedding statistics, the keys to enqueue (v2) or None (v3))."""
    if args.version == "v2":
        h, q = model(x1)
        # GradScale sits right before the loss normalizes q: identity forward, each sample's
        # gradient times ||q||^power backward (power=0: plain MoCo).
        q = gradscale(q, args.power)
        shuffle = args.bn_splits > 1 or common.world()[1] > 1
        k = F.normalize(model.keys(x2, shuffle=shuffle).float(), dim=1)  # (b, D), no gradient
        loss = info_nce_queue(q, k, model.queue, args.temperature)
        return loss, common.embedding_stats(q, h, (q, k), args.opposite_cos), k
    h1, q1 = model(x1)
    h2, q2 = model(x2)
    q1, q2 = gradscale(q1, args.power), gradscale(q2, args.power)
    k1, k2 = model.keys(x1), model.keys(x2)  # no gradient: the key encoder only follows
    loss = info_nce_in_batch(q1, k2, args.temperature) + info_nce_in_batch(q2, k1, args.temperature)
    stats = common.embedding_stats(torch.cat([q1, q2]), torch.cat([h1, h2]), (q1, q2), args.opposite_cos)
    return loss, stats, None


# ----------------------------------------------------------------------------- momentum and queue

def key_momentum(args, progress):
    """v2: a constant m. v3: m rises from args.m to 1 along a half cosine over training
    (MoCo v3 code, --moco-m-cos in its ViT recipes; BYOL does the same), so the keys settle
    as training ends."""
    if args.version == "v2":
        return args.m
    return 1 - (1 - args.m) * (1 + math.cos(math.pi * progress)) / 2


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
    # BYOL's asymmetric pair, which the MoCo v3 paper adopts (Sec. 5), with crops from 8% of
    # the image up (MoCo v3 code's default).
    shared = dict(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))
    return run.augment(blur_p=1.0, **shared), run.augment(blur_p=0.1, solarize_p=0.2, **shared)


def train_step(model, optimizer, batches, views, run, step):
    """One optimizer step on this rank's --accum micro-batches of uint8 images."""
    common.set_lr(optimizer, run.lr_at(step))
    # The momentum update, once per optimizer step and before its micro-batches: the key
    # encoder follows the query encoder that the previous step produced.
    momentum_update(model, key_momentum(run.args, run.progress(step)))
    optimizer.zero_grad(set_to_none=True)
    keys = []
    for x in batches:
        x1, x2 = views[0](x), views[1](x)  # two augmented views (b, 3, H, W), made on the device
        with run.autocast():
            loss, stats, k = compute_loss(model, x1, x2, run.args)
        (loss / len(batches)).backward()  # micro-batch gradients add up to the batch's
        run.meter.add(loss, stats, len(batches))
        keys.append(k)
    common.average_gradients(model.parameters())  # over torchrun's ranks; no-op in one process
    optimizer.step()
    if run.args.version == "v2":
        # Once per step, after every micro-batch has used the same negatives (as one big batch
        # would): this step's keys, of every rank, are negatives from the next step on.
        enqueue(model, common.gather(torch.cat(keys), grad=False))


def check(args):
    """Raise a one-sentence UsageError for MoCo-specific flag values that cannot work."""
    micro = args.batch_size // args.accum  # images per micro-step, over all ranks
    local = micro // int(os.environ.get("WORLD_SIZE", 1))  # on this rank (torchrun sets WORLD_SIZE)
    if args.bn_splits < 1:
        raise common.UsageError(f"--bn-splits must be >= 1 (got {args.bn_splits})")
    if args.version == "v2" and args.arch.startswith("resnet") and local % args.bn_splits:
        raise common.UsageError(f"the {local} images per rank and micro-batch must be a multiple of "
                                f"--bn-splits {args.bn_splits}; change --batch-size, --accum or --bn-splits")
    if args.version == "v2" and args.queue < args.batch_size:
        raise common.UsageError(f"--queue {args.queue} must hold at least one batch of {args.batch_size} keys")
    if not 0 <= args.m <= 1:
        raise common.UsageError(f"--m must be in [0, 1] (got {args.m})")


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv, resolve=resolve)
    if not args.resume:  # before start creates the run folder; a resumed run was checked when it began
        check(args)
    run = common.start("moco", args)
    args = run.args
    model = build_model(args, run.data.size)
    # Under torchrun v3's BN layers (in the heads) use global-batch statistics, as the paper's
    # SyncBN; v2 keeps BN per rank, which is what shuffle-BN relies on.
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
    common.cli(main)
