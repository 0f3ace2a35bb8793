"""simclr.py and eval_knn.py end to end on the CPU, on tiny data, in-process through safety.cli (as their
__main__ runs them; test_quickstart.py starts both as a user types them)."""
import json
import os

import pytest
import torch

from conftest import make_run, run_main

import eval_knn
import safety
import simclr

FASHION = "/usr/share/datasets/fashion-mnist"
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--device", "cpu", "--width", "16"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "simclr"
    r = run_main(simclr.main, *TINY, "--epochs", "2", "--knn-every", "1", "--save-every", "2",
                 "--cut", "3", "--power", "1", "--accum", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


def test_training_writes_metrics_and_checkpoints(trained):
    out, r = trained
    assert sorted(os.listdir(out)) == ["args.json", "epoch2.pt", "last.pt", "metrics.jsonl"]
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2] and [m["step"] for m in lines] == [4, 8]
    for m in lines:
        for key in ("loss", "lr", "emb_norm_mean", "emb_norm_std", "feat_norm_mean", "collapse_std",
                    "knn_top1", "epoch_seconds", "images_per_second"):
            assert isinstance(m[key], float), key
        assert 0 <= m["knn_top1"] <= 100 and m["emb_norm_mean"] > 0
    # --power 1 without --warmup or --lr takes the GradScale preset: the lr, a sixth of the
    # default 0.3, warms up linearly over 100 epochs of 4 steps: 0.05 * 16/256 * step/400.
    assert lines[1]["lr"] == pytest.approx(0.05 * 16 / 256 * 8 / 400)
    assert "GradScale preset: --warmup 100 --lr 0.05" in r.stderr
    # --accum 2: one warning that each micro-batch has the negatives of its own 8 images, not the batch's 16.
    assert r.stderr.count("warning: with --accum 2 each micro-batch of 8 images is its own contrastive batch, with "
                          "14 negatives per view instead of 30, while the lr is scaled for the full batch") == 1
    ckpt = safety.load_checkpoint(str(out / "last.pt"))
    assert ckpt["method"] == "simclr" and ckpt["epoch"] == 2 and ckpt["args"]["cut"] == 3.0
    assert "projector.2.weight" in ckpt["model"] and "state" in ckpt["optimizer"]
    assert "epoch=2" in r.stdout and "knn_top1=" in r.stdout


@pytest.mark.parametrize("size, jitter", [(32, (0.4, 0.4, 0.4, 0.1)), (64, (0.4, 0.4, 0.4, 0.1)),
                                          (96, (0.8, 0.8, 0.8, 0.2))])
def test_colour_jitter_strength_follows_the_image_size(size, jitter):
    # SimCLR paper, App. A: strength 0.5 in its CIFAR setting, 1.0 in its ImageNet one.
    assert [v.jitter for v in simclr.make_views(make_run(simclr.Args(), n=1, size=size))] == [jitter] * 2


def test_eval_knn_reads_the_checkpoint(trained, tmp_path):
    out, _ = trained
    r = run_main(eval_knn.main, out / "last.pt", "--device", "cpu", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert "weighted 200-NN top-1 = " in r.stdout
    result = json.load(open(tmp_path / "r.json"))
    assert 0 <= result["knn_top1"] <= 100 and result["method"] == "simclr"
    assert len(result["norms"]["train"]["per_class"]) == 4
    # The number matches the one logged at the end of training (same features, same protocol).
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]["knn_top1"]
    assert result["knn_top1"] == pytest.approx(logged)
    r = run_main(eval_knn.main, out / "last.pt", "--device", "cpu", "--space", "projector", "--k", "5")
    assert r.returncode == 0 and "(projector features)" in r.stdout


def test_cut_init_is_in_the_trained_model(trained):
    # The checkpoint's args rebuild a cut network: same parameter shapes, initial weights 3x smaller.
    from eval_knn import load_model
    out, _ = trained
    model, ckpt = load_model(str(out / "last.pt"))
    assert ckpt["args"]["power"] == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k])


def test_missing_data_is_one_sentence_and_creates_nothing(tmp_path):
    out = tmp_path / "never"
    r = run_main(simclr.main, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(out), "--no-download")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: cifar10 file data_batch_1 not found")
    assert not out.exists()


def test_existing_output_folder_is_not_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    r = run_main(simclr.main, *TINY, "--epochs", "1", "--out", tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "keep me"


def test_eval_knn_refuses_a_broken_checkpoint(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"\x00" * 100)
    r = run_main(eval_knn.main, tmp_path / "last.pt")
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr and "Traceback" not in r.stderr
