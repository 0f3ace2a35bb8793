"""benchmarks/plain_pipeline.py and benchmarks/ablation.py (issue 24) on tiny synthetic data."""
import importlib.util
import json
import math
import os

import pytest
import torch

from conftest import ROOT, run_script

TINY = ["--dataset", "synthetic", "--subset", "0", "--batch-size", "64", "--width", "8", "--proj-dim", "16",
        "--pred-dim", "8", "--warmup", "0"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lines(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]


def test_plain_pipeline_writes_a_metrics_line_the_readers_accept(tmp_path, capsys):
    plain = load("plain_pipeline")
    threads = torch.get_num_threads()
    try:
        plain.main(["--preset", "laptop", *TINY, "--epochs", "1", "--workers", "1", "--threads", "1",
                    "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows, damaged = plain.safety.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert damaged == [] and len(rows) == 1
    line = rows[0]
    assert line["epoch"] == 1 and -1 <= line["loss"] <= 1 and line["emb_norm_mean"] > 0
    assert 0 <= line["knn_top1"] <= 100 and line["epoch_seconds"] > 0 and line["images_per_second"] > 0
    assert f"wrote {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().out


def test_plain_pipeline_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    """Two runs of one seed give the same numbers; a run stopped after epoch 1 and resumed
    with --resume auto ends where the uninterrupted run ends."""
    plain = load("plain_pipeline")
    argv = [*TINY, "--epochs", "2", "--knn-every", "1", "--workers", "1", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        plain.main([*argv, "--out", str(tmp_path / "a")])
        loader = plain.loader

        def stop_in_epoch_2(dataset, args, epoch):
            if epoch == 1:
                raise KeyboardInterrupt
            return loader(dataset, args, epoch)

        monkeypatch.setattr(plain, "loader", stop_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            plain.main([*argv, "--out", str(tmp_path / "b")])
        assert [line["epoch"] for line in lines(tmp_path / "b")] == [1]
        monkeypatch.setattr(plain, "loader", loader)
        plain.main([*argv, "--out", str(tmp_path / "b"), "--resume", "auto"])
    finally:
        torch.set_num_threads(threads)
    a, b = lines(tmp_path / "a"), lines(tmp_path / "b")
    assert [line["epoch"] for line in b] == [1, 2]
    for x, y in zip(a, b):
        assert (x["loss"], x["emb_norm_mean"], x["knn_top1"]) == (y["loss"], y["emb_norm_mean"], y["knn_top1"])
        assert math.isfinite(x["loss"])


def test_plain_pipeline_refuses_other_flags_on_resume_and_a_used_folder(tmp_path):
    plain = load("plain_pipeline")
    argv = [*TINY, "--epochs", "1", "--workers", "0", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        plain.main([*argv, "--threads", "1"])
        with pytest.raises(plain.safety.UsageError, match="other values of --wd"):
            plain.main([*argv, "--threads", "1", "--wd", "0.01", "--resume", "auto"])
        with pytest.raises(plain.safety.UsageError, match="already holds a run; pass --resume auto"):
            plain.main([*argv, "--threads", "1"])  # a new run never overwrites one
    finally:
        torch.set_num_threads(threads)


def test_ablation_grid_writes_rows_skips_them_after_and_prints_the_table(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--rows", "baseline,plain-pipeline", "--seeds", "0", "--epochs", "1",
            "--workers", "1", "--extra", " ".join(TINY)]
    ablation = load("ablation")
    ablation.main(argv)  # the runs themselves are subprocesses, as a user's grid runs them
    rows = json.load(open(tmp_path / "laptop-ablation.json"))["rows"]
    assert [(row["name"], row["seed"]) for row in rows] == [("baseline", 0), ("plain-pipeline", 0)]
    for row in rows:
        assert 0 <= row["knn_top1"] <= 100 and row["emb_norm"] > 0 and row["epochs"] == 1
        assert row["command"].startswith("OMP_NUM_THREADS=1 python ") and "--preset laptop --seed 0" in row["command"]
        assert row["threads"] == 1 and row["torch"] == torch.__version__ and row["cpu"]
    assert "benchmarks/plain_pipeline.py --cut 3" in rows[1]["command"] and "--workers 1" in rows[1]["command"]
    assert ablation.main(argv)["rows"] == rows  # every row is in the json: nothing runs again
    capsys.readouterr()
    ablation.main(["--out", str(tmp_path), "--table"])
    table = capsys.readouterr().out
    assert "| baseline | none: the laptop recipe |" in table
    assert f"| plain-pipeline | torchvision PIL views in DataLoader workers | PIL views in DataLoader workers | 1 | " \
           f"{rows[1]['knn_top1']:.3g} |" in table


def test_ablation_names_an_unknown_row():
    r = run_script("benchmarks/ablation.py", "--rows", "baseline,nope", "--table")  # as a user types it
    assert r.returncode == 2 and "--rows nope: not in the grid" in r.stderr


def test_side_by_side_times_both_pipelines_on_the_same_threads(tmp_path, monkeypatch, capsys):
    out = tmp_path / "side.json"
    i = TINY.index("--pred-dim")
    tiny = TINY[:i] + TINY[i + 2:]  # flags simclr.py has too
    # SimCLR: plain_pipeline.py's SimSiam has the tests above. --extra=: argparse would read the value as a flag.
    # In-process: the two timed runs are processes of their own, as in the real benchmark.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # where `python benchmarks/...` finds laptop.py
    load("side_by_side").main(["--methods", "simclr", "--configs", "1:0", "--epochs", "3", "--timed", "2",
                               "--json", str(out), f"--extra={' '.join(tiny)}"])
    stdout = capsys.readouterr().out
    runs = json.load(open(out))["runs"]
    assert [(row["method"], row["threads"], row["plain_workers"]) for row in runs] == [("simclr", 1, 0)]
    (row,) = runs
    for kind in ("script", "plain"):
        (epochs,) = row[f"{kind}_epoch_seconds"]  # one repeat, two timed epochs; the third counted as the second
        assert len(epochs) == 2 and min(epochs) > 0
        assert row[f"{kind}_seconds"] == pytest.approx(sum(epochs) + epochs[1], abs=0.002)
    assert row["ratio"] == pytest.approx(row["plain_seconds"] / row["script_seconds"], rel=1e-2)
    assert "| simclr | 1 | 0 |" in stdout
