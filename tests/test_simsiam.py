"""SimSiam: the loss against closed forms, the stop-gradient, GradScale on p, cut-init,
fix-pred-lr, and the script end to end on the synthetic data (its main() through safety.cli, in-process)."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import eval_knn
import simsiam

from conftest import ROOT, gradients_at_p, run_main, run_script


def cosines(p, z):
    """Row-wise cosine similarity in float64 numpy, written out from the definition."""
    p, z = p.detach().double().numpy(), z.detach().double().numpy()
    return np.array([a @ b / (np.sqrt(a @ a) * np.sqrt(b @ b)) for a, b in zip(p, z)])


def test_negative_cosine_is_minus_mean_cosine():
    p, z = torch.randn(5, 7), torch.randn(5, 7)
    assert simsiam.negative_cosine(p, z).item() == pytest.approx(-cosines(p, z).mean(), abs=1e-6)
    # Only directions count: rescaling either side leaves D unchanged.
    assert simsiam.negative_cosine(3 * p, 0.5 * z).item() == pytest.approx(-cosines(p, z).mean(), abs=1e-6)
    assert simsiam.negative_cosine(p, p).item() == pytest.approx(-1.0, abs=1e-6)


def test_symmetric_loss_value_gradient_and_stop_gradient():
    B = 6
    p1, p2, z1, z2 = (torch.randn(B, 5, requires_grad=True) for _ in range(4))
    loss = simsiam.simsiam_loss(p1, p2, z1, z2)
    expected = -cosines(p1, z2).mean() / 2 - cosines(p2, z1).mean() / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dp [-cos(p, z)] = -(z_hat - cos * p_hat) / ||p||, times 1 / (2B) from the mean and the halving.
    for p, z, g in ((p1, z2, p1.grad), (p2, z1, p2.grad)):
        p_, z_ = p.detach(), z.detach()
        p_hat, z_hat = p_ / p_.norm(dim=1, keepdim=True), z_ / z_.norm(dim=1, keepdim=True)
        cos = (p_hat * z_hat).sum(dim=1, keepdim=True)
        torch.testing.assert_close(g, -(z_hat - cos * p_hat) / p_.norm(dim=1, keepdim=True) / (2 * B))
    # Stop-gradient: nothing flows into the projections.
    assert z1.grad is None and z2.grad is None


def test_loss_has_no_path_through_z():
    p1, p2 = torch.randn(4, 3), torch.randn(4, 3)  # constants
    z1, z2 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    assert not simsiam.simsiam_loss(p1, p2, z1, z2).requires_grad


def tiny_model(cut=1.0):
    return simsiam.build_model(simsiam.Args(proj_dim=16, pred_dim=8, cut=cut), img_size=8)


def test_gradscale_scales_the_gradient_reaching_p_by_its_norm():
    model = tiny_model()
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    # p: (2B, D), the predictor outputs of both views
    runs, p = gradients_at_p(model, simsiam.compute_loss, x1, x2, lambda power: simsiam.Args(power=power),
                             (0.0, 1.0))
    assert runs[0.0][0] == pytest.approx(runs[1.0][0], abs=1e-6)  # identity forward
    torch.testing.assert_close(runs[1.0][1], runs[0.0][1] * p.norm(dim=1, keepdim=True))
    stats = runs[1.0][2]
    # The logged norms are those of p, where the loss is applied.
    assert stats["emb_norm_mean"].item() == pytest.approx(p.norm(dim=1).mean().item(), rel=1e-5)
    assert stats["emb_norm_std"].item() == pytest.approx(p.norm(dim=1).std().item(), rel=1e-5)


def test_cut_init_divides_every_initial_weight():
    torch.manual_seed(0)
    plain = tiny_model(cut=1.0)
    torch.manual_seed(0)
    cut = tiny_model(cut=3.0)
    for (name, a), b in zip(plain.named_parameters(), cut.parameters()):
        assert torch.equal(b, a / 3), name


def test_script_end_to_end_and_eval_knn_reads_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = run_main(simsiam.main, "--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--epochs", "1",
                 "--width", "16", "--proj-dim", "64", "--pred-dim", "16", "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "emb_norm_mean", "emb_norm_std", "feat_norm_mean", "collapse_std", "knn_top1"):
        assert math.isfinite(line[key]), key
    assert -1 <= line["loss"] <= 1 and 0 < line["collapse_std"] <= 1
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["method"] == "simsiam"
    # fix-pred-lr: after 2 of 20 warmup steps the backbone's lr is 2/20 of the peak, the predictor's is the peak.
    peak = 0.05 * 16 / 256
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(peak * 2 / 20) and groups[0]["nesterov"]
    assert groups[1]["lr"] == pytest.approx(peak)
    assert len(groups[1]["params"]) == len([k for k in ckpt["model"] if k.startswith("predictor.")
                                            and "running" not in k and "num_batches" not in k])
    # Every analysis, where the loss sees the embedding: the predictor output p.
    r = run_main(eval_knn.main, out / "last.pt", "--all", "--space", "loss", "--probe-epochs", "2",
                 "--json", tmp_path / "all.json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    acc = re.search(r"simsiam epoch 1 on synthetic: weighted 200-NN top-1 = ([\d.]+)% \(predictor features\)", r.stdout)
    assert acc and 0 <= float(acc.group(1)) <= 100, r.stdout
    analyses = json.load(open(tmp_path / "all.json"))["analyses"]
    assert {k: v["space"] for k, v in analyses.items()} == dict.fromkeys(
        ["buckets", "novelty", "prototypes", "probe", "classes"], "predictor")


def test_the_design_cards_command_tries_the_download_and_ends_in_one_sentence_offline(tmp_path, monkeypatch):
    """`python simsiam.py --dataset cifar100 --cut 3 --wd 5e-4` on a fresh machine without internet (every URL
    goes to a proxy on a closed local port): it tries torchvision's download, then names it and both ways out."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "")
    r = run_script(f"{ROOT}/simsiam.py", "--dataset", "cifar100", "--cut", "3", "--wd", "5e-4", cwd=tmp_path)
    (line,) = r.stderr.splitlines()
    assert r.returncode == 2 and line.startswith("error: could not download cifar100 (")
    assert f"put the extracted python-version batches in data{os.sep}cifar-100-python by hand" in line
    assert "--no-download" in line and "--data-dir" in line
    assert os.listdir(tmp_path) == []  # neither data/ nor a run folder is left behind
    r = run_main(simsiam.main, "--dataset", "cifar100", "--no-download", cwd=tmp_path)  # the same, in-process
    assert r.returncode == 2 and r.stderr.startswith("error: cifar100 file train not found")
    assert os.listdir(tmp_path) == []


