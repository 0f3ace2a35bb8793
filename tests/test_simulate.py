"""simulate.py: every subcommand in --quick mode, its numbers checked against the theory.

Run from the repo root: python -m pytest tests/test_simulate.py -q  (~20 s on 2 cores)
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import simulate  # noqa: E402


def quick(name, tmp_path, seed=0):
    return simulate.run(name, seed=seed, out=str(tmp_path), quick=True)


def row(rows, **match):
    (hit,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return hit


# ---------------------------------------------------------------- building blocks
def test_closed_form_gradient_matches_autograd():
    torch.manual_seed(0)
    zi = torch.randn(100, 7, dtype=torch.float64, requires_grad=True)
    zj = torch.randn(100, 7, dtype=torch.float64)
    (auto,) = torch.autograd.grad(F.cosine_similarity(zi, zj).sum(), zi)  # torch's own cosine
    assert torch.allclose(simulate.cos_grad(zi.detach(), zj), auto, atol=1e-6, rtol=0)


def test_sup_info_nce_is_simclr_cross_entropy_for_pair_labels():
    # With one positive per row the loss is the cross-entropy over the other 2B-1 rows.
    torch.manual_seed(0)
    B, tau = 6, 0.5
    z = torch.randn(2 * B, 5, dtype=torch.float64)
    u = F.normalize(z, dim=1)
    logits = (u @ u.T / tau).fill_diagonal_(-math.inf)
    target = (torch.arange(2 * B) + B) % (2 * B)
    expected = F.cross_entropy(logits, target)
    got = simulate.sup_info_nce(z, torch.arange(B).repeat(2), tau)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_spearman_and_fit_exponent():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert simulate.spearman(x, x**3) == pytest.approx(1.0)
    assert simulate.spearman(x, -x) == pytest.approx(-1.0)
    assert simulate.fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)


# ---------------------------------------------------------------- the subcommands
def test_gradients_match_theory(tmp_path):
    rows = quick("gradients", tmp_path)["rows"]
    for r in rows[:-1]:  # every deviation is float64 rounding, far below 1e-6
        assert r["max_dev"] < 1e-6, r
    assert rows[-1]["check"].startswith("InfoNCE steps") and rows[-1]["max_dev"] == 0


def test_bound_is_never_violated_and_tight_for_small_lr(tmp_path):
    result = quick("bound", tmp_path)
    for r in result["rows"]:
        assert r["max_dev_from_exact"] < 1e-9  # arctan rotation formula is exact
        assert r["worst_ratio_general"] <= 1.0
        assert r["worst_ratio_acute"] <= 1.0
        # Small steps: measured gain within 2% of lr sin^2(phi) / rho^2 (first order).
        assert 0.98 < r["small_lr_ratio_min"] <= r["small_lr_ratio_max"] < 1.02
        # The acute-angle restriction is needed: obtuse pairs beat the first-order value.
        assert r["worst_ratio_obtuse"] > 1.0
    # The best gain shrinks like 1/rho^2 once lr / rho^2 is small.
    scaled = [b["max_gain_times_rho2"] for b in result["best_gain_by_rho"] if b["rho"] >= 1]
    assert max(scaled) / min(scaled) < 1.05


def test_norms_steps_grow_quadratically(tmp_path):
    result = quick("norms", tmp_path)
    steps = [r["steps"] for r in result["rows"]]
    assert all(s > 0 for s in steps) and steps == sorted(steps) and len(set(steps)) == len(steps)
    assert abs(result["exponent"] - 2) < 0.2
    # Recompute the fit from the table, so the exponent is really the table's.
    norms = [r["norm"] for r in result["rows"]]
    assert simulate.fit_exponent(norms, steps) == pytest.approx(result["exponent"])


def test_angles_only_near_pi_slow_convergence(tmp_path):
    rows = quick("angles", tmp_path)["rows"]
    angles, steps = [r["mean_angle_deg"] for r in rows], [r["steps"] for r in rows]
    assert angles == sorted(angles) and steps == sorted(steps) and min(steps) > 0
    assert angles[-1] > 179.5
    at_90 = row(rows, a=0.0)["steps"]
    assert row(rows, a=0.999)["steps"] > 2 * at_90  # the last ~6 degrees cost more than 0..90


def test_weight_decay_speeds_up_then_fails(tmp_path):
    result = quick("weight-decay", tmp_path)
    rows = result["rows"]
    assert abs(result["table"][0]["exponent"] - 2) < 0.2  # lambda = 0 is `norms` again
    steps = lambda norm, wd: row(rows, norm=norm, wd=wd)["steps"]
    for wd in (0.0, 0.1, 1.0):
        assert steps(4, wd) > steps(1, wd)  # larger norms still converge slower
    for norm in (1, 4):
        assert steps(norm, 0.1) < steps(norm, 0.0)  # moderate decay converges faster
        assert steps(norm, 30.0) == "collapsed"
        assert steps(norm, 300.0) == "diverged"
    assert steps(4, 0.0) / steps(4, 0.1) > 2


def test_density_denser_points_get_larger_norms(tmp_path):
    untrained, trained = quick("density", tmp_path)["rows"]
    # Negative Spearman(norm, k-NN distance) = denser points have larger norms.
    assert trained["spearman_latent_knn"] < -0.1
    assert trained["spearman_latent_knn"] < untrained["spearman_latent_knn"] - 0.1
    assert trained["spearman_embedding_knn"] < 0


def test_imbalance_frequent_classes_get_larger_norms(tmp_path):
    last = quick("imbalance", tmp_path)["rows"][-1]
    assert last["x8"] > last["x1"]
    assert last["x4"] + last["x8"] > last["x1"] + last["x2"]


def test_gradscale_is_conservative_only_for_power_zero(tmp_path):
    rows = quick("gradscale", tmp_path)["rows"]
    for r in rows:
        assert r["max_rel_dev_magnitude"] < 1e-9  # |F_p| = |z|^(p-1) sin(phi)
        assert r["sector_loop"] == pytest.approx(r["sector_closed_form"], abs=1e-4)
    plain, scaled = row(rows, power=0.0), row(rows, power=1.0)
    assert abs(plain["sector_loop"]) < 1e-9 and abs(plain["square_loop"]) < 1e-9
    assert abs(scaled["sector_loop"]) > 1 and abs(scaled["square_loop"]) > 0.1


# ---------------------------------------------------------------- plumbing
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    a = quick("angles", tmp_path / "a", seed=3)
    b = quick("angles", tmp_path / "b", seed=3)
    c = quick("angles", tmp_path / "c", seed=4)
    assert a == b and a != c


def test_run_writes_files_and_restores_threads(tmp_path):
    threads = torch.get_num_threads()
    result = quick("gradscale", tmp_path)
    assert torch.get_num_threads() == threads
    assert json.loads((tmp_path / "gradscale.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "gradscale.csv").read_text().startswith("power,")
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    assert (tmp_path / "gradscale.png").exists() == has_mpl


def test_cli_runs_a_subcommand(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "simulate.py", "gradients", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "autograd - closed form" in proc.stdout
    rows = json.loads((out / "gradients.json").read_text())["rows"]
    assert rows[0]["max_dev"] < 1e-6


@pytest.mark.parametrize("argv", [["nope"], [], ["norms", "--seed", "-1"], ["norms", "--seed", "x"],
                                  ["norms", "--out", "simulate.py"], ["norms", "--bogus"]])
def test_bad_input_is_one_sentence_and_status_2(argv, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        simulate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("simulate.py: ") and "Traceback" not in err
