"""Plumbing: cut-init, schedule, optimizer, checkpoints, k-NN, argument checks."""
import math
import os

import pytest
import torch
from torch import nn

import common
import safety
import datasets
import simclr
from eval_knn import knn_predict, norm_summary


def test_cut_init_divides_every_parameter_and_shrinks_outputs():
    torch.manual_seed(0)
    model = simclr.SimCLR(simclr.Args(proj_dim=32), 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    _, z_before = model(x)
    common.cut_init(model, 4.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name] / 4.0, rtol=0, atol=0)
    for name, b in model.named_buffers():  # BN running statistics are not weights
        assert torch.equal(b, before[name])
    _, z_after = model(x)
    assert (z_after.norm(dim=1) < z_before.norm(dim=1) / 4).all()


def test_cut_init_scales_a_linear_network_exactly():
    net = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Linear(5, 3, bias=False))
    x = torch.randn(2, 5)
    y = net(x)
    common.cut_init(net, 3.0)
    torch.testing.assert_close(net(x), y / 9.0)  # two layers, each divided by 3


def test_lr_schedule_warmup_then_cosine():
    total, warmup = 100, 10
    f = [common.lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5)  # halfway through the cosine part
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_lr_scaling_and_schedule_per_step():
    args = common.Args(lr=0.3, batch_size=512, optimizer="sgd", epochs=10, warmup=2)
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = common.make_optimizer(args, [{"params": a.parameters()}, {"params": b.parameters()}], torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.6)  # 0.3 * 512 / 256
    assert not opt.param_groups[0]["nesterov"]
    common.set_lr(opt, 0.15)
    assert [g["lr"] for g in opt.param_groups] == [0.15, 0.15]
    run = common.Run("test", args, torch.device("cpu"), datasets.Data("x", torch.zeros(1024, 3, 2, 2), None, None, None, 1),
                     [0.5] * 3, [0.25] * 3, folder="")
    assert run.steps_per_epoch == 2 and run.total_steps == 20
    assert run.lr_at(0) == pytest.approx(0.6 / 4) and run.lr_at(3) == pytest.approx(0.6)  # 4 warmup steps
    assert run.lr_at(19) == pytest.approx(0.6 * common.lr_factor(19, 20, 4))


def test_checkpoint_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    ckpt = {"format": safety.FORMAT, "method": "simclr", "model": model.state_dict(), "rng": common.rng_state()}
    path = str(tmp_path / "last.pt")
    safety.save_atomic(ckpt, path)
    loaded = safety.load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    common.set_rng_state(loaded["rng"])
    a = torch.rand(3)
    common.set_rng_state(loaded["rng"])
    assert torch.equal(a, torch.rand(3))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"format": safety.FORMAT, "payload": Evil()}, path)
    with pytest.raises(safety.UsageError, match="pickled code"):
        safety.load_checkpoint(path)


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    good = str(tmp_path / "good.pt")
    safety.save_atomic({"format": safety.FORMAT, "w": torch.randn(100)}, good)
    data = open(good, "rb").read()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(safety.UsageError, match="truncated or corrupt"):
        safety.load_checkpoint(str(bad))
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(safety.UsageError, match="not written by normssl"):
        safety.load_checkpoint(foreign)
    with pytest.raises(safety.UsageError, match="does not exist"):
        safety.load_checkpoint(str(tmp_path / "missing.pt"))


def test_knn_on_a_toy_problem_with_a_known_answer():
    # Two well-separated clusters; every query sits next to its own class.
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    train_y = torch.tensor([0] * 10 + [1] * 10)
    train_f = centres[train_y] + 0.05 * torch.randn(20, 2)
    test_y = torch.tensor([0, 1, 1, 0])
    test_f = centres[test_y] + 0.05 * torch.randn(4, 2)
    assert torch.equal(knn_predict(train_f, train_y, test_f, 2, k=5, t=0.1, chunk=3), test_y)


def test_knn_weights_votes_by_similarity():
    # One very close neighbour of class 1 outvotes two distant ones of class 0 when T is small.
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.1, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train_f, train_y, query, 2, k=3, t=0.1).item() == 1
    assert knn_predict(train_f, train_y, query, 2, k=3, t=100.0).item() == 0  # almost uniform votes


def test_norm_summary():
    feats = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    s = norm_summary(feats, torch.tensor([0, 1, 0]), 2)
    assert s["mean"] == pytest.approx(16 / 3)
    assert s["per_class"][0]["mean"] == pytest.approx(7.5) and s["per_class"][1]["count"] == 1


def test_features_spaces():
    model = simclr.SimCLR(simclr.Args(proj_dim=8), 16).eval()
    x = torch.randn(2, 3, 16, 16)
    assert common.features(model, x, "backbone").shape == (2, 512)
    assert common.features(model, x, "projector").shape == (2, 8)
    with pytest.raises(safety.UsageError, match="no predictor"):
        common.features(model, x, "predictor")


@pytest.mark.parametrize("argv,message", [
    (["--cut", "0"], "--cut must be positive"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--wd", "-1"], "--wd must be >= 0"),
    (["--batch-size", "10", "--accum", "3"], "multiple of --accum"),
    (["--dataset", "imagenet1k"], "invalid choice"),
])
def test_bad_flags_exit_2_with_a_sentence(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(simclr.Args, simclr.__doc__, argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_embedding_stats():
    z = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    s = common.embedding_stats(z, z * 2, (z, torch.tensor([[-3.0, 1.0], [1.0, 2.0]])))
    assert s["emb_norm_mean"].item() == pytest.approx(3.5) and s["feat_norm_mean"].item() == pytest.approx(7.0)
    assert s["opposite_rate"].item() == 0.5  # cos < 0 for the first pair only (-9 + 4 < 0; 0 + 4 > 0)
    assert common.embedding_stats(z, z, (z, -z), opposite_cos=-0.99)["opposite_rate"].item() == 1.0
    assert common.embedding_stats(z, z, (z, z), opposite_cos=-0.99)["opposite_rate"].item() == 0.0
    ones = torch.ones(5, 3) * torch.arange(1, 6.0)[:, None]
    collapsed = common.embedding_stats(ones, torch.ones(5, 3), (ones, ones))
    assert collapsed["collapse_std"].item() == pytest.approx(0.0, abs=1e-7)


def test_effective_rank():
    assert common.effective_rank(torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))) == pytest.approx(8, rel=0.01)
    line = torch.randn(100, 1) * torch.tensor([[1.0, 2.0, 3.0]])  # every embedding on one line
    assert common.effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    assert 1.0 < common.effective_rank(torch.randn(100, 3) * torch.tensor([1.0, 0.1, 0.01])) < 2.0


def test_gradscale_preset_sets_warmup_and_lr_unless_typed(capsys):
    def preset(*argv):
        args = common.parse_args(simclr.Args, simclr.__doc__, list(argv))
        return args, [n for n in args.notes if n.startswith("GradScale")]
    args, notes = preset("--power", "1")
    assert (args.warmup, args.lr) == (100, pytest.approx(0.3 / 6))
    assert notes == ["GradScale preset: --warmup 100 --lr 0.05 (type either flag to override)"]
    args, notes = preset("--power", "1", "--warmup", "10")
    assert (args.warmup, args.lr) == (10, pytest.approx(0.05)) and notes[0].startswith("GradScale preset: --lr 0.05 (")
    args, notes = preset("--power", "0.5", "--lr", "0.2", "--warmup", "20")
    assert (args.warmup, args.lr) == (20, 0.2) and notes == []
    args, notes = preset()  # GradScale off: the method's defaults
    assert (args.warmup, args.lr) == (10, 0.3) and notes == []
    args, notes = preset("--power=1", "--lr=0.1")  # the --flag=value spelling counts as typed too
    assert (args.warmup, args.lr) == (100, 0.1) and notes == ["GradScale preset: --warmup 100 (type either flag to override)"]


def test_device_choice_with_availability_mocked(monkeypatch):
    """auto takes CUDA, then Apple's MPS, then the CPU; asking for an absent one is an error."""
    def machine(cuda, mps):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    machine(True, True)
    assert common.pick_device("auto") == (torch.device("cuda"), "cuda:0 (Fake GPU)")
    machine(False, True)
    device, why = common.pick_device("auto")
    assert device.type == "mps" and "untested" in why
    assert common.pick_device("mps")[0].type == "mps"
    machine(False, False)
    assert common.pick_device("auto") == (torch.device("cpu"), "cpu (no CUDA or MPS found)")
    for name, says in [("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("mps", "no Apple MPS GPU"),
                       ("tpu", "not a device name")]:
        with pytest.raises(safety.UsageError, match=says):
            common.pick_device(name)
    assert common.autocast(torch.device("mps")).__class__.__name__ == "nullcontext"  # autocast on CUDA only
