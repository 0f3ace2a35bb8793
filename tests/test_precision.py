"""--precision: bf16 and fp16 autocast, run here on the CPU, and the choice that auto makes on GPUs."""
import dataclasses

import pytest
import torch

import byol
import common
import moco
import simclr
import simsiam
from conftest import make_run
from test_benchmark import load_benchmark

METHODS = {
    "simclr": (simclr, simclr.Args(proj_dim=16)),
    "simsiam": (simsiam, simsiam.Args(proj_dim=16, pred_dim=8)),
    "byol": (byol, byol.Args(hidden_dim=16, proj_dim=8)),
    "moco-v2": (moco, moco.Args(queue=32, bn_splits=2)),
    "moco-v3": (moco, moco.Args(version="v3", arch="vit_tiny", mlp_dim=32, proj_dim=16, optimizer="adamw")),
}


def one_step(name, precision, power=1.0):
    """Two training steps of a method's own train_step at --precision, with GradScale on;
    returns (run, model, the dtypes of the Linear and Conv2d outputs, the weights before)."""
    module, args = METHODS[name]
    args = dataclasses.replace(args, batch_size=16, epochs=1, warmup=1, width=8, power=power, precision=precision)
    run = make_run(args, n=32, size=16)
    model = module.build_model(args, 16)
    bench = load_benchmark()
    optimizer = common.make_optimizer(args, bench.param_groups(name.split("-")[0], model), run.device)
    views = bench.method_views(module, run)
    seen = []
    for m in model.modules():  # the dtypes that the matrix products compute in
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for step in range(2):
        module.train_step(model, optimizer, [run.data.train_x[16 * step: 16 * (step + 1)]], views, run, step)
        run.meter.end_step(step)
    return run, model, seen, before


@pytest.mark.parametrize("name", METHODS)
def test_a_step_under_bf16_autocast_on_the_cpu(name):
    run, model, seen, before = one_step(name, "bf16")
    assert not run.scaler.is_enabled()  # bf16 has fp32's range: no scaler
    assert torch.bfloat16 in seen  # the forward ran in bf16
    # The loss (fp32 logits and cosines), GradScale's output and the statistics stay float32.
    assert all(v.dtype == torch.float32 for v in run.meter.sums.values()), run.meter.sums
    assert all(torch.isfinite(v) for v in run.meter.sums.values())
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in after)  # the weights stay fp32: autocast casts per op
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("name", ["simclr", "simsiam"])
def test_a_step_under_fp16_with_the_gradient_scaler_on_the_cpu(name):
    if not torch.amp.autocast_mode.is_autocast_available("cpu"):
        pytest.skip("this torch has no CPU autocast")
    run, model, seen, before = one_step(name, "fp16")
    assert run.scaler.is_enabled() and torch.float16 in seen
    assert 0 < run.scaler.get_scale() < float("inf")
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_fp32_is_the_plain_path():
    run, model, seen, before = one_step("simsiam", "fp32")
    assert not run.scaler.is_enabled() and set(seen) == {torch.float32}


@pytest.mark.parametrize("capability,want", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                             ((7, 5), torch.float16), ((7, 0), torch.float16)])
def test_auto_picks_bf16_on_gpus_that_have_it_and_fp16_on_older_ones(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert common.amp_dtype(torch.device("cuda"), "auto") == want
    assert common.amp_dtype(torch.device("cuda"), "fp32") is None  # a typed choice is kept
    assert common.amp_dtype(torch.device("cpu"), "auto") is None  # fp32 on the CPU
    assert common.amp_dtype(torch.device("mps"), "auto") is None


def test_precision_is_a_flag_of_every_script(capsys):
    for module in (simclr, simsiam, byol, moco):
        assert common.parse_args(module.Args, module.__doc__, ["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit) as e:
        common.parse_args(simclr.Args, simclr.__doc__, ["--precision", "fp8"])
    assert e.value.code == 2 and "--precision" in capsys.readouterr().err
