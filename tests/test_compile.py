"""The laptop step's speed options (issue 28): --compile and its default, the C++ compiler fallback, the bf16
warning, and a compiled run that resumes bitwise from a checkpoint holding the uncompiled network's keys."""
import pytest
import torch

import common
import eval_knn
import safety
import simclr

# One step per epoch on the narrowest network: compiling it (once, then reused) is most of the cost.
TINY = ["--dataset", "synthetic", "--subset", "16", "--batch-size", "16", "--device", "cpu", "--width", "8",
        "--knn-every", "0", "--save-every", "0", "--epochs", "2"]
CPU = torch.device("cpu")


def choice(steps=10, compile=None, device=CPU):
    """(compile or not, the warnings) that common.compile_choice gives."""
    notes = []
    return common.compile_choice(compile, device, steps, notes), notes


def test_help_names_the_flag_and_its_rule(capsys):
    with pytest.raises(SystemExit) as e:
        simclr.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "--compile, --no-compile" in out and f"on for runs of {common.COMPILE_STEPS} optimizer steps or more" in out


def test_compile_is_on_for_long_runs_unless_typed(monkeypatch):
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr(common.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert choice(common.COMPILE_STEPS - 1) == (False, []) and choice(common.COMPILE_STEPS) == (True, [])
    assert choice(10 ** 6, compile=False)[0] is False and choice(1, compile=True)[0] is True
    assert choice(10 ** 6, device=torch.device("mps"))[0] is False  # auto leaves MPS uncompiled


def test_without_a_cpp_compiler_the_run_goes_on_uncompiled_with_one_warning(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    on, notes = choice(compile=True)
    assert on is False and len(notes) == 1
    assert "no C++ compiler (no-such-compiler++)" in notes[0] and "--no-compile" in notes[0]
    assert choice(compile=False) == (False, [])  # nothing to say when compiling was not asked for


@pytest.mark.parametrize("avx512_bf16, amx, warned", [(False, False, 1), (True, False, 0), (False, True, 0)])
def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, capsys, tmp_path, avx512_bf16, amx, warned):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    simclr.main([*TINY, "--epochs", "0", "--precision", "bf16", "--out", str(tmp_path / "bf16")])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "native bf16" in line]
    assert len(lines) == warned and "bf16 autocast" in out
    if warned:
        assert lines[0].startswith("warning: --precision bf16") and f"{common.BF16_SLOWDOWN} slower" in lines[0]
        assert lines[0].endswith("use --precision fp32")
    simclr.main([*TINY, "--epochs", "0", "--precision", "fp32", "--out", str(tmp_path / "fp32")])
    assert "native bf16" not in capsys.readouterr().err  # fp32 is never emulated


def test_a_compiled_run_resumes_bitwise_and_saves_the_uncompiled_keys(tmp_path, monkeypatch, capsys):
    """One process: the whole run compiles, the interrupted and the resumed one reuse its compiled code."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    model = simclr.main([*TINY, "--compile", "--out", str(whole)])
    assert ", compiled" in capsys.readouterr().out
    assert type(model).__name__ == "SimCLR" and model._compiled_call_impl is not None  # compiled in place

    end_epoch = common.end_epoch

    def stop_after_one(run, model, optimizer, epoch):
        end_epoch(run, model, optimizer, epoch)
        raise KeyboardInterrupt  # last.pt of epoch 1 is written
    monkeypatch.setattr(common, "end_epoch", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        simclr.main([*TINY, "--compile", "--out", str(part)])
    monkeypatch.setattr(common, "end_epoch", end_epoch)
    simclr.main([*TINY, "--compile", "--resume", "auto", "--out", str(part)])

    a, b = (safety.load_checkpoint(str(f / "last.pt")) for f in (whole, part))
    assert a["epoch"] == b["epoch"] == 2 and a["args"]["compile"] is True
    assert not [k for k in a["model"] if "_orig_mod" in k]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"]["loss"] == b["metrics"]["loss"] and a["metrics"]["knn_top1"] == b["metrics"]["knn_top1"]
    loaded, _ = eval_knn.load_model(str(whole / "last.pt"))  # an uncompiled network takes the weights as they are
    assert all(torch.equal(v, a["model"][k]) for k, v in loaded.state_dict().items())
