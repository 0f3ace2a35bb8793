"""simulate.py: every subcommand in --quick mode, its numbers checked against the theory.

Run from the repo root: python -m pytest tests/test_simulate.py -q  (~20 s on 2 cores)
Where matplotlib is installed, each figure is also checked against the figure rules.
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

try:
    import matplotlib  # noqa: F401
    HAS_MPL = True
except ImportError:  # optional: then no PNGs are drawn, and the figure checks are skipped
    HAS_MPL = False


def quick(name, tmp_path, seed=0):
    return simulate.run(name, seed=seed, out=str(tmp_path), quick=True)


@pytest.fixture
def figure(monkeypatch):
    """The figure a subcommand draws, kept for inspection: {"fig": Figure} after the run.
    save() draws it (tick labels exist only after that draw) and closes it, but the
    Figure object and its artists stay readable. Empty without matplotlib."""
    drawn = {}
    real_save = simulate.save

    def save(out, name, result, draw=None):
        def draw_and_keep(plt):
            drawn["fig"] = draw(plt)
            return drawn["fig"]
        return real_save(out, name, result, draw and draw_and_keep)
    monkeypatch.setattr(simulate, "save", save)
    return drawn


def assert_figure_rules(figure, headline):
    """Issue 17: every plot has a title, axis labels with units in parentheses, the n behind
    its points or lines, the headline number printed on it, and integer ticks on axes
    that count steps or epochs."""
    if not HAS_MPL:
        return
    fig = figure["fig"]
    plots = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    texts += [t.get_text() for ax in plots if ax.get_legend() for t in ax.get_legend().get_texts()]
    for ax in plots:
        assert ax.get_title(), "every plot needs a title"
        for label in (ax.get_xlabel(), ax.get_ylabel()):
            assert label.endswith(")") and "(" in label, f"no unit in axis label {label!r}"
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if label.endswith(("(steps)", "(epochs)")):
                ticks = [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text()]
                assert ticks and all(t.isdigit() for t in ticks), (label, ticks)
    assert any("n = " in t for t in texts), texts
    assert any(headline in t for t in texts), (headline, texts)


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


def test_info_nce_fixed_is_eq_1_and_its_field_is_tangent_and_scales_as_one_over_norm():
    torch.manual_seed(0)
    t, negatives = torch.randn(5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    z = torch.randn(50, 5, dtype=torch.float64) * torch.exp(torch.randn(50, 1))  # norms over ~2 decades
    c = torch.exp(torch.randn(50, 1, dtype=torch.float64))  # (50, 1) a random rescaling per row
    loss = lambda z: simulate.info_nce_fixed(z, t, negatives, tau=0.5)
    # Eq. 1 is the cross-entropy with the positive as class 0 of 1 + K.
    logits = F.cosine_similarity(z[:, None], torch.cat([t[None], negatives])[None], dim=-1) / 0.5
    assert torch.allclose(loss(z), F.cross_entropy(logits, torch.zeros(50, dtype=torch.long), reduction="none"))
    g, g_scaled = simulate.descent(loss, z), simulate.descent(loss, c * z)
    assert simulate.cos(g, z).abs().max() < 1e-12  # Prop 3.2: tangent
    assert torch.allclose(c * g_scaled, g, rtol=1e-12, atol=1e-12 * g.abs().max().item())  # 1/|z|, row by row
    assert ((z + 0.7 * g).norm(dim=-1) > z.norm(dim=-1)).all()  # Cor 3.3: a step grows every norm
    # descent() of -cos is Prop 3.1's closed form.
    assert torch.allclose(simulate.descent(lambda z: -simulate.cos(z, t), z), simulate.cos_grad(z, t.expand_as(z)))


def test_spearman_and_fit_exponent():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert simulate.spearman(x, x**3) == pytest.approx(1.0)
    assert simulate.spearman(x, -x) == pytest.approx(-1.0)
    assert simulate.fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)


# ---------------------------------------------------------------- the subcommands
def test_gradients_match_theory(tmp_path, figure):
    rows = quick("gradients", tmp_path)["rows"]
    for r in rows[:-1]:  # every deviation is float64 rounding, far below 1e-6
        assert r["max_dev"] < 1e-6, r
    assert rows[-1]["check"].startswith("InfoNCE steps") and rows[-1]["max_dev"] == 0
    assert_figure_rules(figure, f"{rows[1]['max_dev']:.1e}")


def test_landscape_step_is_tangent_scales_as_one_over_norm_and_grows_it(tmp_path, figure):
    result = quick("landscape", tmp_path)
    rows = result["rows"]
    norms = (0.6, 1.2, 2.4)
    assert [(r["loss"], r["norm"]) for r in rows] == [(loss, r) for loss in ("cos", "InfoNCE") for r in norms]
    for r in rows:  # autograd against Prop 3.1-3.2 and Cor 3.3, to float64 rounding
        assert r["max_abs_cos_step_z"] < 1e-13  # the step is tangent to the circle |z| = r
        assert r["max_dev_norm_x_step"] < 1e-13  # |step| = (its length at |z| = 1) / r
        assert r["max_dev_pythagoras"] < 1e-13  # |z'|^2 = |z|^2 + lr^2 |grad|^2
        assert r["min_norm_gain"] > 0  # every one of the points moved outwards
    for loss in ("cos", "InfoNCE"):
        ours = [r for r in rows if r["loss"] == loss]
        steps = [r["mean_step_length"] for r in ours]  # twice the norm, half the step
        assert steps[0] == pytest.approx(2 * steps[1], rel=1e-12)
        assert steps[1] == pytest.approx(2 * steps[2], rel=1e-12)
        gains = [r["max_norm_gain"] for r in ours]
        assert gains == sorted(gains, reverse=True)  # large embeddings barely grow
    # Fig. S1: the loss is constant along every ray, over norms 0.1 to 10.
    for line in result["landscape"]:
        assert line["max_spread_along_rays"] < 1e-13
    cos_line = row(result["landscape"], loss="cos")
    assert cos_line["loss_min"] == pytest.approx(-1, abs=1e-15)  # the ray through t
    assert cos_line["loss_max"] == pytest.approx(1, abs=1e-15)  # the ray through -t
    assert_figure_rules(figure, f"{cos_line['max_spread_along_rays']:.1e}")


def test_bound_is_never_violated_and_tight_for_small_lr(tmp_path, figure):
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
    assert_figure_rules(figure, f"{max(r['worst_ratio_general'] for r in result['rows']):.4f}")


def test_norms_steps_grow_quadratically(tmp_path, figure):
    result = quick("norms", tmp_path)
    steps = [r["steps"] for r in result["rows"]]
    assert all(s > 0 for s in steps) and steps == sorted(steps) and len(set(steps)) == len(steps)
    assert abs(result["exponent"] - 2) < 0.2
    # Recompute the fit from the table, so the exponent is really the table's.
    norms = [r["norm"] for r in result["rows"]]
    assert simulate.fit_exponent(norms, steps) == pytest.approx(result["exponent"])
    assert_figure_rules(figure, f"norm^{result['exponent']:.3f}")


def test_angles_only_near_pi_slow_convergence(tmp_path, figure):
    rows = quick("angles", tmp_path)["rows"]
    angles, steps = [r["mean_angle_deg"] for r in rows], [r["steps"] for r in rows]
    assert angles == sorted(angles) and steps == sorted(steps) and min(steps) > 0
    assert angles[-1] > 179.5
    at_90 = row(rows, a=0.0)["steps"]
    assert row(rows, a=0.999)["steps"] > 2 * at_90  # the last ~6 degrees cost more than 0..90
    assert_figure_rules(figure, f"steps at 90 deg = {steps[-1] / at_90:.1f}")


def test_weight_decay_speeds_up_then_fails(tmp_path, figure):
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
    assert_figure_rules(figure, f"norm 4: {steps(4, 0.0)} steps at lambda=0")


def test_density_denser_points_get_larger_norms(tmp_path, figure):
    untrained, trained = quick("density", tmp_path)["rows"]
    # Negative Spearman(norm, k-NN distance) = denser points have larger norms.
    assert trained["spearman_latent_knn"] < -0.1
    assert trained["spearman_latent_knn"] < untrained["spearman_latent_knn"] - 0.1
    assert trained["spearman_embedding_knn"] < 0
    assert_figure_rules(figure, f"{trained['spearman_latent_knn']:.3f} trained")


def test_imbalance_frequent_classes_get_larger_norms(tmp_path, figure):
    result = quick("imbalance", tmp_path)
    last = result["rows"][-1]
    assert last["x8"] > last["x1"]
    assert last["x4"] + last["x8"] > last["x1"] + last["x2"]
    by_freq = torch.tensor([last[f"x{f}"] for f in (1, 2, 4, 8)])
    assert result["spearman_freq_norm"] == pytest.approx(simulate.spearman(torch.arange(4.0), by_freq))
    assert result["spearman_freq_norm"] > 0
    assert_figure_rules(figure, f"= {result['spearman_freq_norm']:.2f}")


def test_gradscale_is_conservative_only_for_power_zero(tmp_path, figure):
    rows = quick("gradscale", tmp_path)["rows"]
    for r in rows:
        assert r["max_rel_dev_magnitude"] < 1e-9  # |F_p| = |z|^(p-1) sin(phi)
        assert r["sector_loop"] == pytest.approx(r["sector_closed_form"], abs=1e-4)
    plain, scaled = row(rows, power=0.0), row(rows, power=1.0)
    assert abs(plain["sector_loop"]) < 1e-9 and abs(plain["square_loop"]) < 1e-9
    assert abs(scaled["sector_loop"]) > 1 and abs(scaled["square_loop"]) > 0.1
    assert_figure_rules(figure, f"sector = {scaled['sector_loop']:.4f}")


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
    assert (tmp_path / "gradscale.png").exists() == HAS_MPL


def test_landscape_from_the_cli_prints_the_paths_it_wrote(tmp_path, capsys):
    out = tmp_path / "cli"
    simulate.main(["landscape", "--quick", "--out", str(out)])  # in-process: no second torch start-up
    printed = capsys.readouterr().out
    files = ["landscape.csv", "landscape.json"] + (["landscape.png"] if HAS_MPL else [])
    for name in files:
        assert (out / name).exists() and str(out / name) in printed, name
    assert (out / "landscape.png").exists() == HAS_MPL
    result = json.loads((out / "landscape.json").read_text())
    assert len(result["rows"]) == 6 and len(result["landscape"]) == 2
    assert (out / "landscape.csv").read_text().startswith("loss,norm,points,")


def test_numbers_are_written_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    result = quick("landscape", tmp_path)
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "landscape.json").read_text())["rows"] == result["rows"]
    assert not (tmp_path / "landscape.png").exists()
    assert "pip install matplotlib" in printed and str(tmp_path / "landscape.json") in printed


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
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
