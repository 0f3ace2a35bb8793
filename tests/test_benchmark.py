"""benchmarks/throughput.py: its CPU smoke run (the table, the JSON and its arithmetic),
that the step it times is the step each script's main() loop takes, and that this step reads no value
back from the device except the lagged loss check."""
import copy
import dataclasses
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from conftest import ROOT, run_main, run_script

import byol
import common
import datasets
import moco
import simclr
import simsiam

SMOKE = ["--device", "cpu", "--images", "64", "--batch-size", "16", "--size", "8", "--steps", "2",
         "--warmup-steps", "1", "--workers", "0", "--knn-bank", "64", "--knn-queries", "32"]
HEADER = "method   | floor s/epoch | full s/epoch | full/floor | PIL s/epoch | PIL/full | peak GB | syncs/step"


def load_benchmark(name="throughput"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(tree, path=""):
    """Every (path, value) in the JSON whose key ends in _seconds."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k.endswith("_seconds"):
                yield f"{path}.{k}", v
            else:
                yield from seconds(v, f"{path}.{k}")


def test_cpu_smoke_run_prints_the_table_and_writes_consistent_json(tmp_path):
    """In-process through safety.cli (gpu_check.py starts throughput.py as a process, below)."""
    out = tmp_path / "bench.json"
    r = run_main(load_benchmark().main, *SMOKE, "--json", out)
    assert r.returncode == 0, r.stderr
    assert HEADER in r.stdout
    assert "k-NN: 64 bank, 32 queries, 512-d: extract" in r.stdout
    assert "targets: not checked" in r.stdout  # they are for a GPU at the default sizes
    result = json.load(open(out))
    assert set(result) == {"config", "hardware", "floor", "methods", "skipped", "knn", "targets"}
    assert result["hardware"]["device"] == "cpu" and result["config"]["steps_per_epoch"] == 4
    # Every method that imports is timed; one that does not is listed with its reason.
    assert "simclr" in result["methods"] and "simsiam" in result["methods"] and "byol" in result["methods"]
    assert set(result["methods"]) | set(result["skipped"]) == {"simclr", "simsiam", "byol", "moco"}
    times = dict(seconds(result))
    assert len(times) >= 3 + 5 * len(result["methods"])
    for path, v in times.items():
        assert isinstance(v, float) and math.isfinite(v) and v > 0, path
    for name, m in result["methods"].items():
        assert name in r.stdout
        for k in ("floor_epoch_seconds", "full_epoch_seconds", "full_over_floor", "pil_epoch_seconds",
                  "pil_over_full", "peak_gb", "full_host_syncs_per_step", "args"):
            assert k in m, (name, k)
        assert m["floor_epoch_seconds"] == result["floor"]["epoch_seconds"]
        assert m["full_epoch_seconds"] == pytest.approx(4 * m["full_step_seconds"])
        assert m["pil_epoch_seconds"] == pytest.approx(4 * m["pil_step_seconds"])
        assert m["full_over_floor"] == pytest.approx(m["full_epoch_seconds"] / m["floor_epoch_seconds"])
        assert m["pil_over_full"] == pytest.approx(m["pil_epoch_seconds"] / m["full_epoch_seconds"])
        assert m["peak_gb"] is None and m["full_host_syncs_per_step"] is None  # GPU-only numbers
        assert m["args"]["batch_size"] == 16 and m["args"]["arch"] == "resnet18"
    knn = result["knn"]
    assert (knn["bank"], knn["queries"], knn["dim"]) == (64, 32, 512)
    assert knn["total_seconds"] == pytest.approx(knn["extract_seconds"] + knn["search_seconds"])
    assert result["targets"] is None


@pytest.mark.parametrize("argv, says", [(["--methods", "simclr,dino"], "dino"),
                                         (["--images", "8", "--batch-size", "16"], "--images 8"),
                                         (["--steps", "0"], "--steps")])
def test_bad_flags_give_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        load_benchmark().parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err


def test_timed_step_is_the_scripts_own_step(tmp_path, monkeypatch):
    """Two steps of the benchmark's Trainer and two of simclr.main(), from the same weights,
    data order and random state, end at the same weights: the benchmark times the real step."""
    bench = load_benchmark()
    argv = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--epochs", "1", "--warmup", "1",
            "--knn-every", "0", "--save-every", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    args = common.parse_args(simclr.Args, simclr.__doc__, argv)
    start = simclr.build_model(args, 16)
    monkeypatch.setattr(simclr, "build_model", lambda args, size: copy.deepcopy(start))
    model = simclr.main(argv)

    data = datasets.load_dataset("synthetic", "data", subset=32)
    run = common.Run("simclr", args, torch.device("cpu"), data, *datasets.channel_stats(data.train_x), folder="")
    view = run.augment()
    copy_ = copy.deepcopy(start).to(memory_format=torch.channels_last)  # as common.prepare makes it
    optimizer = common.make_optimizer(args, bench.param_groups("simclr", copy_), run.device)
    trainer = bench.Trainer(simclr, copy_, optimizer, run)
    # Run.batches' data order and augmentation seed for epoch 0 (seed * 100003 + epoch * 1009 + rank + 1).
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(args.seed * 100003))
    torch.manual_seed(1)
    for i in range(2):
        trainer(data.train_x[perm[i * 16: (i + 1) * 16]], (view, view))
    for (name, a), b in zip(model.state_dict().items(), copy_.state_dict().values()):
        assert torch.equal(a, b), name


READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")  # each waits for the device's queue


@pytest.mark.parametrize("name", ["simclr", "simsiam", "byol", "moco-v2", "moco-v3"])
def test_a_training_step_reads_nothing_back_but_the_periodic_loss_check(name, monkeypatch):
    """On a GPU, reading a tensor's value on the host stalls the CPU until the GPU has
    caught up. Counted here on the CPU: during the 4 steps of an epoch of the script's
    train_step and end_step (through the benchmark's Trainer, which times them), the only
    reads made by this repo's code are the loss checks, every CHECK_EVERY steps (set to 3
    here) and at the epoch's last step. torch's own single-tensor Adam on the CPU reads
    CPU-side step counters; those are not counted (CUDA uses the fused optimizer)."""
    monkeypatch.setattr(common, "CHECK_EVERY", 3)
    module, args = {
        "simclr": (simclr, simclr.Args(proj_dim=16)),
        "simsiam": (simsiam, simsiam.Args(proj_dim=16, pred_dim=8)),
        "byol": (byol, byol.Args(hidden_dim=16, proj_dim=8)),
        "moco-v2": (moco, moco.Args(queue=32, bn_splits=2)),
        "moco-v3": (moco, moco.Args(version="v3", arch="vit_tiny", mlp_dim=32, proj_dim=16, optimizer="adamw")),
    }[name]
    args = dataclasses.replace(args, dataset="synthetic", batch_size=16, epochs=1, warmup=1)
    data = datasets.load_dataset("synthetic", "unused", subset=64)
    cpu = torch.device("cpu")
    run = common.Run(name, args, cpu, data, *datasets.channel_stats(data.train_x), folder="unused")
    bench = load_benchmark()  # its Trainer is the script's own loop body, as main() sets it up
    method = name.split("-")[0]
    views = bench.method_views(module, run)
    model = module.build_model(args, data.size)
    trainer = bench.Trainer(module, model, common.make_optimizer(args, bench.param_groups(method, model), cpu), run)
    ours = {os.path.realpath(os.path.join(ROOT, f)) for f in os.listdir(ROOT) if f.endswith(".py")}
    reads = []

    def counted(method):
        def read(self, *a, **kw):
            caller = sys._getframe(1).f_code
            if os.path.realpath(caller.co_filename) in ours:
                reads.append((method, os.path.basename(caller.co_filename), caller.co_name))
            return getattr(torch._C.TensorBase, method)(self, *a, **kw)
        return read

    for method in READS:
        monkeypatch.setattr(torch.Tensor, method, counted(method), raising=False)
    for i in range(4):
        trainer(data.train_x[16 * i: 16 * (i + 1)], views)
    assert run.steps_per_epoch == 4 and reads == [("tolist", "common.py", "end_step")] * 2  # steps 3 and 4


# ----------------------------------------------------------------------------- the laptop grid and the GPU check

def test_gpu_check_runs_its_whole_cpu_fallback_path(tmp_path):
    """benchmarks/gpu_check.py on this CPU, at a tiny budget: the torchrun and fp16 runs (the
    other five are the same path with other scripts), then the throughput benchmark, into one
    JSON and one table (small idx files in the real format). As a user types it: its exit
    status is the verdict a GPU session reads."""
    from test_data import write_fashion
    write_fashion(str(tmp_path / "fashion"), n=64)
    out = tmp_path / "check"
    r = run_script("benchmarks/gpu_check.py", "--out", str(out), "--data-dir", str(tmp_path / "fashion"),
                   "--device", "cpu", "--epochs", "1", "--subset", "64", "--batch-size", "32",
                   "--extra", "--width 8 --proj-dim 16", "--runs", "simclr-torchrun,simsiam-fp16",
                   "--throughput", "--device cpu --images 32 --batch-size 16 --size 8 --steps 1 --warmup-steps 0 "
                                   "--workers 0 --knn-bank 32 --knn-queries 16 --methods simclr --skip-pil")
    stdout = r.stdout
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.load(open(out / "gpu_check.json"))
    assert result["cuda"] is False and "simclr" in result["throughput"]["methods"]
    assert sorted(result["runs"]) == ["simclr-torchrun", "simsiam-fp16"]
    for run in result["runs"].values():
        assert run["status"] == "ok" and 0 <= run["knn_top1"] <= 100 and run["emb_norm"] > 0
        assert "--dataset fashionmnist" in run["command"] and run["seconds_per_epoch"] > 0
    assert result["runs"]["simsiam-fp16"]["device"].endswith("fp16 autocast with a gradient scaler")
    assert "torch.distributed.run" in result["runs"]["simclr-torchrun"]["command"]
    assert "| simsiam-fp16 | cpu" in stdout and f"wrote {out / 'gpu_check.json'}" in stdout


def test_laptop_grid_writes_rows_as_it_goes_and_resumes(tmp_path):
    from test_data import write_fashion
    write_fashion(str(tmp_path / "fashion"), n=64)
    argv = ["--out", str(tmp_path / "results"), "--only", "simclr-unseen", "--seeds", "0", "--epochs", "1",
            "--extra", f"--data-dir {tmp_path / 'fashion'} --subset 0 --batch-size 32 --proj-dim 16 --width 8"]
    laptop = load_benchmark("laptop")
    laptop.main(argv)  # in-process; the grid's run is a process of its own, as always
    rows = json.load(open(tmp_path / "results" / "laptop.json"))["rows"]
    assert [(row["name"], row["seed"]) for row in rows] == [("simclr-unseen", 0)]
    row = rows[0]
    assert row["auroc_unseen"] is not None and 0 <= row["knn_top1"] <= 100
    assert "--preset laptop" in row["command"] and row["epochs"] == 1 and len(row["norm_per_epoch"]) == 1
    again = laptop.main(argv)  # nothing left to do: no run is repeated, the rows stay
    assert again["rows"] == rows
    assert "| simclr-unseen | `--exclude-classes 8,9` | 1 |" in laptop.table(rows)


def test_cpu_profile_reports_the_augmentation_share(tmp_path):
    """benchmarks/profile_cpu.py on a generated Fashion-MNIST: a share strictly between 0
    and 1 (both labels were recorded, the augmentation inside the step) and a finite speed."""
    from test_data import write_fashion
    write_fashion(str(tmp_path), n=64)
    spec = importlib.util.spec_from_file_location("profile_cpu", os.path.join(ROOT, "benchmarks", "profile_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        out = module.main(["--method", "simclr", "--data-dir", str(tmp_path), "--subset", "64", "--batch-size", "16",
                           "--width", "4", "--steps", "1", "--untimed", "1", "--threads", "1", "--extra", "--proj-dim 8"])
    finally:
        torch.set_num_threads(threads)
    assert 0 < out["augment_share"] < 1 and math.isfinite(out["images_per_second"]) and out["images_per_second"] > 0
