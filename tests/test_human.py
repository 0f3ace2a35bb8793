"""The human-confidence analysis of eval_knn.py (paper Fig. 4, middle and right): the
CIFAR-N and CIFAR-10H files in their published formats, built here in miniature; the
loader's (eval_extras.py) refusal of anything but integer label arrays; the bucketing and
the entropy against hand computations; and the command line's one-sentence refusals. A
CIFAR checkpoint cannot be trained here, so the analysis runs on hand-made norms and labels."""
import dataclasses
import io
import math
import os
import zipfile

import numpy as np
import pytest
import torch

import safety
import eval_extras as ex
import eval_knn as ek


def write_cifar10n(folder, clean, aggre=None, **extra):
    """CIFAR-10_human.pt as published: torch.save of a dict of int64 numpy arrays."""
    clean = np.asarray(clean, dtype=np.int64)
    labels = {"clean_label": clean, "aggre_label": np.asarray(clean if aggre is None else aggre, dtype=np.int64),
              "worse_label": clean.copy(), "random_label1": clean.copy(), "random_label2": clean.copy(),
              "random_label3": clean.copy(), **extra}
    path = os.path.join(folder, "CIFAR-10_human.pt")
    torch.save(labels, path)
    return path


def write_cifar10h(folder, probs):
    path = os.path.join(folder, "cifar10h-probs.npy")
    np.save(path, np.asarray(probs, dtype=np.float64))
    return path


def one_hot_probs(labels, num_classes=10):
    return np.eye(num_classes)[np.asarray(labels)]


# ----------------------------------------------------------------------------- the loader

def test_loader_reads_both_published_formats(tmp_path):
    clean = np.arange(30) % 10
    path = write_cifar10n(tmp_path, clean, (clean + 1) % 10)
    d = ex.load_human_labels(path)
    assert sorted(d) == sorted(["clean_label", "aggre_label", "worse_label", "random_label1", "random_label2",
                                "random_label3"])
    assert d["clean_label"].dtype == np.int64 and (d["aggre_label"] == (clean + 1) % 10).all()
    # CIFAR-100N: two arrays and two plain lists of coarse labels.
    fine = np.arange(40, dtype=np.int64) % 100
    torch.save({"clean_label": fine, "noisy_label": fine[::-1].copy(), "clean_coarse_label": [1, 2],
                "noisy_coarse_label": [3, 4]}, tmp_path / "CIFAR-100_human.pt")
    d = ex.load_human_labels(str(tmp_path / "CIFAR-100_human.pt"))
    assert (d["noisy_label"] == fine[::-1]).all() and d["noisy_coarse_label"] == [3, 4]


def test_loader_reads_files_pickled_under_numpy_1(tmp_path):
    """The published files name numpy 1's module, numpy.core.multiarray; rewrite a file
    saved here (numpy 2 writes numpy._core) to carry that name."""
    buf = io.BytesIO()
    torch.save({"clean_label": np.arange(5, dtype=np.int64)}, buf)
    src, path = zipfile.ZipFile(io.BytesIO(buf.getvalue())), tmp_path / "old.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info.filename, data)
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert ex.load_human_labels(str(path))["clean_label"].tolist() == [0, 1, 2, 3, 4]


class Payload:
    """Unpickling this runs a shell command that creates a file, as a crafted .pt could."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loader_refuses_any_other_global_and_runs_nothing(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"clean_label": np.zeros(3, dtype=np.int64), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(safety.UsageError, match=r"other than integer label arrays \((posix|os|nt)\.system\)"):
        ex.load_human_labels(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    # Other numpy types stay refused too: only int64 arrays can be rebuilt.
    torch.save({"clean_label": np.zeros(3)}, tmp_path / "float.pt")
    with pytest.raises(safety.UsageError, match="Float64DType"):
        ex.load_human_labels(str(tmp_path / "float.pt"))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "evil.pt").read_bytes()[:100])
    with pytest.raises(safety.UsageError, match="not a readable torch file"):
        ex.load_human_labels(str(tmp_path / "cut.pt"))
    torch.save([np.zeros(3, dtype=np.int64)], tmp_path / "list.pt")
    with pytest.raises(safety.UsageError, match="holds a list, not the dict"):
        ex.load_human_labels(str(tmp_path / "list.pt"))


@pytest.mark.parametrize("value, message", [
    (None, "has NoneType"),
    (np.zeros(5, dtype=np.int64), "of shape \\(5,\\)"),  # wrong length
    (np.zeros(6), "float64 array"),
    (np.zeros((6, 1), dtype=np.int64), "of shape \\(6, 1\\)"),
])
def test_label_arrays_are_checked(value, message):
    with pytest.raises(safety.UsageError, match=message):
        ex.label_array({"clean_label": value}, "clean_label", "f.pt", 6)
    good = ex.label_array({"clean_label": np.arange(6, dtype=np.int64)}, "clean_label", "f.pt", 6)
    assert good.dtype == torch.int64 and good.tolist() == list(range(6))


def test_cifar10h_file_is_checked(tmp_path):
    probs = one_hot_probs(np.arange(8) % 10)
    assert torch.equal(ex.load_human_probs(write_cifar10h(tmp_path, probs), 8), torch.from_numpy(probs))
    for bad, message in [(probs[:7], "should hold 8 x 10 floats"), (probs[:, :9], "should hold 8 x 10"),
                         (probs * 0.5, "not probability distributions"), (-probs, "not probability")]:
        with pytest.raises(safety.UsageError, match=message):
            ex.load_human_probs(write_cifar10h(tmp_path, bad), 8)
    np.save(tmp_path / "cifar10h-probs.npy", np.array([{"a": 1}], dtype=object))  # a pickled object array
    with pytest.raises(safety.UsageError, match="not a plain .npy array"):
        ex.load_human_probs(str(tmp_path / "cifar10h-probs.npy"), 8)


# ----------------------------------------------------------------------------- the numbers

def test_agreement_buckets_by_hand():
    # Max norm 10, 4 bins of width 2.5: bins hold norms [0, 2.5), [2.5, 5), [5, 7.5), [7.5, 10].
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.5, 6.0, 9.0, 9.5, 10.0])
    clean = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])
    human = torch.tensor([9, 1, 2, 0, 4, 5, 6, 7, 8])  # wrong on images 0 and 3
    r = ek.human_agreement(norms, human, clean, bins=4, min_count=2)
    assert [b["count"] for b in r["bins"]] == [2, 3, 1, 3]
    assert [b["fraction_correct"] for b in r["bins"]] == [0.5, pytest.approx(2 / 3), None, 1.0]  # 1 < min_count
    assert [(b["lo"], b["hi"]) for b in r["bins"]] == [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert r["fraction_correct"] == pytest.approx(7 / 9) and r["images"] == 9 and r["min_count"] == 2
    assert r["spearman"] == pytest.approx(1.0)  # 0.5 < 2/3 < 1 over the kept bins 0, 1, 3
    assert r["spearman_images"] == pytest.approx(ek.spearman(norms, (human == clean).double()))
    # The paper's protocol: 20 bins of width 0.05, bins of < 50 images left out.
    big = ek.human_agreement((torch.arange(1000) + 0.5) / 1000, torch.zeros(1000), torch.zeros(1000))
    assert len(big["bins"]) == 20 and big["min_count"] == 50 and big["bins"][0]["count"] == 50
    assert big["spearman"] is None and "all 20 fractions correct are equal (1)" in big["note"]


def test_entropy_closed_forms():
    probs = torch.tensor([[0.1] * 10, [1.0] + [0.0] * 9, [0.5, 0.25, 0.25] + [0.0] * 7, [0.3, 0.7] + [0.0] * 8],
                         dtype=torch.float64)
    r = ek.human_entropy(torch.tensor([0.5, 1.5, 2.5, 3.5]), probs, bins=4, min_count=1)  # one image per bin
    binary = -(0.3 * math.log2(0.3) + 0.7 * math.log2(0.7))
    assert [b["mean_entropy"] for b in r["bins"]] == pytest.approx([math.log2(10), 0.0, 1.5, binary], abs=1e-12)
    # CIFAR-10H counts -> probs: 50 raters split 25/25 is exactly one bit.
    one = ek.human_entropy(torch.ones(1), torch.tensor([[25, 25, 0]]) / 50.0, bins=1, min_count=1)
    assert one["mean_entropy"] == pytest.approx(1.0)


def test_entropy_falls_with_the_norm():
    # Bin b of 5 holds 12 images whose labels split over 5 - b classes evenly: log2(5 - b) bits.
    norms, probs = [], []
    for b in range(5):
        k = 5 - b
        norms += [(b + 0.5) / 5] * 12
        probs += [[1 / k] * k + [0.0] * (10 - k)] * 12
    r = ek.human_entropy(torch.tensor(norms), torch.tensor(probs), bins=5)
    assert r["min_count"] == 10 and [b["count"] for b in r["bins"]] == [12] * 5
    assert [b["mean_entropy"] for b in r["bins"]] == pytest.approx([math.log2(5 - b) for b in range(5)])
    assert r["spearman"] == pytest.approx(-1.0) and r["mean_entropy"] == pytest.approx(
        sum(math.log2(k) for k in range(1, 6)) / 5)


def test_human_confidence_reads_checks_and_bins(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_train, n_test = 1000, 200  # 100 train images per bin of 10: over CIFAR-N's minimum of 50
    train_y, test_y = torch.randint(0, 10, (n_train,), generator=g), torch.randint(0, 10, (n_test,), generator=g)
    train_norms = torch.rand(n_train, generator=g) + 0.01
    aggre = torch.where(train_norms < 0.3, (train_y + 1) % 10, train_y)  # humans wrong on small norms only
    write_cifar10n(tmp_path, train_y.numpy(), aggre.numpy())
    test_norms = torch.rand(n_test, generator=g) + 0.01
    probs = torch.from_numpy(one_hot_probs(test_y.numpy()))
    probs[test_norms < 0.5] = 0.5 * probs[test_norms < 0.5] + 0.05  # half the mass spread: 0.5 + 9 x 0.05
    write_cifar10h(tmp_path, probs.numpy())
    r = ek.human_confidence("cifar10", str(tmp_path), train_norms, train_y, test_norms, test_y, bins=10)
    assert r["labels"]["human_label"] == "aggre_label" and r["labels"]["images"] == n_train
    assert r["labels"]["fraction_correct"] == pytest.approx((train_norms >= 0.3).double().mean().item())
    assert r["labels"]["spearman"] > 0.5 and r["entropy"]["spearman"] < -0.5
    assert r["entropy"]["bins"][-1]["mean_entropy"] == pytest.approx(0.0, abs=1e-12)
    # The clean labels must be the run's training labels, in order; 10H must be in test order.
    with pytest.raises(safety.UsageError, match="not the cifar10 training labels in order"):
        ek.human_confidence("cifar10", str(tmp_path), train_norms, train_y.flip(0), test_norms, test_y)
    with pytest.raises(safety.UsageError, match="not in CIFAR-10 test order"):
        ek.human_confidence("cifar10", str(tmp_path), train_norms, train_y, test_norms, (test_y + 1) % 10)
    write_cifar10n(tmp_path, train_y.numpy(), np.where(aggre.numpy() == 3, -1, aggre.numpy()))  # a damaged file
    with pytest.raises(safety.UsageError, match="'aggre_label' in .* has labels of no cifar10 class; download it"):
        ek.human_confidence("cifar10", str(tmp_path), train_norms, train_y, test_norms, test_y)
    with pytest.raises(safety.UsageError, match=f"should hold 'clean_label', {n_train + 1} integer labels"):
        ek.human_confidence("cifar10", str(tmp_path), torch.rand(n_train + 1), torch.zeros(n_train + 1), test_norms,
                            test_y)


def test_missing_files_say_what_to_fetch_and_where_to_put_it(tmp_path):
    with pytest.raises(safety.UsageError) as e:
        ex.human_paths("cifar10", str(tmp_path))
    text = str(e.value)
    assert text.startswith("CIFAR-10_human.pt not found in") and "github.com/UCSC-REAL/cifar-10-100n" in text
    assert "data/ folder" in text and f"into {tmp_path}" in text and "--human-dir" in text
    write_cifar10n(tmp_path, np.zeros(4))
    with pytest.raises(safety.UsageError, match=r"^cifar10h-probs.npy not found .*github.com/jcpeterson/cifar-10h"):
        ex.human_paths("cifar10", str(tmp_path))
    with pytest.raises(safety.UsageError, match=r"^CIFAR-100_human.pt not found"):
        ex.human_paths("cifar100", str(tmp_path))
    torch.save({}, tmp_path / "CIFAR-100_human.pt")
    assert ex.human_paths("cifar100", str(tmp_path)) == [str(tmp_path / "CIFAR-100_human.pt")]  # no CIFAR-100H


# ----------------------------------------------------------------------------- the command line

def tiny_checkpoint(path, **flags):
    """A SimCLR checkpoint as simclr.py writes one, for an untrained ResNet-18 on 16 px
    images: enough for eval_knn.py to get as far as its checks of the run."""
    import simclr
    args = simclr.Args(device="cpu", **flags)
    model = simclr.build_model(args, 16)
    torch.save({"format": safety.FORMAT, "method": "simclr", "args": dataclasses.asdict(args), "epoch": 1,
                "model": model.state_dict(), "data_stats": [[0.5] * 3, [0.25] * 3], "num_classes": 10,
                "img_size": 16}, path)
    return str(path)


def test_cli_refuses_runs_the_human_labels_do_not_fit(tmp_path):
    synthetic = tiny_checkpoint(tmp_path / "synthetic.pt", dataset="synthetic")
    with pytest.raises(safety.UsageError, match="needs a cifar10 or cifar100 run .* trained on synthetic"):
        ek.main([synthetic, "--analyses", "human", "--device", "cpu"])
    lt = tiny_checkpoint(tmp_path / "lt.pt", dataset="cifar10-lt")
    with pytest.raises(safety.UsageError, match="trained on cifar10-lt"):
        ek.main([lt, "--analyses", "human", "--device", "cpu"])
    subset = tiny_checkpoint(tmp_path / "subset.pt", dataset="cifar10", subset=64)
    with pytest.raises(safety.UsageError, match="full cifar10 training set .* --subset 64"):
        ek.main([subset, "--analyses", "human", "--device", "cpu"])
    excluded = tiny_checkpoint(tmp_path / "excl.pt", dataset="cifar100", exclude_classes="3")
    with pytest.raises(safety.UsageError, match="--exclude-classes"):
        ek.main([excluded, "--analyses", "human", "--device", "cpu"])


def test_cli_names_the_missing_file_in_one_line(tmp_path, capsys):
    """A full CIFAR-100 run: the missing file is reported before the dataset (absent here
    too) is loaded, as one line on stderr with exit status 2 (safety.cli, as the script runs)."""
    ckpt = tiny_checkpoint(tmp_path / "c100.pt", dataset="cifar100", data_dir=str(tmp_path / "nodata"))
    argv = [ckpt, "--analyses", "human:loss", "--human-dir", str(tmp_path / "labels"), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        safety.cli(lambda: ek.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: CIFAR-100_human.pt not found in {tmp_path / 'labels'}; download it from "
                          "github.com/UCSC-REAL/cifar-10-100n")
    with pytest.raises(safety.UsageError, match="classes, human$"):  # listed among the analyses
        ek.main([ckpt, "--analyses", "humans"])
