"""Long runs survive: kill-and-resume equivalence, safe checkpoint writes, bad input."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import safety
import eval_knn
import simclr
from conftest import ROOT, run_main, run_script

TINY = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--device", "cpu", "--width", "16",
        "--knn-every", "2", "--save-every", "0"]
# Each method with the extra flags that keep it tiny on a CPU.
# Small heads: the papers' 2048- and 4096-wide MLPs would make these CPU tests slow.
METHODS = {
    "simclr": ["simclr.py"],  # its kill-and-resume is test_bad_input.py's SIGTERM test
    "simsiam": ["simsiam.py", "--proj-dim", "64", "--pred-dim", "16"],
    "byol": ["byol.py", "--hidden-dim", "64", "--proj-dim", "16"],
    "moco-v2": ["moco.py", "--version", "v2", "--queue", "32"],
    "moco-v3": ["moco.py", "--version", "v3", "--arch", "vit_tiny", "--mlp-dim", "64", "--proj-dim", "16"],
}
TIMING = {"epoch_seconds", "images_per_second"}


def available(name):
    return os.path.exists(os.path.join(ROOT, METHODS[name][0]))


def metrics(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(folder / "metrics.jsonl")]


def kill_after_epoch(argv, folder, epoch, timeout=600, env=None):
    """Start a run and SIGKILL it as soon as last.pt holds `epoch`."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()}")
        last = folder / "last.pt"
        if last.exists() and safety.load_checkpoint(str(last))["epoch"] >= epoch:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return safety.load_checkpoint(str(last))["epoch"]
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for the checkpoint")


@pytest.mark.parametrize("name", [m for m in METHODS if m != "simclr"])
def test_kill_and_resume_is_bitwise_identical(name, tmp_path):
    if not available(name):
        pytest.skip(f"{METHODS[name][0]} not present")
    script = METHODS[name]
    whole, part = tmp_path / "whole", tmp_path / "part"
    # One thread in all three runs, so that their sums run in the same order; the
    # uninterrupted run goes alongside the one that is killed, on the other core.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    uninterrupted = subprocess.Popen([sys.executable, *script, *TINY, "--epochs", "3", "--out", str(whole)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    killed_at = kill_after_epoch([*script, *TINY, "--epochs", "3", "--out", str(part)], part, 1, env=env)
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read().decode()
    assert killed_at < 3, "the run finished before the kill; the test proves nothing"
    module = importlib.import_module(script[0][:-3])  # the resumed run in-process, on the same one thread
    r = run_main(module.main, *script[1:], "--resume", part / "last.pt", threads=1)
    assert r.returncode == 0, r.stderr
    a, b = safety.load_checkpoint(str(whole / "last.pt")), safety.load_checkpoint(str(part / "last.pt"))
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model"].items():  # parameters and buffers: EMA targets, queues, BN statistics
        assert torch.equal(v, b["model"][k]), k
    assert metrics(whole) == metrics(part)


def test_resume_auto_and_more_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    simclr.main([*TINY, "--epochs", "1", "--out", str(out)])  # in-process: the subprocess path is tested above
    capsys.readouterr()
    simclr.main(["--resume", "auto", "--out", str(out), "--epochs", "2"])
    captured = capsys.readouterr()
    assert "resuming with --epochs 2 (was 1)" in captured.err and "| resuming from epoch 1" in captured.out
    assert [m["epoch"] for m in metrics(out)] == [1, 2]


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    safety.save_atomic({"format": safety.FORMAT, "epoch": 1}, path)

    def dies_halfway(obj, fh):
        fh.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # a kill arriving in the middle of torch.save

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        safety.save_atomic({"format": safety.FORMAT, "epoch": 2}, path)
    monkeypatch.undo()
    assert safety.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]
    # A temporary file left by a SIGKILL (which no finally block survives) does not matter either.
    (tmp_path / "last.pt.tmp999").write_bytes(b"PK\x03\x04 garbage")
    assert safety.load_checkpoint(path)["epoch"] == 1


def evil_checkpoint(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(path) + ".pwned",))
    torch.save({"format": safety.FORMAT, "method": "simclr", "x": Evil()}, str(path))


def test_pickled_code_is_refused_by_resume_and_eval(tmp_path):
    path = tmp_path / "last.pt"
    evil_checkpoint(path)
    for main, argv in ((simclr.main, ["--resume", path]), (eval_knn.main, [path])):
        r = run_main(main, *argv)
        assert r.returncode == 2 and "pickled code" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(str(path) + ".pwned")


def bad_inputs(tmp_path):
    """(argv, expected message) for each kind of bad input."""
    run = tmp_path / "good"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    truncated = tmp_path / "truncated.pt"
    data = (run / "last.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        (fashion / f"{name}-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    return [
        (["simclr.py", "--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["simclr.py", "--optimizer", "lamb"], "invalid choice: 'lamb'"),
        (["simclr.py", "--dataset", "cifar100", "--data-dir", str(tmp_path / "none"), "--no-download"],
         "not found in"),
        (["simclr.py", "--dataset", "fashionmnist", "--data-dir", str(fashion)], "not a valid idx file"),
        (["simclr.py", *TINY, "--cut", "0"], "--cut must be positive"),
        (["simclr.py", *TINY, "--cut", "-3"], "--cut must be positive"),
        (["simclr.py", *TINY, "--batch-size", "64"], "larger than the 32 training images"),
        (["simclr.py", *TINY, "--batch-size", "16", "--accum", "3"], "multiple of --accum"),
        (["simclr.py", *TINY, "--epochs", "-2"], "--epochs must be >= 0"),
        (["simclr.py", *TINY, "--lr", "-1"], "--lr must be positive"),
        (["simclr.py", *TINY, "--wd=-1e-4"], "--wd must be >= 0"),
        (["simclr.py", *TINY, "--exclude-classes", "cats"], "must be class numbers separated by commas"),
        (["simclr.py", *TINY, "--exclude-classes", "2,9"], "--exclude-classes 9 is not a class of synthetic"),
        (["simclr.py", *TINY, "--exclude-classes", "0,1,2,3"], "leaves no images"),
        (["simclr.py", *TINY, "--out", str(foreign)], "already exists"),
        (["simclr.py", "--resume", str(run / "last.pt"), "--temperature", "0.1"], "--temperature"),
        (["simclr.py", "--resume", str(truncated)], "truncated or corrupt"),
        (["eval_knn.py", str(truncated)], "truncated or corrupt"),
        (["eval_knn.py", str(tmp_path / "nothing.pt")], "does not exist"),
        (["simclr.py", "--device", "cuda:7"] if not torch.cuda.is_available() else ["simclr.py", "--device", "tpu"],
         "device"),
    ]


def run_in_process(argv, capsys):
    """Run a script's main() the way its __main__ block does, without a new interpreter."""
    module = {"simclr.py": simclr, "eval_knn.py": eval_knn}[argv[0]]
    capsys.readouterr()
    try:
        safety.cli(lambda: module.main(argv[1:]))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_every_bad_input_is_one_sentence_exit_2_and_changes_nothing(tmp_path, capsys, monkeypatch):
    assert run_main(simclr.main, *TINY, "--epochs", "1", "--out", tmp_path / "good").returncode == 0
    cases = bad_inputs(tmp_path)
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.chdir(ROOT)
    for argv, message in cases:
        code, err = run_in_process(argv, capsys)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == snapshot  # no file created, changed or removed
    # The same through a real interpreter: one line, no traceback.
    r = run_script(*cases[2][0])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_resume_from_another_method_is_refused(tmp_path):
    if not available("simsiam"):
        pytest.skip("simsiam.py not present")
    import simsiam
    out = tmp_path / "run"
    assert run_main(simclr.main, *TINY, "--epochs", "1", "--out", out).returncode == 0
    r = run_main(simsiam.main, "--resume", out / "last.pt")
    assert r.returncode == 2 and "is a simclr checkpoint; resume it with simclr.py" in r.stderr


def test_resuming_an_older_checkpoint_would_not_overwrite_last(tmp_path):
    out = tmp_path / "run"
    r = run_main(simclr.main, *TINY[:-2], "--save-every", "1", "--epochs", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    r = run_main(simclr.main, "--resume", out / "epoch1.pt")
    assert r.returncode == 2 and "would overwrite" in r.stderr
    assert safety.load_checkpoint(str(out / "last.pt"))["epoch"] == 2
