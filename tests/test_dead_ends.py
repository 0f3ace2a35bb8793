"""Issue 23's dead ends, each tried as a user would: one sentence and exit status 2, not a
traceback, and nothing that existed lost. In-process through safety.cli, as __main__ runs it."""
import json
import os

import pytest
import torch

import byol
import safety
import simclr
import simsiam

TINY = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--device", "cpu", "--knn-every", "0",
        "--save-every", "0", "--proj-dim", "8", "--width", "8"]


def cli(main, argv, capsys):
    """(exit status, stderr) of main(argv) run the way each script's __main__ runs it."""
    with pytest.raises(SystemExit) as e:
        safety.cli(lambda: main(argv))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    if e.value.code == 2:
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return e.value.code, errors[0] if errors else err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    simclr.main([*TINY, "--epochs", "1", "--out", str(out)])
    return out


@pytest.mark.parametrize("main,argv,says", [
    (simsiam.main, ["--momentum", "0"], "--nesterov needs momentum, but --momentum is 0"),
    (byol.main, ["--momentum", "0"], "--nesterov needs momentum, but --momentum is 0"),
    (simclr.main, ["--batch-size", "16", "--accum", "16"], "--accum 16 leaves micro-batches of 1 image"),
    (simclr.main, ["--lr", "1e40"], "--lr 1e+40 gives a peak lr of"),
])
def test_flag_values_that_cannot_train(main, argv, says, capsys, tmp_path):
    code, error = cli(main, [*TINY, *argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and says in error, error
    assert not (tmp_path / "run").exists()  # refused before anything was created
    if "--momentum" in argv:  # SGD without Nesterov takes momentum 0 fine
        simsiam.main([*TINY, "--epochs", "1", "--momentum", "0", "--no-nesterov", "--out", str(tmp_path / "ok")])


def test_an_unwritable_out_names_the_flag(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("kept")
    code, error = cli(simclr.main, [*TINY, "--epochs", "1", "--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and error.startswith(f"error: --out {tmp_path / 'file' / 'run'}: cannot write there"), error
    assert (tmp_path / "file").read_text() == "kept"
    # A read-only parent (root may write anywhere, so the refusal is simulated).
    def refuse(path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "makedirs", refuse)
    code, error = cli(simclr.main, [*TINY, "--epochs", "1", "--out", str(tmp_path / "ro" / "run")], capsys)
    assert code == 2 and "--out" in error and "Permission denied" in error, error


def test_a_folder_without_last_pt_restarts_with_the_flags_of_its_args_json(tmp_path, capsys):
    out = tmp_path / "run"
    safety.cli(lambda: simclr.main([*TINY, "--epochs", "0", "--temperature", "0.2", "--out", str(out)]))
    assert os.listdir(out) == ["args.json"]  # as a run stopped before its first epoch ended leaves it
    capsys.readouterr()
    # The very command the interrupt message prints: no other flags.
    simclr.main(["--resume", "auto", "--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err
    assert "has no checkpoint yet: starting from epoch 0 with the flags of its args.json" in err, err
    saved = safety.load_checkpoint(str(out / "last.pt"))["args"]
    assert (saved["dataset"], saved["temperature"], saved["width"], saved["epochs"]) == ("synthetic", 0.2, 8, 1)
    assert json.load(open(out / "args.json"))["args"]["temperature"] == 0.2


def changed_copy(run, tmp_path, change):
    out = tmp_path / "copy"
    out.mkdir()
    ckpt = torch.load(run / "last.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "last.pt")
    return out


@pytest.mark.parametrize("change,says", [
    (lambda c: c["model"].__setitem__("projector.0.weight", torch.zeros(3, 3)),
     "does not match the simclr network its flags describe: 'projector.0.weight' is a torch.float32 tensor of "
     "shape (3, 3)"),
    (lambda c: c["model"].pop("projector.0.weight"), "it lacks 'projector.0.weight'"),
    (lambda c: c.pop("rng"), "holds no usable optimizer or RNG state (KeyError"),
    (lambda c: c.pop("optimizer"), "holds no usable optimizer or RNG state (KeyError"),
])
def test_a_broken_checkpoint_on_resume_is_one_sentence(tiny_run, tmp_path, capsys, change, says):
    out = changed_copy(tiny_run, tmp_path, change)
    before = (out / "last.pt").read_bytes()
    code, error = cli(simclr.main, ["--resume", "auto", "--out", str(out), "--epochs", "2"], capsys)
    assert code == 2 and says in error, error
    assert (out / "last.pt").read_bytes() == before  # nothing that existed is lost


def test_eval_knn_refuses_nan_weights(tiny_run, tmp_path, capsys):
    import eval_knn
    out = changed_copy(tiny_run, tmp_path, lambda c: c["model"]["projector.0.weight"].view(-1)[0].fill_(float("nan")))
    code, error = cli(eval_knn.main, [str(out / "last.pt"), "--device", "cpu"], capsys)
    assert code == 2 and "holds NaN or infinite weights (its run diverged)" in error, error


def test_simulate_with_an_unwritable_out_is_one_sentence(tmp_path):
    from conftest import run_main
    import simulate
    (tmp_path / "file").write_text("kept")
    r = run_main(simulate.main, "norms", "--quick", "--out", tmp_path / "file" / "sub")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--out" in r.stderr, r.stderr
    assert (tmp_path / "file").read_text() == "kept"


def test_simulate_with_a_read_only_out_is_one_sentence(tmp_path, monkeypatch, capsys):
    import simulate
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: simulated
    with pytest.raises(SystemExit) as e:
        simulate.main(["norms", "--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cannot write into --out {tmp_path} (permission denied)" in err, err
    assert os.listdir(tmp_path) == []
