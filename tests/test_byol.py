"""BYOL: the loss against its closed form, the EMA update and its schedule, the
stop-gradient into the target, cut-init reaching the target, GradScale on p, and the
script end to end on the synthetic data (its main() through safety.cli, in-process)."""
import json
import math
import re

import numpy as np
import pytest
import torch

import byol
import common
import eval_knn

from conftest import gradients_at_p, make_run, run_main


def squared_distance_of_unit_vectors(p, z):
    """||p/|p| - z/|z|||^2 per row, float64 numpy: the form BYOL writes its loss in."""
    p, z = p.detach().double().numpy(), z.detach().double().numpy()
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return ((p - z) ** 2).sum(axis=1)


def test_regression_loss_is_the_normalized_squared_distance():
    p, z = torch.randn(6, 5), torch.randn(6, 5)
    assert byol.regression_loss(p, z).item() == pytest.approx(squared_distance_of_unit_vectors(p, z).mean(), abs=1e-5)
    assert byol.regression_loss(p, 4 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol.regression_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)


def test_symmetric_loss_sums_both_directions():
    p1, p2, z1, z2 = (torch.randn(6, 5) for _ in range(4))
    expected = squared_distance_of_unit_vectors(p1, z2).mean() + squared_distance_of_unit_vectors(p2, z1).mean()
    assert byol.byol_loss(p1, p2, z1, z2).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("progress,tau", [(0.0, 0.99), (1 / 3, 1 - 0.01 * 0.75), (0.5, 0.995),
                                          (2 / 3, 1 - 0.01 * 0.25), (1.0, 1.0)])
def test_tau_follows_the_cosine_schedule(progress, tau):
    # cos(pi/3) = 1/2, cos(pi/2) = 0, cos(2pi/3) = -1/2: tau = 1 - (1 - 0.99) (cos + 1) / 2.
    assert byol.target_tau(0.99, progress) == pytest.approx(tau, abs=1e-12)


def tiny_model(cut=1.0):
    return byol.build_model(byol.Args(hidden_dim=16, proj_dim=8, cut=cut), img_size=8)


def online_and_target(model):
    return ([*model.backbone.parameters(), *model.projector.parameters()],
            [*model.target_backbone.parameters(), *model.target_projector.parameters()])


def perturb_online(model):
    with torch.no_grad():
        for theta in online_and_target(model)[0]:
            theta.add_(torch.randn_like(theta))


def test_update_target_is_an_exponential_moving_average():
    model = tiny_model()
    perturb_online(model)
    online, target = online_and_target(model)
    before = [xi.clone() for xi in target]
    online_before = [theta.clone() for theta in online]
    byol.update_target(model, 0.9)
    for xi, old, theta in zip(target, before, online):
        torch.testing.assert_close(xi, 0.9 * old + 0.1 * theta)
    assert all(torch.equal(a, b) for a, b in zip(online, online_before))  # the online net is not touched


def test_cut_init_reaches_the_target_exactly():
    torch.manual_seed(0)
    plain = tiny_model(cut=1.0)
    torch.manual_seed(0)
    cut = tiny_model(cut=3.0)
    online, target = online_and_target(cut)
    assert len(online) == len(target) > 0
    for theta, xi in zip(online, target):
        assert torch.equal(theta, xi)
    for (name, a), b in zip(plain.named_parameters(), cut.parameters()):
        assert torch.equal(b, a / 3), name
    # BN running statistics are copied too: the target starts as an exact copy of the cut online net.
    for online_part, target_part in ((cut.backbone, cut.target_backbone), (cut.projector, cut.target_projector)):
        a, b = online_part.state_dict(), target_part.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_gradient_reaches_the_target_and_gradscale_acts_on_p():
    model = tiny_model()
    perturb_online(model)  # online != target, so the target branch is a genuinely different network
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)

    def gradients_reach_the_online_net_only():
        _, target = online_and_target(model)
        assert all(not xi.requires_grad and xi.grad is None for xi in target)
        assert all(theta.grad is not None for theta in [*model.backbone.parameters(), *model.predictor.parameters()])

    runs, p = gradients_at_p(model, byol.compute_loss, x1, x2, lambda power: byol.Args(power=power), (0.0, 2.0),
                             after_backward=gradients_reach_the_online_net_only)
    assert runs[0.0][0] == pytest.approx(runs[2.0][0], abs=1e-6)
    torch.testing.assert_close(runs[2.0][1], runs[0.0][1] * p.norm(dim=1, keepdim=True) ** 2)
    stats = runs[2.0][2]
    assert stats["emb_norm_mean"].item() == pytest.approx(p.norm(dim=1).mean().item(), rel=1e-5)


def test_target_moves_once_per_optimizer_step_under_accum():
    """The script's own train_step with two micro-batches per step moves the target once
    per step, towards the online weights the previous step made."""
    model, cpu = tiny_model(), torch.device("cpu")
    online, target = online_and_target(model)
    args = byol.Args(hidden_dim=16, proj_dim=8, epochs=1, warmup=0, batch_size=8, accum=2)
    run = make_run(args)  # 16 images of batch 8: 2 steps in all
    opt = common.make_optimizer(args, [*online, *model.predictor.parameters()], cpu)
    same = (lambda x: x, lambda x: x)  # the batches are already the views
    micro_batches = lambda: [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]  # noqa: E731
    xi0 = [xi.clone() for xi in target]
    byol.train_step(model, opt, micro_batches(), same, run, 0)
    # Step 0: the target is a copy of the online net, so the EMA leaves it exactly as it was.
    assert all(torch.equal(a, b) for a, b in zip(target, xi0))
    assert not all(torch.equal(a, b) for a, b in zip(online, xi0))  # while the optimizer moved the online net
    theta1, xi1 = [p.clone() for p in online], [xi.clone() for xi in target]
    byol.train_step(model, opt, micro_batches(), same, run, 1)  # progress 1/2
    tau = byol.target_tau(0.99, 0.5)
    for xi, old, theta in zip(target, xi1, theta1):
        torch.testing.assert_close(xi, tau * old + (1 - tau) * theta)  # once: twice would be tau^2


def test_logged_statistics_sit_on_the_loss_device():
    """Meter.epoch_means stacks the epoch sums for torchrun's all-reduce, which fails when one sits on the CPU
    and the rest on the GPU. The meta device stands in for the GPU: a tensor made on the CPU shows."""
    meta, args = torch.device("meta"), byol.Args(hidden_dim=16, proj_dim=8, epochs=1, warmup=0, batch_size=8)
    run = common.Run("byol", args, meta, make_run(args).data, [0.5] * 3, [0.25] * 3, folder="")
    model = tiny_model().to(meta)
    opt = common.make_optimizer(args, [p for p in model.parameters() if p.requires_grad], meta)
    byol.train_step(model, opt, [torch.randn(8, 3, 8, 8, device=meta)], (lambda x: x, lambda x: x), run, 0)
    assert "tau" in run.meter.sums and {v.device for v in run.meter.sums.values()} == {meta}


def test_script_end_to_end_and_eval_knn_reads_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = run_main(byol.main, "--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--epochs", "1",
                 "--width", "16", "--hidden-dim", "64", "--proj-dim", "32", "--cut", "3", "--out", out,
                 "--device", "cpu")
    assert r.returncode == 0, r.stderr
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "emb_norm_mean", "emb_norm_std", "feat_norm_mean", "collapse_std", "knn_top1"):
        assert math.isfinite(line[key]), key
    assert 0 <= line["loss"] <= 8 and 0 < line["collapse_std"] <= 1
    # Two steps, at progress 0 and 1/2: the logged tau is the mean of the schedule's 0.99 and 0.995.
    assert line["tau"] == pytest.approx((0.99 + 0.995) / 2, abs=1e-6)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["method"] == "byol" and any(k.startswith("target_backbone.") for k in ckpt["model"])
    # Only the online network is optimized.
    online = [k for k in ckpt["model"] if k.split(".")[0] in ("backbone", "projector", "predictor")
              and "running" not in k and "num_batches" not in k]
    assert sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"]) == len(online)
    # Every analysis, where the loss sees the embedding: the predictor output p.
    r = run_main(eval_knn.main, out / "last.pt", "--all", "--space", "loss", "--probe-epochs", "2",
                 "--json", tmp_path / "all.json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    acc = re.search(r"byol epoch 1 on synthetic: weighted 200-NN top-1 = ([\d.]+)% \(predictor features\)", r.stdout)
    assert acc and 0 <= float(acc.group(1)) <= 100, r.stdout
    analyses = json.load(open(tmp_path / "all.json"))["analyses"]
    assert {k: v["space"] for k, v in analyses.items()} == dict.fromkeys(
        ["buckets", "novelty", "prototypes", "probe", "classes"], "predictor")
