"""The figures and files of eval_knn.py (drawn by eval_extras.py), as a newcomer meets them:
every figure says what it shows (title), with units on its axes, the number of images behind
each bar or point and its headline statistic, or why there is none; --compare legends name
each run's settings; epoch ticks are whole numbers; every command prints the files it wrote;
a damaged metrics.jsonl is read around. Figure checks read the matplotlib objects, not pixels, and
are skipped where matplotlib (optional) is missing."""
import importlib.util
import json
import os
import re

import pytest
import torch

from test_human import tiny_checkpoint

import safety
import eval_extras as ex
import eval_knn as ek

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib is optional and not installed")
CTX = "simclr epoch 3 on cifar10"


def bar_texts(ax):
    """The numbers written on the bars (bar_label), without the blank ones."""
    return sorted(t.get_text() for t in ax.texts if t.get_text())


def check_axes(ax):
    """A title, and both axis labels say their unit or what they count, in brackets."""
    assert ax.get_title().strip()
    for label in (ax.get_xlabel(), ax.get_ylabel()):
        assert re.search(r"\(.+\)", label), label


@needs_mpl
def test_buckets_figure_has_counts_and_spearman():
    norms = torch.tensor([0.5, 1.5, 1.5, 2.5, 2.5, 2.5, 3.5, 3.5, 3.5, 3.5])  # 1, 2, 3, 4 images in bins 0-3
    correct = torch.tensor([0, 0, 1, 0, 1, 1, 1, 1, 1, 1]).bool()
    r = {"space": "projector", **ek.binned(norms, 100.0 * correct, "accuracy", bins=4)}
    ax = ex.figure_buckets(r, CTX).axes[0]
    check_axes(ax)
    title = ax.get_title()
    assert CTX in title and "projector features" in title and "numbers: test images per bin" in title
    assert f"Spearman rho = {r['spearman']:.3f}" in title and "overall top-1 70.0% of 10 images" in title
    assert bar_texts(ax) == ["1", "2", "3", "4"]
    assert ax.get_xlabel() == "test embedding norm / max test norm (ratio)" and "(%)" in ax.get_ylabel()


@needs_mpl
def test_novelty_figure_has_auroc_and_set_sizes():
    r = {"space": "backbone", **ek.novelty(torch.full((6,), 2.0), torch.tensor([2.0, 2.5, 3.0]),
                                          {"noise": torch.tensor([1.0, 1.5])})}
    ax = ex.figure_novelty(r, CTX).axes[0]
    check_axes(ax)
    assert bar_texts(ax) == ["AUROC 1.00"] and "AUROC" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["train\nn=6", "test\nn=3", "noise\nn=2"]


@needs_mpl
def test_classes_figure_says_why_there_is_no_spearman_on_a_balanced_set():
    summary = ek.norm_summary(torch.arange(12.0)[:, None], torch.arange(12) % 3, 3)
    balanced = {"space": "loss", **ek.class_frequency(summary)}  # evaluate() adds the space
    ax = ex.figure_classes(balanced, CTX).axes[0]
    check_axes(ax)
    assert "balanced set" in ax.get_title() and "rho =" not in ax.get_title()
    skewed = {"space": "loss", **ek.class_frequency(ek.norm_summary(torch.tensor([[3.0], [3], [3], [2], [2], [1]]),
                                                                     torch.tensor([0, 0, 0, 1, 1, 2]), 3))}
    assert "Spearman rho (frequency, norm) = 1.000" in ex.figure_classes(skewed).axes[0].get_title()


@needs_mpl
def test_human_figure_has_both_panels_with_counts_and_spearman():
    norms = torch.tensor([0.1] * 12 + [0.6] * 12 + [1.0] * 12)
    clean = torch.zeros(36, dtype=torch.long)
    human = torch.tensor([1] * 6 + [0] * 6 + [1] * 2 + [0] * 10 + [0] * 12)  # 50%, 83%, 100% right
    probs = torch.tensor([[0.5, 0.5] + [0.0] * 8] * 12 + [[1.0] + [0.0] * 9] * 24)
    r = {"space": "predictor", "dataset": "cifar10",
         "labels": {"human_label": "aggre_label", **ek.human_agreement(norms, human, clean, bins=4, min_count=10)},
         "entropy": ek.human_entropy(norms, probs, bins=4)}
    labels_ax, entropy_ax = ex.figure_human(r, CTX).axes
    for ax in (labels_ax, entropy_ax):
        check_axes(ax)
        assert CTX in ax.get_title() and "predictor features" in ax.get_title()
        assert bar_texts(ax) == ["12", "12", "12"]
    assert "CIFAR-10N" in labels_ax.get_title() and "Spearman rho = 1.000" in labels_ax.get_title()
    assert "(%)" in labels_ax.get_ylabel() and "(bits)" in entropy_ax.get_ylabel()
    assert "CIFAR-10H" in entropy_ax.get_title() and "Spearman rho = -0.866" in entropy_ax.get_title()
    # CIFAR-100 has no CIFAR-10H panel.
    one = {k: v for k, v in r.items() if k != "entropy"}
    assert len(ex.figure_human({**one, "dataset": "cifar100"}).axes) == 1


@needs_mpl
def test_prototypes_figure_labels_classes_with_their_counts(tmp_path):
    labels = torch.arange(30) % 3
    images = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    png = tmp_path / "grid.png"
    r = {"space": "backbone", **ek.prototypes(images, torch.rand(30), labels, 3, str(png))}
    ax = ex.figure_prototypes(r, CTX).axes[0]
    check_axes(ax)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 (n=10)", "1 (n=10)", "2 (n=10)"]


def runs_with_settings(tmp_path):
    """Three run folders: settings in args.json, in last.pt only, and nowhere."""
    line = dict(loss=5.0, emb_norm_mean=1.5, feat_norm_mean=9.0)
    rows = [{**line, "epoch": 1, "knn_top1": None}, {**line, "epoch": 2, "knn_top1": 40.0},
            {**line, "epoch": 3, "knn_top1": 35.5}]
    paths = []
    for name in ("simclr-cifar10-20250101-120000", "simsiam-cifar10-20250102-120000", "old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(tmp_path / name))
    with open(os.path.join(paths[0], "args.json"), "w") as fh:
        json.dump({"format": safety.FORMAT, "method": "simclr", "args": {"cut": 3.0, "power": 1.0, "wd": 5e-4}}, fh)
    torch.save({"format": safety.FORMAT, "method": "simsiam", "args": {"cut": 1.0, "power": 0.0, "wd": 1e-4}},
               os.path.join(paths[1], "last.pt"))
    (tmp_path / "old" / "args.json").write_text("{not json")  # unreadable: the folder name stays
    return paths


def test_compare_legend_names_each_runs_settings(tmp_path, capsys):
    paths = runs_with_settings(tmp_path)
    result = ek.main(["--compare", *paths, paths[0]])
    assert list(result["runs"]) == ["simclr-cifar10-20250101-120000", "simsiam-cifar10-20250102-120000", "old",
                                    "simclr-cifar10-20250101-120000 (2)"]
    assert list(result["labels"].values()) == [
        "simclr cut 3 power 1 wd 0.0005 [simclr-cifar10-20250101-120000]",  # twice the same settings
        "simsiam cut 1 power 0 wd 0.0001", "old",
        "simclr cut 3 power 1 wd 0.0005 [simclr-cifar10-20250101-120000 (2)]"]
    out = capsys.readouterr().out
    assert "== simsiam-cifar10-20250102-120000  (simsiam cut 1 power 0 wd 0.0001)\n" in out
    assert "== old\n" in out


@needs_mpl
def test_curves_figure_legend_ticks_and_best_knn(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    paths = runs_with_settings(tmp_path)
    result = ek.main(["--compare", *paths[1:]])
    fig = ex.figure_curves(result["runs"], result["labels"])
    FigureCanvasAgg(fig).draw()  # lays out the ticks
    assert "one point per logged epoch" in fig._suptitle.get_text()
    for ax in fig.axes:
        check_axes(ax)
        assert ax.get_xlabel().startswith("epoch")
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ax.get_xticks()
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert legend == ["simsiam cut 1 power 0 wd 0.0001: best k-NN 40.0% (epoch 2)", "old: best k-NN 40.0% (epoch 2)"]


def test_compare_reads_around_damaged_lines_with_one_warning(tmp_path, capsys):
    good = dict(loss=5.0, emb_norm_mean=1.5, feat_norm_mean=9.0, knn_top1=None)
    (tmp_path / "run").mkdir()
    lines = [json.dumps({**good, "epoch": 1}).encode(), b"garbage", b"\xff\xfe\x00binary",
             json.dumps({**good, "epoch": "2"}).encode(),  # an epoch that is not a number
             json.dumps({**good, "epoch": 2, "loss": "nan?"}).encode(),
             json.dumps({**good, "epoch": 2}).encode(), b"", json.dumps({**good, "epoch": 3})[:20].encode()]
    (tmp_path / "run" / "metrics.jsonl").write_bytes(b"\n".join(lines))  # the last line cut mid-write
    result = ek.main(["--compare", str(tmp_path / "run")])
    assert [r["epoch"] for r in result["runs"]["run"]] == [1, 2]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "skipped 5 damaged lines of" in err and "(line 2, 3, 4, ...)" in err
    (tmp_path / "run" / "metrics.jsonl").write_bytes(b"\x00\x00\n{\n")
    with pytest.raises(safety.UsageError, match=r"has no readable metrics line \(2 damaged\)"):
        ek.main(["--compare", str(tmp_path / "run")])


def test_every_command_prints_the_files_it_wrote(tmp_path, capsys):
    paths = runs_with_settings(tmp_path)
    js, figs = tmp_path / "cmp.json", tmp_path / "figs"
    ek.main(["--compare", *paths, "--json", str(js), "--figures", str(figs)])
    out = capsys.readouterr().out
    assert f"numbers: {js}\n" in out and json.load(open(js))["labels"]["old"] == "old"
    written = sorted(os.listdir(figs)) if HAS_MPL else []
    assert written == (["curves.png"] if HAS_MPL else [])
    assert all(f"figure: {figs / name}\n" in out for name in written)
    # A checkpoint: the numbers, the prototype grid and one figure per analysis.
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", dataset="synthetic", subset=32)
    js, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    ek.main([ckpt, "--analyses", "buckets,classes,prototypes", "--prototypes-out", str(grid),
             "--json", str(js), "--figures", str(figs), "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"numbers: {js}\n" in out and f"prototypes (backbone features): {grid};" in out and grid.exists()
    for name in (["buckets.png", "classes.png", "prototypes.png"] if HAS_MPL else []):
        assert f"figure: {figs / name}\n" in out and (figs / name).exists()
    res = json.load(open(js))["analyses"]
    assert res["classes"]["spearman"] is None and "balanced set" in res["classes"]["note"]  # null plus the reason


def test_no_matplotlib_no_figures_and_a_note(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    paths = runs_with_settings(tmp_path)
    assert ex.draw_figures(ex.compare(paths[:1]), str(tmp_path / "figs")) is None
    ek.main(["--compare", paths[0], "--figures", str(tmp_path / "figs")])
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err and "figure:" not in captured.out
    assert not (tmp_path / "figs").exists()
