"""torchrun support, which a reader on one device can skip: multi-GPU and multi-node runs
start every script unchanged under torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK.
Without those variables everything here is a no-op, so a single process never touches
torch.distributed. common.py re-exports what the training loops call.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from safety import UsageError


def init_distributed(cuda):
    """Join torchrun's process group (NCCL for a run on CUDA, else gloo); returns (rank, world size, local rank)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    env = {k: os.environ.get(k, "") for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    rank, local, size = (int(v) if v.isdigit() else -1 for v in (env["RANK"], env["LOCAL_RANK"] or "0",
                                                                  env["WORLD_SIZE"]))
    if not (0 <= rank < size and local >= 0 and env["MASTER_ADDR"] and env["MASTER_PORT"].isdigit()):
        shown = ", ".join(f"{k}={v!r}" for k, v in env.items())
        raise UsageError(f"RANK is set, so this looks like a torchrun process, but {shown} are not what torchrun "
                         "sets; start with torchrun, or unset RANK for one process")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local


def world():
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class AllReduce(torch.autograd.Function):
    """The sum of x over ranks, AllReduce.apply(x); every rank uses the sum, so the backward sums too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x
    backward = forward


def gather(x, grad=True):
    """x (b, ...) of all ranks in rank order -> (world * b, ...). grad=True: each rank's rows get the
    gradient every rank's loss sends them (each rank writes its rows into zeros and AllReduce sums:
    torch's all_gather has no backward on gloo); grad=False: a constant (e.g. momentum-encoder keys)."""
    rank, size = world()
    if size == 1:
        return x
    if grad:
        return AllReduce.apply(torch.cat([x if r == rank else torch.zeros_like(x) for r in range(size)]))
    parts = [torch.empty_like(x) for _ in range(size)]
    with torch.no_grad():
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_gradients(params):
    """Average the gradients of params over ranks in one flat all-reduce: the mean of per-rank
    mean-loss gradients is the gradient of the mean loss over the global batch."""
    rank, size = world()
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g) / size)


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN (1d, 2d) that in training normalizes each of `splits` sub-batches on its own, as BN on `splits` GPUs
    would; sync=True sums the statistics over ranks, gradients included (torch's SyncBatchNorm has no CPU
    kernel). Eval is plain BN, and BatchNorm's names let checkpoints load into plain networks."""

    def __init__(self, num_features, splits=1, sync=False, **kw):
        super().__init__(num_features, **kw)
        self.splits, self.sync = splits, sync

    def _check_input_dim(self, x):  # BatchNorm1d's (B, C) and BatchNorm2d's (B, C, H, W)
        assert x.dim() in (2, 4), f"expected 2D or 4D input, got {x.dim()}D"

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        S, C, rest = self.splits, x.shape[1], x.shape[2:]
        if not self.sync:  # one fused batch_norm call (2-3x faster than the sums below), sub-batches as channels
            y = x.reshape(S, -1, C, *rest).transpose(0, 1).reshape(-1, S * C, *rest)  # (b/S, S*C, ...)
            mean, var = self.running_mean.repeat(S), self.running_var.repeat(S)
            w, b = (self.weight.repeat(S), self.bias.repeat(S)) if self.affine else (None, None)
            y = F.batch_norm(y, mean, var, w, b, True, self.momentum, self.eps)
            with torch.no_grad():
                self.running_mean.copy_(mean.view(S, C).mean(0))
                self.running_var.copy_(var.view(S, C).mean(0))
                self.num_batches_tracked += 1
            return y.reshape(-1, S, C, *rest).transpose(0, 1).reshape(x.shape)
        g = x.reshape(S, -1, C, *rest)  # (S, b/S, C, ...)
        dims, shape = [1, *range(3, g.dim())], [S, 1, C] + [1] * len(rest)
        count = torch.full((S, 1), g[0].numel() / C, device=x.device)
        # Statistics in float32 even under bf16 autocast, as torch's batch norm keeps them.
        sums = AllReduce.apply(torch.cat([g.sum(dims, dtype=torch.float32), count], 1))  # (S, C + 1), all ranks
        n = sums[:, -1:]
        mean = sums[:, :-1] / n  # (S, C)
        # Two passes: the variance from squared deviations, not E[x^2] - E[x]^2, which loses
        # every digit in float32 when the mean is large against the spread (e.g. 1e3 +- 1).
        centred = g - mean.view(shape)
        var = AllReduce.apply((centred * centred).sum(dims)) / n  # (S, C), biased, as BN normalizes with
        with torch.no_grad():
            self.running_mean.lerp_(mean.mean(0), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).mean(0), self.momentum)
            self.num_batches_tracked += 1
        y = (centred / torch.sqrt(var.view(shape) + self.eps)).reshape(x.shape)
        if self.affine:
            y = y * self.weight.view(shape[1:]) + self.bias.view(shape[1:])
        return y.to(x.dtype)


def split_batchnorm(module, splits=1, sync=False):
    """module with every BatchNorm1d/2d swapped for a SplitBatchNorm; sync only under torchrun (NCCL: SyncBatchNorm)."""
    sync = sync and world()[1] > 1
    if splits == 1 and not sync:
        return module
    if splits == 1 and dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = SplitBatchNorm(child.num_features, splits, sync, eps=child.eps, momentum=child.momentum,
                                 affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)  # a momentum encoder's BN stays out of the optimizer
            setattr(module, name, new)
        else:
            split_batchnorm(child, splits, sync)
    return module
