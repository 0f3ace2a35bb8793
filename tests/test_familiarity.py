"""benchmarks/familiarity.py (issue 29): the rep-k data sets, the verdict rule, and one tiny grid run."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import datasets
from conftest import ROOT
from test_data import write_idx

TINY = "--width 8 --proj-dim 16 --batch-size 16 --warmup 0"


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_source(folder, n_train=40, n_test=20):
    """Fashion-MNIST in its published on-disk format (gzipped idx), random and so all different images."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(3)
    for stem, a in {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
                    "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
                    "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
                    "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}.items():
        write_idx(os.path.join(folder, stem + ".gz"), a, gz=True)
    return str(folder)


def test_the_built_sets_hold_the_same_images_k_times_and_load_as_fashionmnist(tmp_path):
    fam = load("familiarity")
    source = datasets.load_dataset("fashionmnist", write_source(tmp_path / "src"))
    originals = {bytes(x.numpy()): i for i, x in enumerate(source.train_x[:30])}
    chosen = None
    for k in (1, 4, 16):
        folder = str(tmp_path / f"k{k}")
        info = fam.build_repeated(str(tmp_path / "src"), folder, 30, k, seed=0)
        chosen = chosen or info["repeated"]
        assert info["repeated"] == chosen and len(chosen) == 3  # 10 % of 30, the same images for every k
        d = datasets.load_dataset("fashionmnist", folder)  # the loader the method scripts use
        assert len(d.train_x) == info["train_images"] == 30 + (k - 1) * 3
        assert torch.equal(d.train_x[:30], source.train_x[:30]) and torch.equal(d.train_y[:30], source.train_y[:30])
        assert torch.equal(d.test_x, source.test_x[:30]) and torch.equal(d.test_y, source.test_y[:30])
        seen = np.bincount([originals[bytes(x.numpy())] for x in d.train_x], minlength=30)  # every image is one of them
        assert seen.tolist() == [k if i in chosen else 1 for i in range(30)]
        assert torch.equal(d.train_y, source.train_y[[originals[bytes(x.numpy())] for x in d.train_x]])
    stamp = os.stat(os.path.join(folder, "train-images-idx3-ubyte.gz")).st_mtime_ns
    assert fam.build_repeated(str(tmp_path / "src"), folder, 30, 16, seed=0)["repeated"] == chosen
    assert os.stat(os.path.join(folder, "train-images-idx3-ubyte.gz")).st_mtime_ns == stamp  # reused, not rebuilt
    assert fam.repeated_indices(30, 1).tolist() != chosen  # another seed, other images


def test_the_verdict_needs_every_seed_and_twice_the_std():
    fam = load("familiarity")
    assert fam.verdict({0: 0.10, 1: 0.12, 2: 0.11})[0] == "shown"
    assert fam.verdict({0: 0.10, 1: -0.01, 2: 0.30}) == ("not shown", "seed(s) 1 against the paper's direction")
    v, why = fam.verdict({0: 0.01, 1: 0.50, 2: 0.02})  # all in the direction, but the seeds disagree
    assert v == "not shown" and "within 2 x the seed std" in why
    assert fam.verdict({0: 0.10, 1: 0.12}) == ("not shown", "2 seed(s) so far; the rule needs 3")
    # Through the claims: frequency is rep-k16's relative norm minus rep-k1's, paired by seed.
    rows = [{"name": f"rep-k{k}", "seed": s, "commands": [f"k{k} s{s}"],
             "familiarity": {sp: {"relative": 1 + (k > 1) * (0.2 + 0.01 * s), "auroc": 0.5}
                             for sp in ("loss", "backbone")}}
            for k in (1, 16) for s in (0, 1, 2)]
    (frequency,) = [c for c in fam.claims(rows) if c["key"] == "frequency"]
    assert frequency["verdict"] == "shown" and frequency["evidence"]["per_seed"] == {"0": 0.2, "1": 0.21, "2": 0.22}
    assert frequency["commands"] == ["k1 s0", "k16 s0"]
    rows[-1]["familiarity"]["loss"]["relative"] = 0.9  # seed 2 repeated images end up smaller
    assert [c["verdict"] for c in fam.claims(rows) if c["key"] == "frequency"] == ["not shown"]


def test_the_readme_table_adds_the_first_claim_from_the_laptop_grid():
    fam = load("familiarity")
    names = ("simsiam-c1", "simsiam-c3", "simclr-c1", "simclr-wd5e-4")
    laptop = [{"name": n, "seed": s, "knn_top1": 50 + 5 * (n == "simsiam-c3") + s,
               "emb_norm": 3.0 - (n == "simclr-wd5e-4"), "norm_per_epoch": [1.0, 2.0 + s / 10]}
              for n in names for s in (0, 1, 2)]
    lines = fam.table({"claims": []}, {"rows": laptop}).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["shown", "shown", "shown", "not shown"]
    assert "(seeds 0: 1, 1: 1.1, 2: 1.2)" in lines[0]  # the norm grew from 1 to 2, 2.1 and 2.2: +100, +110, +120 %
    assert "(seeds 0: 0.333, 1: 0.333, 2: 0.333)" in lines[1]  # 3 at --wd 1e-6, 2 at --wd 5e-4: a third smaller
    assert "(seeds 0: 5, 1: 5, 2: 5)" in lines[2]
    assert "`python benchmarks/laptop.py --only simsiam-c1,simsiam-c3`" in lines[2]
    assert "0 seed(s) so far" in lines[3]  # no simclr-c3 rows
    # A claim not shown says at what scale the paper saw it; a shown one needs no such note.
    assert lines[3].endswith("the paper saw it with ResNet-50, CIFAR-100 and ImageNet-100, 100 epochs: 1-2 points "
                             "at SimCLR's default weight decay | `python benchmarks/laptop.py --only simclr-c1,simclr-c3` |")
    assert not any("the paper saw it" in line for line in lines[:3])


def test_one_tiny_run_writes_its_row_and_claims_and_is_not_run_again(tmp_path, capsys):
    fam = load("familiarity")
    argv = ["--out", str(tmp_path / "out"), "--only", "rep-k4", "--seeds", "0", "--images", "30", "--epochs", "1",
            "--data-dir", write_source(tmp_path / "src"), "--extra", TINY]
    threads = torch.get_num_threads()
    try:
        result = fam.main(argv)  # training and eval_knn run as subprocesses, as in the real grid
        (row,) = result["rows"]
        assert (row["name"], row["seed"], row["epochs"], row["threads"]) == ("rep-k4", 0, 1, 1)
        assert "--subset 0 --data-dir" in row["commands"][0] and "rep-k4-s0 --epochs 1" in row["commands"][0]
        assert row["commands"][1].endswith("--analyses buckets,novelty,classes --space loss --json "
                                           f"{tmp_path}/out/laptop/familiarity/rep-k4-s0/eval.json")
        assert row["data"]["train_images"] == 30 + 3 * 3 and set(row["familiarity"]) == {"loss", "backbone"}
        for space in row["familiarity"].values():
            assert space["relative"] > 0 and 0 <= space["auroc"] <= 1
        assert {"vflip", "noise"} <= set(row["novelty"]) and row["torch"] == torch.__version__
        assert [c["key"] for c in result["claims"]] == ["frequency", "novelty", "norm-accuracy", "gradscale",
                                                          "gradscale-step"]
        capsys.readouterr()
        again = fam.main(argv)  # the row is in the json: nothing trains
        assert again["rows"] == result["rows"] and "OMP_NUM_THREADS" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    stored = json.load(open(tmp_path / "out" / "laptop-familiarity.json"))
    assert stored["rows"] == result["rows"] and stored["claims"] == result["claims"]
    fam.main(["--out", str(tmp_path / "out"), "--table"])
    assert "| not shown | relative norm of the repeated images at k = 16" in capsys.readouterr().out


def test_the_figure_titles_each_claim_with_its_effect(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    fam = load("familiarity")
    data = {"images": 5000, "fraction": 0.1}
    rows = [{"name": f"rep-k{k}", "seed": s, "commands": [], "data": data,
             "familiarity": {sp: {"relative": 1 + (k > 1) * 0.02 * (s + 1), "auroc": 0.5} for sp in ("loss", "backbone")}}
            for k in (1, 4, 16) for s in (0, 1, 2)]
    rows += [{"name": "base", "seed": s, "commands": [],
              "novelty": {"unseen classes": {"auroc": 0.6 + s / 100}, "vflip": {"auroc": 0.7}}} for s in (0, 1, 2)]
    rows += [{"name": n, "seed": s, "commands": [], "knn_per_epoch": [50.0, 60.0, 62.0 + (n == "p1") * (s + 1)],
              "knn_top1": 62.0 + (n == "p1") * (s + 1)} for n in ("p1", "lr0.05", "lr0.08") for s in (0, 1)]
    saved = []
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append((fig, path)))
    assert fam.figure(rows, str(tmp_path / "f.png")) == str(tmp_path / "f.png")
    [(fig, path)] = saved
    left, middle, right = fig.axes
    # Frequency: k = 16 minus k = 1 is 0.02, 0.04, 0.06 over seeds 0-2.
    assert left.get_title() == "Frequency alone; 500 repeated of 5,000 images.\nRelative norm at k = 16 minus at " \
                               "k = 1,\nloss space: +0.04 ± 0.02 (3 seeds)"
    assert len(left.lines) == 3 * 2 + 1  # a line per seed and space, and the ratio 1
    # Novelty: the smaller AUROC is the unseen classes' 0.60, 0.61, 0.62.
    assert "base: +0.11 ± 0.01 (3 seeds)" in middle.get_title()
    assert [len(c.get_offsets()) for c in middle.collections] == [3, 3]
    assert right.get_title().endswith("p1 minus lr0.05: +1.5 ± 0.71 points (2 seeds)\np1 minus lr0.08: +1.5 ± 0.71 "
                                      "points (2 seeds)")
    assert len(right.lines) == 6 + 1  # a line per run, and the target accuracy


def test_the_readme_claims_table_is_the_one_the_results_give():
    """README's table between its markers is `familiarity.py --table` on the committed json files, to the byte."""
    fam = load("familiarity")
    results = os.path.join(ROOT, "results")
    made = fam.table(fam.load(os.path.join(results, "laptop-familiarity.json")),
                     fam.load(os.path.join(results, "laptop.json")))
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = readme.index("<!-- claims: python benchmarks/familiarity.py --table -->\n")
    shown = readme[readme.index("\n", start) + 1: readme.index("<!-- /claims -->")]
    assert shown == made + "\n"
