"""Faults handled by construction (issue 30): one test per kind of fault, each through the one error boundary
(safety.cli) that every script enters by, with its inputs built here in their real on-disk formats. Each checks the
exit status, the stderr line that names the cause, and that nothing that existed before was changed.
(Outputs that cannot be written, in eval_knn.py and simulate.py, are tests/test_outputs.py's.)"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasets
import eval_knn
import safety
import simclr
from conftest import ROOT, run_main
from test_bad_input import snapshot
from test_data import save_jpeg, write_fashion, write_idx

TINY = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--device", "cpu", "--width", "8",
        "--epochs", "1", "--warmup", "0", "--knn-every", "0", "--save-every", "0"]


def through_cli(main, capsys):
    """(exit status, stderr lines) of main() run through the boundary, as `python <script>` runs it."""
    with pytest.raises(SystemExit) as e:
        safety.cli(main)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def script(*argv, env=None, cwd=ROOT):
    """A script in a subprocess that may not block: a FIFO read would hang, and the timeout ends the test."""
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch SimCLR run folder."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    safety.cli(lambda: simclr.main([*TINY, "--out", str(folder)]))  # which releases the folder's lock
    return folder


# ----------------------------------------------------------------------------- resources

@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 4398046511104 bytes."),
    MemoryError()], ids=["cuda", "cpu", "python"])
def test_running_out_of_memory_names_the_sizing_flags_and_removes_the_new_folder(tmp_path, monkeypatch, capsys,
                                                                                  trained, error):
    def allocate(*_):
        raise error
    monkeypatch.setattr(simclr, "build_model", allocate)  # where a too-wide --proj-dim would fail
    (tmp_path / "keep.txt").write_text("results\n")
    before, saved = snapshot(tmp_path), snapshot(trained)
    code, err = through_cli(lambda: simclr.main([*TINY, "--proj-dim", "4096", "--out", str(tmp_path / "run")]),
                            capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: out of memory (")
    assert "--batch-size 16, --accum 1, --arch resnet18, --width 8, --proj-dim 4096" in err[0]
    assert snapshot(tmp_path) == before  # the folder this run made, with only args.json in it, is gone
    # A resumed run's folder holds a checkpoint: it stays as it was.
    code, err = through_cli(lambda: simclr.main(["--resume", "auto", "--out", str(trained), "--epochs", "2"]), capsys)
    assert code == 1 and err[-1].startswith("error: out of memory (") and snapshot(trained) == saved


# ----------------------------------------------------------------------------- paths that are not regular files

def test_a_fifo_or_a_folder_where_a_file_goes_is_refused_without_blocking(tmp_path, trained):
    fifo = tmp_path / "last.pt"
    os.mkfifo(fifo)
    r = script("eval_knn.py", str(fifo))  # torch.load would wait for a writer forever
    assert r.returncode == 2
    assert r.stderr.decode().strip() == f"error: checkpoint {fifo} is a FIFO (named pipe), not a file"
    (tmp_path / "run" / "last.pt").mkdir(parents=True)
    r = run_main(simclr.main, "--resume", "auto", "--out", tmp_path / "run")  # a folder cannot block: in-process
    assert r.returncode == 2 and r.stderr.strip() == f"error: checkpoint {tmp_path}/run/last.pt is a folder, not a file"
    data = tmp_path / "fashion"
    write_fashion(data, n=8)
    os.remove(data / "t10k-images-idx3-ubyte.gz")
    os.mkfifo(data / "t10k-images-idx3-ubyte.gz")
    before = sorted(os.listdir(data))
    r = script("simclr.py", "--dataset", "fashionmnist", "--data-dir", str(data), "--out", str(tmp_path / "new"))
    assert r.returncode == 2 and r.stderr.decode().strip().endswith("t10k-images-idx3-ubyte.gz is a FIFO (named pipe), "
                                                                   "not a file")
    assert sorted(os.listdir(tmp_path)) == ["fashion", "last.pt", "run"] and sorted(os.listdir(data)) == before


def test_a_link_loop_in_an_image_folder_counts_each_image_once(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(2):
                save_jpeg(str(tmp_path / split / c / f"{i}.jpg"), (40 * i, 90, 200), (20, 20))
    os.symlink("..", tmp_path / "train" / "a" / "loop")  # train/a/loop/a/loop/... : os.walk follows it
    d = datasets.load_dataset("imagenet100", str(tmp_path))
    assert len(d.train_x) == 4 and d.train_y.tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- values read from a checkpoint

@pytest.mark.parametrize("field, value, says", [
    ("lr", -0.1, "--lr must be positive (got -0.1)"),
    ("seed", -3, "--seed must be in [0, 2^31) (got -3)"),
    ("batch_size", 0, "--batch-size must be at least 2"),
    ("exclude_classes", "5;6", "--exclude-classes '5;6' must be class numbers separated by commas"),
    ("momentum_buffer", "shape", "its momentum_buffer for a parameter of shape (8, 3, 3, 3) is of shape (3,)"),
    ("momentum_buffer", "nan", "is a tensor holding NaN or infinity"),
    ("model", "nan", "holds NaN or infinite weights (its run diverged); use an earlier checkpoint"),
])
def test_a_checkpoints_values_meet_the_rules_of_typed_flags(tmp_path, capsys, trained, field, value, says):
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    first = next(iter(ckpt["model"]))
    if field == "momentum_buffer":
        state = ckpt["optimizer"]["state"][0][field]
        ckpt["optimizer"]["state"][0][field] = torch.zeros(3) if value == "shape" else state * float("nan")
    elif field == "model":
        ckpt["model"][first] = ckpt["model"][first] * float("nan")
    else:
        ckpt["args"][field] = value
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save(ckpt, folder / "last.pt")
    before = snapshot(tmp_path)
    code, err = through_cli(lambda: simclr.main(["--resume", "auto", "--out", str(folder), "--epochs", "2"]), capsys)
    assert code == 2 and err[:-1] in ([], ["resuming with --epochs 2 (was 1)"]), err
    assert says in err[-1] and str(folder / "last.pt") in err[-1], err
    assert snapshot(tmp_path) == before
    if field in ("lr", "seed", "exclude_classes"):  # eval_knn.py reads the flags through the same rules
        with pytest.raises(safety.UsageError, match="holds a flag value the command line refuses"):
            eval_knn.load_model(str(folder / "last.pt"))


# ----------------------------------------------------------------------------- environment

def test_torchrun_variables_that_torchrun_did_not_set_are_one_sentence(tmp_path, monkeypatch):
    # In a subprocess where a process group could be joined, and wait: the timeout ends the test.
    r = script("simclr.py", *TINY, "--out", str(tmp_path / "run"),
               env={"RANK": "0", "WORLD_SIZE": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"})
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and err.startswith("error: RANK is set") and "unset RANK" in err, err
    assert os.listdir(tmp_path) == []
    # With no valid WORLD_SIZE no group can be joined, whatever else is set: in-process.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "abc")
    r = run_main(simclr.main, *TINY, "--out", tmp_path / "run")
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error: RANK is set") and "unset RANK" in err, err
    assert os.listdir(tmp_path) == []


def test_a_path_that_is_not_utf8_is_printed_escaped_on_a_strict_stdout(tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"run-\xff")
    r = script(b"simclr.py", *TINY, b"--out", folder, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert r.returncode == 0, r.stderr
    assert b"run-\\udcff" in r.stdout and os.path.exists(os.path.join(folder, b"last.pt"))


def test_an_idx_file_with_no_images_is_one_sentence(tmp_path):
    write_fashion(tmp_path, n=8)
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), np.zeros((0, 28, 28)), gz=True)  # a valid header, N = 0
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(0), gz=True)
    r = run_main(simclr.main, "--dataset", "fashionmnist", "--data-dir", tmp_path, "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.strip() == (f"error: fashionmnist in {tmp_path} has no training images; "
                                                      "check --data-dir and the folder layout")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- messages that name the cause

def test_a_divergence_from_a_tiny_cut_names_cut_not_lr(tmp_path, capsys):
    code, err = through_cli(lambda: simclr.main([*TINY, "--cut", "1e-20", "--out", str(tmp_path / "run")]), capsys)
    assert code == 1 and err[-1].startswith("error: the loss became nan at epoch 1")
    assert "--cut 1e-20 multiplies every initial weight by 1e+20; use a --cut of 1 or more" in err[-1]
    assert "--lr" not in err[-1] and os.listdir(tmp_path) == []  # no checkpoint: its folder is gone


def test_eval_knn_names_its_own_flag_for_missing_data(tmp_path, trained, capsys):
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    ckpt["args"].update(dataset="cifar10", data_dir=str(tmp_path / "nothing"))
    torch.save(ckpt, tmp_path / "last.pt")
    code, err = through_cli(lambda: eval_knn.main([str(tmp_path / "last.pt")]), capsys)
    assert code == 2 and err[-1].startswith("error: cifar10 file data_batch_1 not found in ")
    assert "--download" not in err[-1].replace("--no-download", "") and "--data-dir" in err[-1]
