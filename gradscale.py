"""GradScale: identity forward, per-sample gradient times ||z||^power backward.

Cosine-similarity losses give an embedding z a gradient orthogonal to z and scaled
by 1/||z|| (Draganov et al., "On the Importance of Embedding Norms in Self-Supervised
Learning", ICML 2025, Prop. 3.1), so large embeddings learn slowly. GradScale
multiplies the gradient reaching z_i by ||z_i||^power: power=0 is plain training,
power=1 cancels the 1/||z|| factor. The norm is taken over the last dim from the
saved forward input and is treated as a constant (no gradient flows through it).

    z = projector(backbone(x))            # (B, D)
    z = gradscale(z, power=1.0)           # right before the loss normalizes z
    loss = info_nce(z1, z2)

Warning: the scaled field is not the gradient of any loss for power != 0 (paper,
Prop. D.1), so the loss value no longer tells you how far the optimizer moved.
A zero-norm row with a negative power gets an infinite scale. Copy this file freely;
it needs only torch.
"""
import torch
from torch import nn


class GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, power):
        ctx.save_for_backward(z)
        ctx.power = power
        return z.view_as(z)  # a new view, so autograd routes z's gradient through us

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        # At least float32 even under bf16 autocast; cast back so dtypes are unchanged.
        dtype = torch.promote_types(grad.dtype, torch.float32)
        scale = z.to(dtype).norm(dim=-1, keepdim=True).pow(ctx.power)  # (B, 1)
        return (grad.to(dtype) * scale).to(grad.dtype), None


def gradscale(z, power=1.0):
    """Identity on z (B, D); scales row i of the incoming gradient by ||z_i||^power."""
    return GradScale.apply(z, power)


class GradScaleLayer(nn.Module):
    def __init__(self, power=1.0):
        super().__init__()
        self.power = power

    def forward(self, z):
        return gradscale(z, self.power)

    def extra_repr(self):
        return f"power={self.power}"
