"""SimSiam: "Exploring Simple Siamese Representation Learning" (Chen & He, 2021,
arXiv 2011.10566), as trained in "On the Importance of Embedding Norms in
Self-Supervised Learning" (Draganov et al., 2025).

The prediction p of one view is pulled towards the projection z of the other view,
and z is treated as a constant (stop-gradient); no negatives, no momentum encoder. The
loss is a cosine similarity, so it only sees the direction of p: the norm ||p|| grows
during training and slows learning down; --cut (cut-initialization) and --power
(GradScale on p) counter that.

    python simsiam.py --dataset cifar100 --cut 3 --wd 5e-4
    python simsiam.py --dataset cifar10 --batch-size 1024 --accum 4   # 4 micro-batches of 256
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import common
import safety
from common import arg
from gradscale import gradscale


# The embedding-norms paper's own setting (App. C.1): ResNet-50, 256 images per micro-batch
# accumulated 4 times (batch 1024), 10 warmup epochs, 512 epochs, no cut-init. Its lr is lost
# in the extracted text: 0.05 per 256 images is the SimSiam paper's.
PAPER = dict(arch="resnet50", batch_size=1024, accum=4, epochs=512, warmup=10, lr=0.05, wd=5e-4, cut=1.0)


@dataclass
class Args(common.Args):
    """SimSiam flags; defaults follow the embedding-norms paper's SimSiam setting."""
    PRESETS: ClassVar[dict] = {"laptop": common.LAPTOP, "paper": PAPER}
    batch_size: int = arg(1024, "images per step (embedding-norms paper); --accum splits it into micro-batches")
    lr: float = arg(0.05, "base lr per 256 images (SimSiam paper, Sec. 4; 0.2 at batch 1024 in the norms paper)",
                         positive=True)
    wd: float = arg(5e-4, "weight decay (SimSiam paper's CIFAR setting, App. D; embedding-norms paper)", low=0)
    nesterov: bool = arg(True, "Nesterov momentum for SGD (embedding-norms paper)")
    fix_pred_lr: bool = arg(True, "keep the predictor at the peak lr while the rest follows the schedule "
                                  "(SimSiam paper, Sec. 4.2 and Table 1)")
    proj_dim: int = arg(2048, "projector hidden and output dimension d (SimSiam paper, Sec. 4)", positive=True)
    pred_dim: int = arg(512, "predictor bottleneck dimension (SimSiam paper, Sec. 4: d/4)", positive=True)


# ----------------------------------------------------------------------------- model

class SimSiam(nn.Module):
    """Backbone f, 3-layer projector g and bottleneck predictor q: h = f(x), z = g(h), p = q(z)."""

    def __init__(self, args, img_size):
        super().__init__()
        self.backbone, dim = common.make_backbone(args, img_size)
        proj_dim, pred_dim = args.proj_dim, args.pred_dim
        # BN after every linear layer, the output one included (SimSiam paper, Sec. 4); the last BN
        # has no affine parameters, as in the authors' release. Biases would be cancelled by BN.
        self.projector = nn.Sequential(
            nn.Linear(dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim, affine=False))
        # Bottleneck d -> d/4 -> d; no BN on the output (SimSiam paper, Sec. 4), so
        # ||p|| is free to grow: this is the norm the embedding-norms paper is about.
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, proj_dim))

    def forward(self, x):
        h = self.backbone(x)  # (B, 512) for ResNet-18
        z = self.projector(h)  # (B, proj_dim)
        return h, z, self.predictor(z)  # p: (B, proj_dim)


def build_model(args, img_size):
    """The network as initialized for training (eval_knn.py rebuilds it from a checkpoint's args)."""
    return common.cut_init(SimSiam(args, img_size), args.cut)


# ----------------------------------------------------------------------------- loss

def negative_cosine(p, z):
    """D(p, z) of the SimSiam paper (Sec. 3): minus the mean cosine similarity of p and z,
    with z a constant. p, z: (B, D)."""
    # Stop-gradient: z is the target, not something to move. Without it SimSiam collapses (Sec. 4.1).
    z = z.detach()
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


def simsiam_loss(p1, p2, z1, z2):
    """The symmetrized loss D(p1, z2) / 2 + D(p2, z1) / 2, in [-1, 1]."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


def compute_loss(model, x1, x2, args):
    """Forward both views and the loss: (loss, embedding statistics)."""
    h1, z1, p1 = model(x1)
    h2, z2, p2 = model(x2)
    # GradScale sits on p, where the cosine similarity is taken on the side that gets a
    # gradient: identity forward, each sample's gradient times ||p||^power backward.
    p1, p2 = gradscale(p1, args.power), gradscale(p2, args.power)
    loss = simsiam_loss(p1, p2, z1, z2)
    return loss, common.embedding_stats(torch.cat([p1, p2]), torch.cat([h1, h2]), (p1, p2), args.opposite_cos)


# ----------------------------------------------------------------------------- training

def train_step(model, optimizer, batches, views, run, step):
    """One optimizer step on this rank's --accum micro-batches of uint8 images."""
    # "fix-pred-lr": only group 0 (backbone, projector) follows warmup and cosine; the
    # predictor (group 1) keeps the peak lr (SimSiam paper, Sec. 4.2 and Table 1).
    for group in optimizer.param_groups[: 1 if run.args.fix_pred_lr else 2]:
        group["lr"] = run.lr_at(step)
    optimizer.zero_grad(set_to_none=True)
    for x in batches:
        x1, x2 = views[0](x), views[1](x)  # two augmented views (b, 3, H, W), made on the device
        with run.autocast():
            loss, stats = compute_loss(model, x1, x2, run.args)
        run.scaler.scale(loss / len(batches)).backward()  # micro-batch gradients add up to the batch's
        run.meter.add(loss, stats, len(batches))
    common.average_gradients(model.parameters())  # over torchrun's ranks; no-op in one process
    run.scaler.step(optimizer)  # optimizer.step(), unless --precision fp16 overflowed
    run.scaler.update()


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    run = common.start("simsiam", args)
    model = common.prepare(build_model(run.args, run.data.size), run)
    groups = [{"params": [*model.backbone.parameters(), *model.projector.parameters()]},
              {"params": model.predictor.parameters()}]  # fix-pred-lr: see train_step
    optimizer = common.make_optimizer(run.args, groups, run.device, nesterov=run.args.nesterov)
    view = run.augment()  # the Augment defaults are SimSiam's CIFAR recipe, for both views
    for epoch in range(run.restore(model, optimizer), run.args.epochs):
        model.train()
        for step, batches in run.batches(epoch):
            train_step(model, optimizer, batches, (view, view), run, step)
            run.meter.end_step(step)  # reads the loss back every common.CHECK_EVERY steps
        common.end_epoch(run, model, optimizer, epoch)
    return common.finish(run, model)


if __name__ == "__main__":
    safety.cli(main)
