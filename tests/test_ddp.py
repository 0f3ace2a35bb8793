"""torchrun with 2 CPU processes (gloo) against one process on the same global batch.

Each torchrun start costs seconds of importing torch in the launcher and in each process, so the
cases share starts: one torchrun of tests/ddp_worker.py takes every method's steps, one runs
simclr.py as a user types it, and one runs every other script's main() in turn."""
import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# Two processes on two cores: one thread each, or they fight over the cores.
ONE = 1


STEPS = ["infonce", "simclr", "moco-v3", "moco-v2"]  # the worker's methods


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """{method: the worker's result in one process, under torchrun}. The single process runs here,
    alongside the two (the comparison allows float noise, so the thread count may differ)."""
    import ddp_worker
    folder = tmp_path_factory.mktemp("steps")
    files = {m: (folder / f"{m}-one.pt", folder / f"{m}-two.pt") for m in STEPS}
    env = {**os.environ, "OMP_NUM_THREADS": str(ONE)}
    two = subprocess.Popen([sys.executable, *TORCHRUN, "tests/ddp_worker.py", "steps",
                            *(f"{m}={f[1]}" for m, f in files.items())], cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the other core is the two processes'
        for m, f in files.items():
            ddp_worker.main(m, f[0])
        _, err = two.communicate(timeout=600)  # a hung process group fails the test, not the suite
    finally:
        torch.set_num_threads(threads)
        if two.poll() is None:
            os.killpg(two.pid, signal.SIGKILL)  # the launcher and its two workers
    assert two.returncode == 0, err
    return {m: tuple(torch.load(f, weights_only=True) for f in pair) for m, pair in files.items()}


def test_gathered_negatives_gradient(steps):
    one, two = steps["infonce"]
    # Each rank's loss is the mean over its own anchors, so its gradient is world x the
    # single-process one; averaging over ranks restores it.
    assert two["scaled"].item() == 2
    torch.testing.assert_close(two["grad"] / 2, one["grad"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["simclr", "moco-v3", "moco-v2"])
def test_two_processes_take_the_same_steps_as_one(method, steps):
    one, two = steps[method]
    if method == "moco-v2":  # --bn-splits 2 imitates 2 GPUs in one process; each of 2 ranks is one, with plain BN
        assert set(one.pop("bn_splits").tolist()) == {2} and set(two.pop("bn_splits").tolist()) == {1}
    assert one.keys() == two.keys()
    # float32 sums in another order drift by ~1e-5 over two steps; per-rank instead of
    # global batch norm, for comparison, is off by ~3e-2.
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-4, msg=k)
    assert "queue" in one if method == "moco-v2" else "queue" not in one


SCRIPTS = [["simclr.py"], ["simsiam.py", "--proj-dim", "64", "--pred-dim", "16"],
           ["byol.py", "--hidden-dim", "64", "--proj-dim", "16"],
           ["moco.py", "--version", "v2", "--queue", "32", "--bn-splits", "2"],
           ["moco.py", "--version", "v3", "--arch", "vit_tiny", "--mlp-dim", "64"]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """({i: the torchrun that trained SCRIPTS[i]}, {i: its run folder}): `torchrun simclr.py` as a user types
    it, then every other script's main() in turn under one torchrun of 2 processes."""
    folder = tmp_path_factory.mktemp("torchrun")
    outs = {i: folder / str(i) for i in range(len(SCRIPTS))}
    runs = [[*script, "--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--width", "16",
             "--epochs", "1", "--device", "cpu", "--out", str(outs[i])] for i, script in enumerate(SCRIPTS)]
    typed = run_script(*TORCHRUN, *runs[0], threads=ONE)
    shared = run_script(*TORCHRUN, "tests/ddp_worker.py", "scripts", json.dumps(runs[1:]), threads=ONE)
    return {i: typed if i == 0 else shared for i in outs}, outs


@pytest.mark.parametrize("i", range(len(SCRIPTS)), ids=["simclr", "simsiam", "byol", "moco-v2", "moco-v3"])
def test_every_script_trains_under_torchrun(i, trained):
    r, out = trained[0][i], trained[1][i]
    script = SCRIPTS[i]
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["args.json", "last.pt", "metrics.jsonl"]  # rank 0 alone writes
    lines = open(out / "metrics.jsonl").read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 2
    # The optimizer was built from the final model (after the global-BN swap): it holds every
    # trainable parameter, and every batch norm's shift left its initial 0.
    ckpt = torch.load(out / "last.pt", weights_only=True)
    module = importlib.import_module(script[0][:-3])
    model = module.build_model(module.Args(**ckpt["args"]), ckpt["img_size"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"]) == len(trainable)
    assert len(ckpt["optimizer"]["state"]) == len(trainable)  # each one was stepped
    shifts = [n for n in trainable if n.endswith(".bias") and n.replace(".bias", ".running_mean") in ckpt["model"]]
    assert shifts and all(ckpt["model"][n].abs().sum() > 0 for n in shifts), "a BN shift never trained"
    import eval_knn  # in-process: the subprocess path of eval_knn.py is tested elsewhere
    assert 0 <= eval_knn.main([str(out / "last.pt"), "--device", "cpu", "--k", "5"])["knn_top1"] <= 100


def test_bn_splits_are_checked_per_rank(monkeypatch):
    import common
    import moco
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, before the process group exists
    assert common.validate(moco.Args(batch_size=8, queue=32)) is None  # 4 images and 8 // 2 = 4 splits per rank
    assert "the 6 images per rank and micro-batch must be a multiple of --bn-splits 8 // 2 ranks = 4; change" in \
        common.validate(moco.Args(batch_size=12, queue=32))


def test_batch_must_split_evenly_over_ranks(tmp_path):
    r = run_script(*TORCHRUN, "simclr.py", "--dataset", "synthetic", "--subset", "32", "--batch-size", "15",
                   "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"), threads=ONE)
    assert r.returncode != 0 and "must be a multiple of 2 processes" in r.stderr
    assert not (tmp_path / "run").exists()


class Nccl(Exception):
    pass


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("auto", "nccl")])
def test_the_backend_follows_the_device_not_the_machine(device, backend, monkeypatch, tmp_path):
    """torchrun ... --device cpu on a CUDA machine: gloo and the CPU global batch norm, where NCCL
    (which cannot reduce CPU tensors) and SyncBatchNorm (no CPU kernel) would fail inside torch."""
    import socket

    import torch.distributed as dist

    import common
    import ddp
    import simclr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "a mocked GPU")
    real, asked = dist.init_process_group, []

    def init(name):
        asked.append(name)
        if name == "nccl":
            raise Nccl  # this CPU machine has no NCCL to start
        real(name)
    monkeypatch.setattr(dist, "init_process_group", init)
    args = common.parse_args(simclr.Args, "", ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16",
                                               "--device", device, "--out", str(tmp_path / "r")])
    try:
        if backend == "nccl":
            with pytest.raises(Nccl):
                common.start("simclr", args)
        else:
            run = common.start("simclr", args)
            assert run.device.type == "cpu" and dist.get_backend() == "gloo"
            monkeypatch.setattr(ddp, "world", lambda: (0, 2))  # as on 2 ranks
            bn = ddp.split_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)), sync=True)[0]
            assert type(bn) is ddp.SplitBatchNorm and bn.sync
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert asked == [backend]
