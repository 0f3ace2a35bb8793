"""GradScale: identity forward, gradient times ||z||^power backward."""
import pytest
import torch
import torch.nn.functional as F

from gradscale import GradScale, GradScaleLayer, gradscale


def cos_loss(z, target):
    return -F.cosine_similarity(z, target, dim=1).sum()


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0, -1.0])
def test_backward_is_norm_power_times_plain_gradient(power):
    z = torch.randn(8, 5, dtype=torch.float64) * torch.linspace(0.1, 10, 8, dtype=torch.float64)[:, None]
    target = torch.randn(8, 5, dtype=torch.float64)
    z1 = z.clone().requires_grad_()
    cos_loss(z1, target).backward()
    z2 = z.clone().requires_grad_()
    out = gradscale(z2, power)
    assert torch.equal(out, z)  # forward is the identity
    cos_loss(out, target).backward()
    expected = z1.grad * z.norm(dim=1, keepdim=True) ** power
    torch.testing.assert_close(z2.grad, expected, rtol=1e-12, atol=0)


def test_power_zero_is_exactly_plain_training():
    z = torch.randn(6, 4, requires_grad=True)
    g = torch.randn(6, 4)
    (gx,) = torch.autograd.grad(gradscale(z, 0.0), z, g)
    assert torch.equal(gx, g)


def test_power_one_cancels_the_inverse_norm_of_cosine_gradients():
    # Prop. 3.1: the cosine gradient scales like 1/||z||; with power 1 it no longer
    # depends on the norm, so a point and its 10x copy get the same gradient.
    direction = torch.randn(1, 3, dtype=torch.float64)
    target = torch.randn(1, 3, dtype=torch.float64)
    grads = []
    for scale in (1.0, 10.0):
        z = (direction * scale).requires_grad_()
        cos_loss(gradscale(z, 1.0), target).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


def test_gradcheck_passes_for_power_zero_and_fails_otherwise():
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True) * 3
    z = z.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gradscale(t, 0.0), (z,))
    # For power != 0 the backward is deliberately not the derivative of the forward
    # (it is not the gradient of any loss, paper Prop. D.1), so gradcheck must object.
    assert not torch.autograd.gradcheck(lambda t: gradscale(t, 1.0), (z,), raise_exception=False)


def test_backward_jacobian_is_diagonal_norm_scaling():
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    rows = []
    for i in range(12):
        e = torch.zeros(12, dtype=torch.float64)
        e[i] = 1
        (g,) = torch.autograd.grad(gradscale(z, 1.5), z, e.view(3, 4))
        rows.append(g.flatten())
    jac = torch.stack(rows)
    expected = torch.diag(z.detach().norm(dim=1).repeat_interleave(4) ** 1.5)
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=0)


def test_no_gradient_flows_through_the_norm():
    # If the norm were differentiated, d/dz of ||z||^p * g would add a term along z.
    z = torch.tensor([[3.0, 4.0]], requires_grad=True)
    (g,) = torch.autograd.grad(gradscale(z, 1.0), z, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(g, torch.tensor([[5.0, 0.0]]))


def test_bf16_autocast_keeps_gradient_dtype():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        assert z.dtype == torch.bfloat16
        out = gradscale(z, 1.0)
    g = torch.randn(5, 3).to(torch.bfloat16)
    (gz,) = torch.autograd.grad(out, z, g)
    assert gz.dtype == torch.bfloat16
    expected = g.float() * z.detach().float().norm(dim=1, keepdim=True)
    torch.testing.assert_close(gz.float(), expected, rtol=1e-2, atol=1e-2)


def test_layer_wraps_the_function():
    layer = GradScaleLayer(2.0)
    z = torch.randn(4, 3, requires_grad=True)
    (g1,) = torch.autograd.grad(layer(z).sum(), z)
    (g2,) = torch.autograd.grad(GradScale.apply(z, 2.0).sum(), z)
    assert torch.equal(g1, g2) and "power=2.0" in repr(layer)
