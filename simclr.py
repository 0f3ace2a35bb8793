"""SimCLR: "A Simple Framework for Contrastive Learning of Visual Representations"
(Chen, Kornblith, Norouzi & Hinton, 2020, arXiv 2002.05709), as trained in
"On the Importance of Embedding Norms in Self-Supervised Learning" (Draganov et al., 2025).

Two augmented views of each image should embed close together and far from the other
2B - 2 views of the batch: InfoNCE on cosine similarities. Because the loss only sees
directions, the embedding norm ||z|| grows during training and slows it down; --cut
(cut-initialization) and --power (GradScale) counter that.

    python simclr.py --dataset cifar10 --cut 3
    python simclr.py --dataset fashionmnist --data-dir /usr/share/datasets/fashion-mnist --epochs 50 --cut 3
"""
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import common
import safety
from common import arg
from gradscale import gradscale


# The embedding-norms paper's own setting (App. C.1): ResNet-50, batch 256, 10 warmup
# epochs, 512 epochs (Fig. 3, S6), no cut-init. Its lr is lost in the extracted text: 0.3
# per 256 images is the SimCLR paper's. The dataset is yours to choose.
PAPER = dict(arch="resnet50", batch_size=256, accum=1, epochs=512, warmup=10, lr=0.3, wd=1e-6, cut=1.0)


@dataclass
class Args(common.Args):
    """SimCLR flags; defaults follow the embedding-norms paper's SimCLR setting."""
    PRESETS: ClassVar[dict] = {"laptop": common.LAPTOP, "paper": PAPER}
    lr: float = arg(0.3, "base lr per 256 images (0.6 at batch 512), SGD momentum 0.9", positive=True)
    wd: float = arg(1e-6, "weight decay (SimCLR paper's 1e-6; the norms paper also sweeps 5e-4)", low=0)
    temperature: float = arg(0.5, "InfoNCE temperature tau (SimCLR paper, CIFAR-10 setting)", positive=True)
    proj_dim: int = arg(128, "projector output dimension (SimCLR paper)", positive=True)


# ----------------------------------------------------------------------------- model

class SimCLR(nn.Module):
    """Backbone f and a 2-layer MLP projector g without BN: h = f(x), z = g(h)."""

    def __init__(self, args, img_size):
        super().__init__()
        self.backbone, dim = common.make_backbone(args, img_size)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, args.proj_dim))

    def forward(self, x):
        h = self.backbone(x)  # (B, 512) for ResNet-18
        return h, self.projector(h)  # (B, proj_dim)


def build_model(args, img_size):
    """The network as initialized for training (eval_knn.py rebuilds it from a checkpoint's args)."""
    return common.cut_init(SimCLR(args, img_size), args.cut)


# ----------------------------------------------------------------------------- loss

def info_nce(z1, z2, temperature):
    """NT-Xent over 2B views: for each view the other view of its image is the positive, the other
    2B - 2 views are negatives. z1, z2: (b, D), not yet normalized. Under torchrun b = B / world:
    this rank's 2b views are the anchors, and the candidates are the whole global batch, gathered
    *with* gradient (its backward sums over ranks), as in the SimCLR paper's global negatives."""
    b = z1.shape[0]
    rank = common.world()[0]
    # float32 even under bf16 autocast: bf16 keeps 3 significant digits of a cosine, and at
    # tau = 0.1 a logit near 10 would move in steps of 0.06. The official code leaves this to
    # (fp16) autocast; it is one small matmul per step.
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = F.normalize(common.at_least_fp32(z1), dim=1), F.normalize(common.at_least_fp32(z2), dim=1)
        anchors = torch.cat([z1, z2])  # (2b, D)
        candidates = torch.cat([common.gather(z1), common.gather(z2)])  # (2B, D): all first views, then all second
        B = candidates.shape[0] // 2
        logits = anchors @ candidates.T / temperature  # (2b, 2B) cosine similarities / tau
        own = torch.arange(b, device=z1.device) + rank * b  # global index of this rank's images
        rows = torch.arange(2 * b, device=z1.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, torch.cat([own, own + B])] = True
        logits = logits.masked_fill(self_mask, float("-inf"))  # a view is not its own negative
        positive = torch.cat([own + B, own])  # view 1 of image i <-> view 2 of image i
        return F.cross_entropy(logits, positive)


def compute_loss(model, x1, x2, args):
    """Forward both views and the loss: (loss, embedding statistics)."""
    h1, z1 = model(x1)
    h2, z2 = model(x2)
    # GradScale sits right before the loss normalizes z: identity forward, and each
    # sample's gradient times ||z||^power backward (power=0: plain SimCLR).
    z1, z2 = gradscale(z1, args.power), gradscale(z2, args.power)
    loss = info_nce(z1, z2, args.temperature)
    return loss, common.embedding_stats(torch.cat([z1, z2]), torch.cat([h1, h2]), (z1, z2), args.opposite_cos)


# ----------------------------------------------------------------------------- training

def make_views(run):
    """SimCLR's one recipe for both views. Colour jitter of strength s is 0.8s/0.8s/0.8s/0.2s (brightness,
    contrast, saturation, hue; SimCLR paper, App. A): s = 0.5, its CIFAR setting, at 64 px or less, and
    s = 1, its ImageNet setting, above."""
    s = 0.5 if run.data.size <= 64 else 1.0
    view = run.augment(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s))
    return view, view


def train_step(model, optimizer, batches, views, run, step):
    """One optimizer step on this rank's --accum micro-batches of uint8 images."""
    common.set_lr(optimizer, run.lr_at(step))
    optimizer.zero_grad(set_to_none=True)
    for x in batches:
        x1, x2 = views[0](x), views[1](x)  # two augmented views (b, 3, H, W), made on the device
        with run.autocast():
            loss, stats = compute_loss(model, x1, x2, run.args)
        # Each micro-batch is its own contrastive batch, with fewer negatives (main warns).
        run.scaler.scale(loss / len(batches)).backward()
        run.meter.add(loss, stats, len(batches))
    common.average_gradients(model.parameters())  # over torchrun's ranks; no-op in one process
    run.scaler.step(optimizer)  # optimizer.step(), unless --precision fp16 overflowed
    run.scaler.update()


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    run = common.start("simclr", args)
    model = common.prepare(build_model(run.args, run.data.size), run)
    optimizer = common.make_optimizer(run.args, model.parameters(), run.device)
    if run.args.accum > 1 and run.rank == 0:  # the lr rule assumes one contrastive batch of --batch-size
        b = run.args.batch_size // run.args.accum
        print(f"warning: with --accum {run.args.accum} each micro-batch of {b} images is its own contrastive batch, "
              f"with {2 * b - 2} negatives per view instead of {2 * run.args.batch_size - 2}, while the lr is scaled "
              "for the full batch; lower --accum if memory allows", file=sys.stderr)
    views = make_views(run)
    for epoch in range(run.restore(model, optimizer), run.args.epochs):
        model.train()
        for step, batches in run.batches(epoch):
            train_step(model, optimizer, batches, views, run, step)
            run.meter.end_step(step)  # reads the loss back every common.CHECK_EVERY steps
        common.end_epoch(run, model, optimizer, epoch)
    return common.finish(run, model)


if __name__ == "__main__":
    safety.cli(main)
