"""Where a line-by-line review against the official code found a difference, the fix and
its test: MoCo v3's heads, float32 contrastive logits under bf16 autocast, zero-init
residuals, the warmup notice, and the CPU synced batch norm's variance. (The optimizer
built after the BN swap is tested under torchrun in test_ddp.py; one enqueue per
step under --accum in test_moco.py.)"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import common
import ddp
import moco
import simclr
import simsiam


def layers(seq):
    """(type, in, out, bias / affine) of each layer of a head, for comparison."""
    out = []
    for m in seq:
        if isinstance(m, nn.Linear):
            out.append(("Linear", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("BN", m.num_features, m.num_features, m.affine))
        else:
            out.append((type(m).__name__,))
    return out


def official_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """The layer list of moco-v3's moco/builder.py _build_mlp, written out by hand: Linear
    without bias; BN + ReLU between layers; BN without affine at the end when last_bn."""
    out = []
    for i in range(num_layers):
        d1 = input_dim if i == 0 else mlp_dim
        d2 = output_dim if i == num_layers - 1 else mlp_dim
        out.append(("Linear", d1, d2, False))
        if i < num_layers - 1:
            out += [("BN", d2, d2, True), ("ReLU",)]
        elif last_bn:
            out.append(("BN", d2, d2, False))
    return out


def test_moco_v3_heads_match_the_official_builder():
    vit = moco.build_model(moco.Args(version="v3", arch="vit_tiny", mlp_dim=64, proj_dim=16), 16)
    # MoCo_ViT: 3-layer projector and 2-layer predictor, both ending in BN(affine=False).
    assert layers(vit.projector) == official_mlp(3, 192, 64, 16)
    assert layers(vit.predictor) == official_mlp(2, 16, 64, 16)
    res = moco.build_model(moco.Args(version="v3", arch="resnet18", mlp_dim=64, proj_dim=16), 16)
    # MoCo_ResNet: 2-layer projector ending in BN, 2-layer predictor without the final BN.
    assert layers(res.projector) == official_mlp(2, 512, 64, 16)
    assert layers(res.predictor) == official_mlp(2, 16, 64, 16, last_bn=False)
    assert layers(vit.key_projector) == layers(vit.projector)


def test_contrastive_logits_stay_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    queue = F.normalize(torch.randn(512, 32, generator=g), dim=1)
    losses = {
        "simclr": lambda: simclr.info_nce(z1, z2, 0.1),
        "moco-v2": lambda: moco.info_nce_queue(z1, z2, queue, 0.1),
        "moco-v3": lambda: moco.info_nce_in_batch(z1, z2, 0.1),
    }
    for name, loss in losses.items():
        exact = loss()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = loss()
        assert mixed.dtype == torch.float32, name
        assert abs(mixed.item() - exact.item()) < 1e-4, (name, mixed.item(), exact.item())


def residual_bn_weights(model):
    return [block.bn2.weight for block in model.backbone.modules() if hasattr(block, "bn2")]


def test_zero_init_residual_is_the_default_and_survives_cut():
    args = simsiam.Args(proj_dim=16, pred_dim=8)
    zero = residual_bn_weights(simsiam.build_model(args, 16))
    assert len(zero) == 8 and all(torch.equal(w, torch.zeros_like(w)) for w in zero)
    cut = residual_bn_weights(simsiam.build_model(simsiam.Args(proj_dim=16, pred_dim=8, cut=3.0), 16))
    assert all(torch.equal(w, torch.zeros_like(w)) for w in cut)  # 0 / c = 0
    plain = residual_bn_weights(simsiam.build_model(simsiam.Args(proj_dim=16, pred_dim=8, zero_init_residual=False), 16))
    assert all(torch.equal(w, torch.ones_like(w)) for w in plain)
    flags = common.parse_args(simclr.Args, simclr.__doc__, ["--no-zero-init-residual"])
    assert flags.zero_init_residual is False


def test_a_run_that_never_leaves_warmup_says_so(tmp_path, capsys):
    simclr.main(["--dataset", "synthetic", "--subset", "16", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
                 "--power", "1", "--proj-dim", "8", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert "GradScale preset: --warmup 100 --lr 0.05" in captured.err
    assert "warning: --warmup 100 >= --epochs 1, so the lr never leaves its warmup" in captured.err
    start = captured.out.splitlines()[0]
    assert start.startswith("simclr | synthetic: ") and "warmup 100 of 1 epochs" in start and "peak lr 0.003125" in start
    assert '"warmup": 100' in (tmp_path / "run" / "args.json").read_text()  # args.json shows the values used


def test_synced_batchnorm_variance_is_exact_for_large_activations(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        x = (1e3 + torch.randn(256, 4, generator=torch.Generator().manual_seed(0))).requires_grad_()
        bn = ddp.SplitBatchNorm(4, sync=True)  # statistics summed over the ranks, here one
        y = bn(x)
        var = torch.var(x.detach().double(), dim=0, unbiased=False)
        expected = (x.detach().double() - x.detach().double().mean(0)) / torch.sqrt(var + bn.eps)
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-3)
        torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var * 256 / 255, rtol=1e-4, atol=0)
        xd = x.detach().double().requires_grad_()
        reference = nn.BatchNorm1d(4).double()(xd)  # torch's own batch norm, in float64
        g = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))  # not x's own noise
        (gx,) = torch.autograd.grad((y * g).sum(), x)
        (rx,) = torch.autograd.grad((reference * g.double()).sum(), xd)
        torch.testing.assert_close(gx.double(), rx, rtol=0, atol=1e-3 * rx.abs().max().item())
    finally:
        dist.destroy_process_group()


def test_narrow_resnet18_has_torchvisions_layout():
    """At width 64 the hand-built network is torchvision's CIFAR-stem ResNet-18, parameter
    for parameter in shape; at width 16 every stage is 4x narrower."""
    wide, dim = common.make_backbone(common.Args(arch="resnet18"), 32)
    narrow64, dim64 = common.narrow_resnet18(64)
    assert dim == dim64 == 512
    assert [p.shape for p in wide.parameters()] == [p.shape for p in narrow64.parameters()]
    x = torch.randn(2, 3, 32, 32)
    assert narrow64(x).shape == wide(x).shape == (2, 512)
    narrow, dim16 = common.make_backbone(common.Args(arch="resnet18", width=16), 32)
    assert dim16 == 128 and narrow(x).shape == (2, 128)
    shapes = [p.shape for p in narrow.parameters()]
    assert [s[0] for s in shapes] == [max(1, s[0] // 4) for s in (p.shape for p in wide.parameters())]
    zero = [m.bn2.weight for m in narrow.modules() if hasattr(m, "bn2")]
    assert len(zero) == 8 and all(torch.equal(w, torch.zeros_like(w)) for w in zero)
