"""BYOL: "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"
(Grill et al., 2020, arXiv 2006.07733), as trained in "On the Importance of Embedding
Norms in Self-Supervised Learning" (Draganov et al., 2025).

An online network predicts, from one view, the projection that a target network gives
the other view. The target gets no gradient: it is an exponential moving average (EMA)
of the online network, with a rate tau that rises from tau_base to 1 over training. The
loss is 2 - 2 cos(p, z'), so it only sees the direction of p: the norm ||p|| grows during
training and slows learning down; --cut (cut-initialization) and --power (GradScale on p)
counter that.

    python byol.py --dataset cifar100 --cut 3 --wd 5e-4
    python byol.py --dataset cifar10 --power 1   # GradScale on p
"""
import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import common
import safety
from common import arg
from gradscale import gradscale


# The embedding-norms paper trains BYOL with SimSiam's setting (App. C.1): ResNet-50, batch
# 1024 as 4 x 256, 10 warmup epochs, 512 epochs, no cut-init.
PAPER = dict(arch="resnet50", batch_size=1024, accum=4, epochs=512, warmup=10, lr=0.05, wd=5e-4, cut=1.0)


@dataclass
class Args(common.Args):
    """BYOL flags. BYOL's own optimizer (LARS, batch 4096, lr 0.2 per 256, wd 1.5e-6; Sec. 3.3)
    is an ImageNet setting; at CIFAR scale the embedding-norms paper trains BYOL with the same
    SGD recipe as SimSiam, so the optimizer defaults are SimSiam's."""
    PRESETS: ClassVar[dict] = {"laptop": common.LAPTOP, "paper": PAPER}
    batch_size: int = arg(1024, "images per step (embedding-norms paper); --accum splits it into micro-batches")
    lr: float = arg(0.05, "base lr per 256 images (embedding-norms paper, as SimSiam); peak lr = lr * batch_size / 256",
                         positive=True)
    wd: float = arg(5e-4, "weight decay (embedding-norms paper, as SimSiam)", low=0)
    nesterov: bool = arg(True, "Nesterov momentum for SGD (embedding-norms paper)")
    tau_base: float = arg(0.99, "EMA rate at the start; rises to 1 on a cosine (BYOL paper, Sec. 3.3; "
                                "0.99 as in the norms paper, BYOL's ImageNet runs use 0.996)", low=0, high=1)
    hidden_dim: int = arg(4096, "hidden width of the projector and predictor MLPs (BYOL paper, Sec. 3.3)",
                          positive=True)
    proj_dim: int = arg(256, "output dimension of the projector and predictor (BYOL paper, Sec. 3.3)", positive=True)


# ----------------------------------------------------------------------------- model

def mlp(in_dim, hidden_dim, out_dim):
    """BYOL's projector and predictor (Sec. 3.3): linear, BN, ReLU, linear; no BN on the output."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class BYOL(nn.Module):
    """Online network: backbone f, projector g, predictor q; h = f(x), z = g(h), p = q(z).
    Target network: f', g' with the same shapes. One module, so one state_dict holds both."""

    def __init__(self, args, img_size):
        super().__init__()
        self.backbone, dim = common.make_backbone(args, img_size)
        self.projector = mlp(dim, args.hidden_dim, args.proj_dim)
        self.predictor = mlp(args.proj_dim, args.hidden_dim, args.proj_dim)
        # Cut-init shrinks the online network *before* the target is copied from it, so the
        # target starts as exactly the network that is trained (embedding-norms paper, Sec. 6).
        common.cut_init(self, args.cut)
        # The target never receives a gradient; update_target moves it.
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x):
        h = self.backbone(x)  # (B, 512) for ResNet-18
        return h, self.predictor(self.projector(h))  # p: (B, proj_dim)

    def target(self, x):
        return self.target_projector(self.target_backbone(x))  # z': (B, proj_dim)


def build_model(args, img_size):
    """The network as initialized for training (eval_knn.py rebuilds it from a checkpoint's args)."""
    return BYOL(args, img_size)


def target_tau(tau_base, progress):
    """BYOL's EMA rate (Sec. 3.3): tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, with
    progress = k / K the fraction of training steps done; tau_base at the start, 1 at the end."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def update_target(model, tau):
    """xi <- tau xi + (1 - tau) theta for every target parameter xi and online parameter theta.
    BN running statistics are not averaged: the target runs in train mode, on batch statistics."""
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.target_backbone.parameters(), *model.target_projector.parameters()]
    for xi, theta in zip(target, online):
        xi.lerp_(theta, 1 - tau)  # tau xi + (1 - tau) theta, and exactly xi where theta == xi


# ----------------------------------------------------------------------------- loss

def regression_loss(p, z):
    """BYOL's loss for one direction (Sec. 3.1): the squared distance between the
    l2-normalized prediction p and target projection z', i.e. 2 - 2 cos(p, z'), batch mean."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


def byol_loss(p1, p2, z1_target, z2_target):
    """Symmetrized as in the paper, L + L~ (a sum, in [0, 8]). At equal SGD lr its gradient is
    4x that of SimSiam's loss, -cos / 2 per direction, which the norms paper's code used for
    BYOL too; --lr 0.0125 --wd 2e-3 takes the same SGD steps as that loss at the defaults."""
    return regression_loss(p1, z2_target) + regression_loss(p2, z1_target)


def compute_loss(model, x1, x2, args):
    """Forward both views through the online and the target network, and the loss:
    (loss, embedding statistics)."""
    h1, p1 = model(x1)
    h2, p2 = model(x2)
    # Stop-gradient: the loss must not move the target, only the EMA in train_step does.
    with torch.no_grad():
        z1_target, z2_target = model.target(x1), model.target(x2)
    # GradScale sits on p, where the cosine similarity is taken on the side that gets a
    # gradient: identity forward, each sample's gradient times ||p||^power backward.
    p1, p2 = gradscale(p1, args.power), gradscale(p2, args.power)
    loss = byol_loss(p1, p2, z1_target, z2_target)
    return loss, common.embedding_stats(torch.cat([p1, p2]), torch.cat([h1, h2]), (p1, p2), args.opposite_cos)


# ----------------------------------------------------------------------------- training

def make_views(run):
    """BYOL's asymmetric views (App. B, Table 6): blur always in view 1, rarely in view 2 (Augment skips
    blur below 64 px, as the CIFAR recipes do), solarize only in view 2; crops from 0.2, the CIFAR
    scale of SimSiam and the norms paper (BYOL's ImageNet 0.08 leaves ~9 px of a 32 px image)."""
    jitter = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (BYOL App. B)
    return (run.augment(jitter=jitter, jitter_p=0.8, grey_p=0.2, blur_p=1.0, solarize_p=0.0),
            run.augment(jitter=jitter, jitter_p=0.8, grey_p=0.2, blur_p=0.1, solarize_p=0.2))


def train_step(model, optimizer, batches, views, run, step):
    """One optimizer step on this rank's --accum micro-batches of uint8 images."""
    common.set_lr(optimizer, run.lr_at(step))
    # The EMA, once per optimizer step and before its micro-batches: the target follows the
    # online weights that the previous step produced.
    tau = target_tau(run.args.tau_base, run.progress(step))
    update_target(model, tau)
    optimizer.zero_grad(set_to_none=True)
    for x in batches:
        x1, x2 = views[0](x), views[1](x)  # two augmented views (b, 3, H, W), made on the device
        with run.autocast():
            loss, stats = compute_loss(model, x1, x2, run.args)
        run.scaler.scale(loss / len(batches)).backward()  # micro-batch gradients add up to the batch's
        run.meter.add(loss, {**stats, "tau": torch.tensor(tau, device=loss.device)}, len(batches))
    common.average_gradients(model.parameters())  # over torchrun's ranks; no-op in one process
    run.scaler.step(optimizer)  # optimizer.step(), unless --precision fp16 overflowed
    run.scaler.update()


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    run = common.start("byol", args)
    model = common.prepare(build_model(run.args, run.data.size), run)
    # Only the online network is optimized; the target is in no param group.
    online = [*model.backbone.parameters(), *model.projector.parameters(), *model.predictor.parameters()]
    optimizer = common.make_optimizer(run.args, online, run.device, nesterov=run.args.nesterov)
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
