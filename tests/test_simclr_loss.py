"""SimCLR's InfoNCE against a plain loop, and the cosine-gradient facts the paper builds on."""
import math

import torch
import torch.nn.functional as F

from simclr import info_nce


def info_nce_loop(z1, z2, tau):
    """The NT-Xent definition written out one anchor at a time."""
    views = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n, B = len(views), len(z1)
    total = 0.0
    for i in range(n):
        j = (i + B) % n
        numerator = math.exp(float(views[i] @ views[j]) / tau)
        denominator = sum(math.exp(float(views[i] @ views[k]) / tau) for k in range(n) if k != i)
        total += -math.log(numerator / denominator)
    return total / n


def test_info_nce_matches_the_definition():
    z1, z2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    for tau in (0.1, 0.5, 1.0):
        assert math.isclose(info_nce(z1, z2, tau).item(), info_nce_loop(z1, z2, tau), rel_tol=1e-10)


def test_info_nce_ignores_norms_and_rewards_alignment():
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    scales = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(info_nce(z1 * scales, z2, 0.5), info_nce(z1, z2, 0.5))
    assert info_nce(z1, z1, 0.5) < info_nce(z1, z2, 0.5)


def test_cosine_gradient_is_tangent_with_magnitude_sin_over_norm():
    # Paper, Prop. 3.1: grad_zi cos(zi, zj) is orthogonal to zi and has norm sin(phi) / ||zi||.
    zi = (torch.randn(100, 16, dtype=torch.float64) * torch.rand(100, 1, dtype=torch.float64) * 5).requires_grad_()
    zj = torch.randn(100, 16, dtype=torch.float64)
    cos = F.cosine_similarity(zi, zj, dim=1)
    (g,) = torch.autograd.grad(cos.sum(), zi)
    zi = zi.detach()
    torch.testing.assert_close((g * zi).sum(1), torch.zeros(100, dtype=torch.float64), atol=1e-12, rtol=0)
    sin = torch.sqrt(1 - cos.detach() ** 2)
    torch.testing.assert_close(g.norm(dim=1), sin / zi.norm(dim=1), rtol=1e-9, atol=0)


def test_info_nce_gradient_is_tangent_and_scales_inversely_with_norm():
    # Paper, Prop. 3.2: the same holds for InfoNCE, for every embedding of the batch.
    z1, z2 = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    grads = []
    for s in (1.0, 4.0):
        a = (z1 * s).requires_grad_()
        info_nce(a, z2, 0.5).backward()
        grads.append(a.grad)
        torch.testing.assert_close((a.grad * a.detach()).sum(1), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[1] * 4.0, grads[0], rtol=1e-9, atol=1e-15)


def test_a_gradient_step_grows_the_norm():
    # Cor. 3.3: the step is orthogonal to z, so ||z - lr g||^2 = ||z||^2 + lr^2 ||g||^2.
    z = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(32, 8, dtype=torch.float64)
    loss = -F.cosine_similarity(z, target, dim=1).sum()
    (g,) = torch.autograd.grad(loss, z)
    lr = 0.7
    after = z.detach() - lr * g
    torch.testing.assert_close(after.norm(dim=1) ** 2, z.detach().norm(dim=1) ** 2 + lr ** 2 * g.norm(dim=1) ** 2)
    assert (after.norm(dim=1) > z.detach().norm(dim=1)).all()
