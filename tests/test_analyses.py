"""The embedding-norm analyses of eval_knn.py: rank statistics against hand-computed
values, each analysis on hand-built embeddings whose answer is known, and the CLI end to end
(main() through safety.cli, in-process) on a checkpoint from one tiny CPU epoch of SimCLR."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main

import safety
import eval_extras as ex
import eval_knn as ek
import simclr

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------- rank statistics

def test_ranks_average_ties():
    assert ek.ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert ek.ranks([3, 1, 2]).tolist() == [3, 1, 2]
    assert ek.ranks([7, 7, 7]).tolist() == [2, 2, 2]


def test_spearman_hand_computed_with_ties():
    # ranks a = [1, 2.5, 2.5, 4, 5], ranks b = [2, 1, 3.5, 3.5, 5]; centred by 3 each:
    # sum(da * db) = 7.25, sum(da^2) = sum(db^2) = 9.5, so rho = 7.25 / 9.5 = 29 / 38.
    assert ek.spearman([1, 2, 2, 3, 4], [2, 1, 3, 3, 5]) == pytest.approx(29 / 38, abs=1e-12)
    x = torch.randn(50)
    assert ek.spearman(x, x.exp()) == pytest.approx(1.0)  # only the order counts
    assert ek.spearman(x, -x ** 3) == pytest.approx(-1.0)
    assert math.isnan(ek.spearman([1, 2, 3], [5, 5, 5]))  # a constant side has no ranking
    with pytest.raises(ValueError):
        ek.spearman([1, 2], [1, 2, 3])


def test_auroc_known_values():
    assert ek.auroc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0  # every positive above every negative
    assert ek.auroc([0.0, 1.0], [2.0, 3.0, 4.0]) == 0.0
    same = torch.randn(40)
    assert ek.auroc(same, same.clone()) == 0.5  # identical distributions: only ties
    # (1,2) 0, (1,3) 0, (2,2) half, (2,3) 0 -> 0.5 / 4
    assert ek.auroc([1.0, 2.0], [2.0, 3.0]) == 0.125


def test_auroc_matches_counting_all_pairs():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randint(0, 6, (30,), generator=g).float(), torch.randint(0, 5, (23,), generator=g).float()
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert ek.auroc(pos, neg) == pytest.approx(pairs.mean().item(), abs=1e-12)


# ----------------------------------------------------------------------------- analyses on hand-built data

def rising_buckets(scale=3.0):
    """20 samples per bucket b at norm (b + 0.5) / 20 of the max, b + 1 of them correct, plus
    the maximum itself (correct), which must land in the last bucket."""
    norms, correct = [], []
    for b in range(20):
        norms += [scale * (b + 0.5) / 20] * 20
        correct += [True] * (b + 1) + [False] * (19 - b)
    return torch.tensor(norms + [scale]), torch.tensor(correct + [True])


def buckets(norms, correct, bins=20):
    """The buckets analysis as evaluate() runs it: k-NN accuracy (%) per bin of norm / max norm."""
    return ek.binned(norms, 100.0 * correct, "accuracy", bins, y_name="bin accuracies")


def test_buckets_accuracy_rising_with_norm():
    norms, correct = rising_buckets()
    r = buckets(norms, correct, bins=20)
    assert [b["count"] for b in r["bins"]] == [20] * 19 + [21]
    assert [b["accuracy"] for b in r["bins"][:19]] == pytest.approx([100 * (b + 1) / 20 for b in range(19)])
    assert r["bins"][19]["accuracy"] == 100.0
    assert r["bins"][3]["lo"] == pytest.approx(0.15) and r["bins"][3]["hi"] == pytest.approx(0.2)
    assert r["spearman"] == pytest.approx(1.0)
    # Only norm / max norm matters, and falling accuracy gives -1.
    assert buckets(norms * 7, correct)["bins"] == r["bins"]
    assert buckets(norms, ~correct)["spearman"] == pytest.approx(-1.0)


def test_buckets_leave_empty_bins_out_of_the_correlation():
    r = buckets(torch.tensor([1.0, 1.0, 8.5, 10.0]), torch.tensor([False, True, True, True]), bins=10)
    assert [b["count"] for b in r["bins"]] == [0, 2, 0, 0, 0, 0, 0, 0, 1, 1]
    assert r["bins"][0]["accuracy"] is None and r["bins"][1]["accuracy"] == 50.0
    assert r["spearman"] == pytest.approx(ek.spearman([0.1, 0.8, 0.9], [50, 100, 100]))


def test_novelty_relative_norms_and_auroc():
    train, test = torch.full((10,), 2.0), torch.linspace(1.5, 2.5, 11)
    shifted = {"smaller": torch.full((5,), 1.0), "same": test.clone(), "larger": torch.full((4,), 3.0)}
    r = ek.novelty(train, test, shifted, reference={"larger": torch.full((3,), 4.0)})
    s = r["sets"]
    assert r["train_mean"] == 2.0 and s["train"]["relative"] == 1.0 and s["train"]["auroc"] is None
    assert s["test"]["relative"] == pytest.approx(1.0) and s["test"]["count"] == 11
    assert s["smaller"]["relative"] == 0.5 and s["smaller"]["auroc"] == 1.0  # test norms all larger
    assert s["same"]["auroc"] == 0.5
    assert s["larger"]["auroc"] == 1.0  # compared with its own reference (4.0), not with the test set


def test_shifted_and_resized_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    flipped = ek.shift_images(x, "vflip", None, None)
    assert torch.equal(flipped[:, :, 0], x[:, :, -1]) and torch.equal(flipped.flip(-2), x)
    mean, std = [0.2, 0.5, 0.7], [0.1, 0.1, 0.05]
    big = torch.zeros(400, 3, 8, 8, dtype=torch.uint8)
    noise = ek.shift_images(big, "noise", mean, std, seed=3)
    assert noise.dtype == torch.uint8 and noise.shape == big.shape
    assert (noise.float() / 255).mean(dim=(0, 2, 3)).tolist() == pytest.approx(mean, abs=0.01)
    assert (noise.float() / 255).std(dim=(0, 2, 3)).tolist() == pytest.approx(std, abs=0.01)
    assert torch.equal(noise, ek.shift_images(big, "noise", mean, std, seed=3))
    assert not torch.equal(noise, ek.shift_images(big, "noise", mean, std, seed=4))
    assert ek.resize(x, 8) is x
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    small = ek.resize(flat, 16)
    assert small.shape == (2, 3, 16, 16) and small.dtype == torch.uint8 and (small == 77).all()


def test_prototypes_grid_holds_the_chosen_images_in_order(tmp_path):
    # Image i is a flat tile of grey level i + 1 (0 is reserved for blank tiles), 4 x 4 px.
    counts = [25, 5, 20]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])[torch.randperm(sum(counts))]
    n = len(labels)
    images = (torch.arange(n) + 1).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4)
    norms = torch.randperm(n).float() + 1
    png = tmp_path / "sub" / "protos.png"
    r = ek.prototypes(images, norms, labels, 3, str(png))
    idx = torch.tensor(r["indices"])
    assert r["png"] == str(png) and r["counts"] == counts
    im = torch.from_numpy(np.array(Image.open(png).convert("L")))  # (H, W)
    assert im.shape == (3 * (4 + 2) + 2, 20 * (4 + 2) + 2)  # save_image pads 2 px around every tile
    for c, n_c in enumerate(counts):
        members = (labels == c).nonzero().flatten()
        by_norm = members[norms[members].argsort(descending=True)].tolist()
        top, low = min(10, (n_c + 1) // 2), min(10, n_c - (n_c + 1) // 2)
        expected = by_norm[:top] + [-1] * (20 - top - low) + by_norm[n_c - low:]
        assert idx[c].tolist() == expected
        tiles = [im[2 + 6 * c + 1, 2 + 6 * j + 1].item() for j in range(20)]  # one pixel inside each tile
        assert tiles == [i + 1 if i >= 0 else 0 for i in expected]


def test_linear_probe_separable_and_uninformative_features():
    g = torch.Generator().manual_seed(0)
    centres = 6 * torch.randn(4, 16, generator=g)
    y_tr, y_te = torch.arange(400) % 4, torch.arange(200) % 4
    x_tr = centres[y_tr] + torch.randn(400, 16, generator=g)
    x_te = centres[y_te] + torch.randn(200, 16, generator=g)
    r = ek.linear_probe(x_tr, y_tr, x_te, y_te, epochs=30, lr=1e-2, batch_size=64)
    assert r["top1"] == 100.0 and r["train_top1"] == 100.0
    # Features that carry no label: chance level on the test set, whatever the probe memorizes.
    noise_tr, noise_te = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    labels_te = torch.randint(0, 4, (400,), generator=g)
    r = ek.linear_probe(noise_tr, y_tr, noise_te, labels_te, epochs=30, lr=1e-2, batch_size=64, seed=1)
    assert r["top1"] < 40 and r["train_top1"] > r["top1"]
    again = ek.linear_probe(noise_tr, y_tr, noise_te, labels_te, epochs=30, lr=1e-2, batch_size=64, seed=1)
    assert again == r  # deterministic given the seed


def per_class(norms, labels, num_classes=None):
    """The classes analysis as evaluate() runs it, on 1-D features whose norms are `norms`."""
    num_classes = num_classes or int(labels.max()) + 1
    return ek.class_frequency(ek.norm_summary(norms[:, None], labels, num_classes))


def test_per_class_norms_follow_frequency():
    counts, means = [50, 30, 20, 10, 5], [4.0, 3.0, 2.5, 2.0, 1.0]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    norms = torch.cat([torch.full((n,), m) for n, m in zip(counts, means)]) + 0.01 * torch.randn(len(labels))
    r = per_class(norms, labels, num_classes=6)  # class 5 has no image
    assert [c["count"] for c in r["classes"]] == counts + [0] and r["classes"][5]["mean_norm"] is None
    assert [c["mean_norm"] for c in r["classes"][:5]] == pytest.approx(means, abs=0.01)
    assert r["spearman"] == pytest.approx(1.0)
    assert per_class(5 - norms, labels)["spearman"] == pytest.approx(-1.0)  # the rarer the class, the larger
    balanced = per_class(norms[:40], torch.arange(40) % 4)
    assert balanced["spearman"] is None  # undefined, and the note says why instead of a nan
    assert balanced["note"] == ("no class frequency to correlate with: all 4 classes have 10 training images "
                                "(a balanced set)")


def test_draw_figures_only_with_matplotlib(tmp_path):
    norms, correct = rising_buckets()
    result = {"runs": {"a": [{"epoch": 1, "loss": 1.0, "emb_norm_mean": 2.0, "feat_norm_mean": 3.0, "knn_top1": None}]},
              "analyses": {"buckets": {"space": "loss", **buckets(norms, correct)},  # evaluate() adds the space
                           "novelty": {"space": "loss", **ek.novelty(norms, norms, {"x": norms / 2})},
                           "classes": {"space": "loss", **per_class(norms, torch.arange(len(norms)) % 3)}}}
    drawn = ex.draw_figures(result, str(tmp_path / "figs"))
    assert (drawn is not None) == HAS_MPL  # None: matplotlib is missing, nothing was written
    names = sorted(os.listdir(tmp_path / "figs")) if HAS_MPL else []
    assert names == (["buckets.png", "classes.png", "curves.png", "novelty.png"] if HAS_MPL else [])
    assert sorted(drawn or []) == [str(tmp_path / "figs" / n) for n in names]
    assert HAS_MPL or not (tmp_path / "figs").exists()


# ----------------------------------------------------------------------------- --compare on hand-written logs

def write_run(folder, lines):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return str(folder)


def test_compare_tables_and_resumed_epochs(tmp_path, capsys):
    line = dict(loss=5.0, emb_norm_mean=1.5, feat_norm_mean=9.0, knn_top1=None)
    a = write_run(tmp_path / "cut1", [{**line, "epoch": 1}, {**line, "epoch": 2, "knn_top1": 31.5},
                                      {**line, "epoch": 2, "knn_top1": 32.5}])  # epoch 2 logged again on resume
    b = write_run(tmp_path / "cut3", [{**line, "epoch": 1, "loss": 4.25, "knn_top1": 40.0}])
    result = ek.main(["--compare", a, os.path.join(b, "metrics.jsonl"), a])
    assert list(result["runs"]) == ["cut1", "cut3", "cut1 (2)"]
    assert [r["knn_top1"] for r in result["runs"]["cut1"]] == [None, 32.5]
    out = capsys.readouterr().out
    table = out.split("== cut3\n")[1].splitlines()[:2]
    assert table[1].split() == ["1", "4.2500", "1.5000", "9.0000", "40.0000"]
    assert len(table[0]) == len(table[1])  # columns line up under their headers
    assert "cut1 (2)" in out and "32.50" in out


@pytest.mark.parametrize("content, message", [
    (None, "has no metrics.jsonl"),  # a run folder that was never written
    ("", "is empty"),
    ('not json\n[1, 2]\n', "has no readable metrics line \\(2 damaged\\)"),  # one damaged line is skipped
])
def test_compare_bad_runs_are_one_sentence(tmp_path, content, message):
    if content is not None:
        write_run(tmp_path / "run", [])
        (tmp_path / "run" / "metrics.jsonl").write_text(content)
    with pytest.raises(safety.UsageError, match=message):
        ek.main(["--compare", str(tmp_path / "run")])
    (tmp_path / "other").mkdir()
    with pytest.raises(safety.UsageError, match="has no metrics.jsonl"):
        ek.main(["--compare", str(tmp_path / "other")])


def test_cli_without_checkpoint_or_with_unknown_analysis(tmp_path):
    with pytest.raises(safety.UsageError, match="give a checkpoint"):
        ek.main([])
    with pytest.raises(safety.UsageError, match="unknown analysis 'bukets'"):
        ek.main([str(tmp_path / "x.pt"), "--analyses", "buckets,bukets"])
    with pytest.raises(safety.UsageError, match="unknown space 'head'"):
        ek.main([str(tmp_path / "x.pt"), "--analyses", "probe:head"])


# ----------------------------------------------------------------------------- end to end on a tiny checkpoint

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyses") / "simclr"
    r = run_main(simclr.main, "--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--epochs", "1",
                 "--width", "16", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_all_analyses_on_a_checkpoint(run_dir, tmp_path):
    js, png = tmp_path / "all.json", tmp_path / "protos.png"
    r = run_main(ek.main, run_dir / "last.pt", "--all", "--json", js, "--prototypes-out", png,
                 "--device", "cpu", "--ood", "synthetic", "--heldout-classes", "0")
    assert r.returncode == 0, r.stderr
    for header in ("weighted 200-NN top-1", "norm vs k-NN accuracy", "novelty (backbone", "linear probe",
                   "norm per class", "Spearman(norm bin, accuracy)"):
        assert header in r.stdout
    res = json.load(open(js))
    a = res["analyses"]
    assert sorted(a) == ["buckets", "classes", "novelty", "probe", "prototypes"]
    assert all(v["space"] == "backbone" for v in a.values())
    bins = a["buckets"]["bins"]
    assert len(bins) == 20 and sum(b["count"] for b in bins) == 64 and bins[-1]["count"] >= 1
    assert all(b["accuracy"] is None or 0 <= b["accuracy"] <= 100 for b in bins)
    assert a["buckets"]["spearman"] is None or -1 <= a["buckets"]["spearman"] <= 1
    sets = a["novelty"]["sets"]
    assert list(sets) == ["train", "test", "vflip", "noise", "synthetic", "heldout"]
    assert sets["train"]["relative"] == pytest.approx(1.0) and sets["heldout"]["count"] == 16
    assert all(0 <= sets[k]["auroc"] <= 1 for k in ("vflip", "noise", "heldout"))
    # The run's own test images, loaded again as an "other" dataset, are not novel at all.
    assert sets["synthetic"]["auroc"] == 0.5
    assert sets["synthetic"]["mean_norm"] == pytest.approx(sets["test"]["mean_norm"], rel=1e-5)
    assert Image.open(png).size == (20 * 18 + 2, 4 * 18 + 2)  # 20 tiles of 16 px per row, 4 classes
    idx = torch.tensor(a["prototypes"]["indices"])
    assert idx.shape == (4, 20) and a["prototypes"]["png"] == str(png)
    for c in range(4):  # the synthetic set labels image i with class i % 4
        assert ((idx[c][idx[c] >= 0] % 4) == c).all() and (idx[c] >= 0).sum() == 16
    assert 0 <= a["probe"]["top1"] <= 100 and 0 <= a["probe"]["train_top1"] <= 100
    assert [c["count"] for c in a["classes"]["classes"]] == [16] * 4 and a["classes"]["spearman"] is None


def test_each_analysis_in_its_own_space(run_dir, tmp_path):
    js = tmp_path / "proj.json"
    r = run_main(ek.main, run_dir / "last.pt", "--space", "projector", "--analyses",
                 "buckets,classes:loss,probe:backbone", "--probe-epochs", "5", "--json", str(js), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.load(open(js))
    assert res["space"] == "projector" and "(projector features)" in r.stdout
    spaces = {k: v["space"] for k, v in res["analyses"].items()}
    assert spaces == {"buckets": "projector", "classes": "projector", "probe": "backbone"}  # SimCLR's loss: z


def test_compare_the_run_with_itself(run_dir, tmp_path):
    js, figs = tmp_path / "cmp.json", tmp_path / "figs"
    r = run_main(ek.main, "--compare", run_dir, run_dir, "--json", js, "--figures", figs)
    assert r.returncode == 0, r.stderr
    runs = json.load(open(js))["runs"]
    logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert runs == {"simclr": logged, "simclr (2)": logged}
    # Both runs have the same settings, so each legend label keeps its folder name.
    settings = "simclr cut 1 power 0 wd " + format(json.load(open(run_dir / "args.json"))["args"]["wd"], "g")
    assert json.load(open(js))["labels"] == {"simclr": f"{settings} [simclr]", "simclr (2)": f"{settings} [simclr (2)]"}
    assert f"== simclr  ({settings})\n" in r.stdout and f"== simclr (2)  ({settings})\n" in r.stdout
    assert f"figure: {figs / 'curves.png'}" in r.stdout if HAS_MPL else "figure:" not in r.stdout
    assert f"numbers: {js}" in r.stdout
    assert (figs / "curves.png").exists() == HAS_MPL
    assert HAS_MPL or "matplotlib is not installed" in r.stderr


def test_bad_input_exits_2_with_one_line(run_dir):
    r = run_main(ek.main, run_dir / "last.pt", "--ood", "mnist:/tmp", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith("error: --ood 'mnist:/tmp' names no dataset")
    assert r.stderr.strip().count("\n") == 0


def test_a_run_trained_without_some_classes(tmp_path):
    """--exclude-classes 3: training and k-NN never see class 3; eval_knn.py evaluates on the
    other classes and adds class 3's test images to novelty as the set 'unseen classes'."""
    out, js = tmp_path / "run", tmp_path / "r.json"
    r = run_main(simclr.main, "--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--epochs", "1",
                 "--width", "16", "--exclude-classes", "3", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "step=3 " in r.stdout  # 48 training images of classes 0-2, batch 16
    r = run_main(ek.main, out / "last.pt", "--analyses", "novelty,buckets", "--json", js, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.load(open(js))
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["knn_top1"]
    assert res["knn_top1"] == pytest.approx(logged)  # the same 48 test images as the training-time k-NN
    assert sum(b["count"] for b in res["analyses"]["buckets"]["bins"]) == 48
    assert [c["count"] for c in res["norms"]["train"]["per_class"]] == [16, 16, 16, 0]
    sets = res["analyses"]["novelty"]["sets"]
    assert list(sets) == ["train", "test", "unseen classes", "vflip", "noise"]
    assert (sets["test"]["count"], sets["unseen classes"]["count"]) == (48, 16)
    assert 0 <= sets["unseen classes"]["auroc"] <= 1
    r = run_main(ek.main, out / "last.pt", "--heldout-classes", "1", "--device", "cpu")
    assert r.returncode == 2 and "trained without classes 3" in r.stderr
