"""moco.py: losses against plain loops, the EMA and its schedule, the queue, the
stop-gradient, cut-init of the key encoder, split BN, and both versions end to end."""
import collections
import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_run, run_main

import common
import ddp
import safety
import eval_knn
import moco

TINY = ["--dataset", "synthetic", "--subset", "16", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
        "--width", "16"]  # a narrow ResNet for v2; the ViT of v3 has no width flag of its own


def small_args(version="v2", **kw):
    """Args for a model that builds and runs in well under a second on a CPU, with the
    version's defaults for the flags not given, as main() gets them."""
    if version == "v2":
        kw = {"dataset": "synthetic", "queue": 32, "bn_splits": 1, **kw}
    else:
        kw = {"version": "v3", "dataset": "synthetic", "arch": "vit_tiny", "mlp_dim": 32, "proj_dim": 16, **kw}
    return moco.Args(**{**moco.defaults(moco.Args(**kw)), **kw})


def images(n=4, size=8):
    return torch.randn(n, 3, size, size), torch.randn(n, 3, size, size)


def key_pairs(model):
    """(query parameter, key parameter) pairs, by name: backbone.x <-> key_backbone.x."""
    params = dict(model.named_parameters())
    return [(params[name[len("key_"):]], p) for name, p in params.items() if name.startswith("key_")]


# ----------------------------------------------------------------------------- losses

def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_queue_loss_matches_a_loop():
    q, k, queue = torch.randn(5, 8), torch.randn(5, 8), F.normalize(torch.randn(7, 8), dim=1)
    t = 0.2
    losses = []
    for i in range(5):
        pos = cos(q[i].tolist(), k[i].tolist()) / t
        neg = [cos(q[i].tolist(), n.tolist()) / t for n in queue]
        losses.append(-pos + math.log(math.exp(pos) + sum(math.exp(s) for s in neg)))
    assert moco.info_nce_queue(q, k, queue, t).item() == pytest.approx(sum(losses) / 5, rel=1e-5)


def test_in_batch_loss_matches_a_loop():
    q, k, t = torch.randn(6, 8), torch.randn(6, 8), 0.2
    losses = []
    for i in range(6):
        s = [cos(q[i].tolist(), k[j].tolist()) / t for j in range(6)]
        losses.append(-s[i] + math.log(sum(math.exp(x) for x in s)))
    # The MoCo v3 paper's Alg. 1 scales the cross-entropy by 2 tau.
    assert moco.info_nce_in_batch(q, k, t).item() == pytest.approx(2 * t * sum(losses) / 6, rel=1e-5)


# ----------------------------------------------------------------------------- momentum encoder

def test_momentum_update_is_an_ema_of_the_query_encoder():
    model = moco.build_model(small_args(), 8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # keys and queries differ from here on
    before = {n: p.clone() for n, p in model.named_parameters()}
    moco.momentum_update(model, 0.9)
    pairs = key_pairs(model)
    assert len(pairs) == len(list(model.backbone.parameters())) + len(list(model.projector.parameters()))
    for name, p in model.named_parameters():
        if name.startswith("key_"):
            q_old, k_old = before[name[len("key_"):]], before[name]
            torch.testing.assert_close(p, 0.9 * k_old + 0.1 * q_old)
        else:
            assert torch.equal(p, before[name])  # the query encoder is not touched


def test_momentum_schedule():
    v2 = common.parse_args(moco.Args, moco.__doc__, [], moco.defaults)
    big = common.parse_args(moco.Args, moco.__doc__, ["--dataset", "imagenet100"], moco.defaults)
    assert [moco.key_momentum(v2, p) for p in (0.0, 0.5, 0.99)] == [0.99] * 3 and v2.queue == 4096
    assert moco.key_momentum(big, 0.3) == 0.999 and big.queue == 65536
    v3 = small_args("v3")
    # Half cosine from m = 0.99 to 1: 1 - 0.01 (1 + cos(pi t)) / 2.
    for progress, m in [(0.0, 0.99), (1 / 3, 0.9925), (0.5, 0.995), (2 / 3, 0.9975), (1.0, 1.0)]:
        assert moco.key_momentum(v3, progress) == pytest.approx(m, abs=1e-12)


def test_key_encoder_moves_once_per_optimizer_step_under_accum():
    """The script's own train_step with two micro-batches per step moves the key encoder
    once per step, towards the query encoder of the previous step."""
    # m = 0.5 and a large lr, so that one update too many shows far above float noise.
    args = small_args("v3", epochs=1, warmup=0, batch_size=8, accum=2, optimizer="sgd", lr=10.0, m=0.5)
    cpu = torch.device("cpu")
    model = moco.build_model(args, 8)
    run = make_run(args)  # 16 images of batch 8: 2 steps in all
    opt = common.make_optimizer(args, [p for p in model.parameters() if p.requires_grad], cpu)
    same = (lambda x: x, lambda x: x)  # the batches are already the views
    k0 = [k.clone() for _, k in key_pairs(model)]
    moco.train_step(model, opt, list(images()), same, run, 0)
    # Step 0: the key encoder is a copy of the query encoder, so it stays exactly as it was.
    assert all(torch.equal(a, k) for a, (_, k) in zip(k0, key_pairs(model)))
    assert not all(torch.equal(a, q) for a, (q, _) in zip(k0, key_pairs(model)))  # the optimizer moved q
    q1, k1 = [q.clone() for q, _ in key_pairs(model)], [k.clone() for _, k in key_pairs(model)]
    moco.train_step(model, opt, list(images()), same, run, 1)  # progress 1/2
    m = moco.key_momentum(args, 0.5)
    for (_, k), old, q in zip(key_pairs(model), k1, q1):
        torch.testing.assert_close(k, m * old + (1 - m) * q)  # once: twice would be m^2


# ----------------------------------------------------------------------------- queue

def test_queue_is_fifo_wraps_around_and_holds_detached_keys():
    model = moco.build_model(small_args(queue=6, proj_dim=3), 8)
    reference = collections.deque(model.queue.tolist(), maxlen=6)  # oldest first
    for step in range(4):  # batches of 4 into 6 slots: the pointer wraps mid-batch
        k = torch.randn(4, 3, requires_grad=True)
        moco.enqueue(model, k * 2)
        reference.extend((k * 2).tolist())
        ptr = int(model.queue_ptr)
        assert ptr == 4 * (step + 1) % 6
        torch.testing.assert_close(model.queue.roll(-ptr, dims=0), torch.tensor(list(reference)))
        assert not model.queue.requires_grad and model.queue.grad_fn is None


def test_keys_are_enqueued_once_per_step_after_the_loss():
    """Both micro-batches of a step (--accum 2) find the queue as the step found it; the
    step's 8 keys are enqueued once, after the step."""
    args = small_args(batch_size=8, accum=2, epochs=1, warmup=0)
    model = moco.build_model(args, 8)
    before = copy.deepcopy(model)
    run = make_run(args)
    opt = common.make_optimizer(args, [p for p in model.parameters() if p.requires_grad], torch.device("cpu"))
    a, b = images()
    moco.train_step(model, opt, [a, b], (lambda x: x, lambda x: x), run, 0)
    losses, keys = [], []
    for x in (a, b):  # the same losses from scratch, with the queue as it was
        h, q, _ = before(x)
        k = F.normalize(before.keys(x), dim=1)
        losses.append(moco.info_nce_queue(q, k, before.queue, args.temperature))
        keys.append(k)
    torch.testing.assert_close(run.meter.sums["loss"], (losses[0] + losses[1]).detach() / 2)
    torch.testing.assert_close(model.queue[:8], torch.cat(keys))
    assert torch.equal(model.queue[8:], before.queue[8:]) and int(model.queue_ptr) == 8


@pytest.mark.parametrize("method", ["moco", "simsiam"])
def test_accum_2_takes_the_same_step_as_one_big_batch(method):
    """--accum 2 at batch 2b and --accum 1 at batch 2b give the same update. BN in eval
    mode, so that a micro-batch's statistics cannot differ from the whole batch's."""
    import simsiam
    if method == "moco":
        module, args = moco, small_args(batch_size=8, epochs=1, warmup=0, lr=1.0)
    else:
        module, args = simsiam, simsiam.Args(batch_size=8, epochs=1, warmup=0, lr=1.0, proj_dim=16, pred_dim=8,
                                             dataset="synthetic")
    x = torch.randn(8, 3, 8, 8)
    same = (lambda x: x, lambda x: x)
    models = []
    for accum in (1, 2):
        run_args = dataclasses.replace(args, accum=accum)
        torch.manual_seed(3)
        model = module.build_model(run_args, 8).eval()
        opt = common.make_optimizer(run_args, [p for p in model.parameters() if p.requires_grad], torch.device("cpu"))
        module.train_step(model, opt, list(x.chunk(accum)), same, make_run(run_args), 0)
        models.append(model)
    for (name, p1), p2 in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("version", ["v2", "v3"])
def test_no_gradient_reaches_the_key_encoder(version):
    args = small_args(version)
    model = moco.build_model(args, 8)
    for _, k in key_pairs(model):
        k.requires_grad_(True)  # so only the no_grad key path can keep gradients out
    loss, _, _ = moco.compute_loss(model, *images(), args)
    loss.backward()
    for _, k in key_pairs(model):
        assert k.grad is None
    frozen = {"backbone.conv_proj.weight", "backbone.conv_proj.bias"} if version == "v3" else set()
    for name, p in model.named_parameters():
        if not name.startswith("key_"):
            assert (p.grad is None) == (name in frozen), name


def test_frozen_patch_projection_stays_put():
    args = small_args("v3")
    model = moco.build_model(args, 8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    conv = model.backbone.conv_proj.weight
    assert not conv.requires_grad and not any(p is conv for p in trainable)
    before = conv.clone()
    head = model.backbone.encoder.layers[0].mlp[0].weight.clone()
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.1)
    loss, _, _ = moco.compute_loss(model, *images(), args)
    loss.backward()
    opt.step()
    assert torch.equal(conv, before) and not torch.equal(model.backbone.encoder.layers[0].mlp[0].weight, head)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_gradscale_scales_the_gradient_of_q(version):
    # q is the projector output in v2 and the predictor output in v3: the gradient arriving
    # there with power 1 is the plain one times ||q_i|| (GradScale, embedding-norms paper).
    args = small_args(version)
    model = moco.build_model(args, 8)
    last = model.projector if version == "v2" else model.predictor[-1]
    x1, x2 = images()
    outputs, grads = [], {}

    def keep(module, inputs, out):  # record q and, during backward, the gradient that reaches it
        i = len(outputs)
        outputs.append(out.detach())
        out.register_hook(lambda g: grads.__setitem__(i, g))

    last.register_forward_hook(keep)
    for power in (0.0, 1.0):
        loss, _, _ = moco.compute_loss(copy.deepcopy(model), x1, x2, dataclasses.replace(args, power=power))
        loss.backward()
    n = len(outputs) // 2  # one (v2) or two (v3) query outputs per step
    assert n == (1 if version == "v2" else 2) and len(grads) == 2 * n
    for i in range(n):
        torch.testing.assert_close(outputs[i], outputs[n + i])
        torch.testing.assert_close(grads[n + i], grads[i] * outputs[i].norm(dim=1, keepdim=True))


def test_v3_vit_logs_the_norm_that_its_last_bn_hides():
    """On a ViT the predictor ends in BN without affine parameters: the batch mean of ||q||^2 is proj_dim (up to
    BN's eps) whatever the weights, so cut-init cannot shrink it. The norm before that BN shrinks, and is logged."""
    x1, x2 = images()
    logged = []
    for cut in (1.0, 3.0):
        args = small_args("v3", cut=cut)
        model = moco.build_model(args, 8)
        (_, q1, u1), (_, _, u2) = model(x1), model(x2)
        assert (q1 ** 2).sum(1).mean().item() == pytest.approx(args.proj_dim, rel=0.05)
        _, stats, _ = moco.compute_loss(model, x1, x2, args)
        logged.append(stats["pre_bn_norm_mean"].item())
        assert logged[-1] == pytest.approx(torch.cat([u1, u2]).norm(dim=1).mean().item(), rel=1e-5)
    assert logged[1] < logged[0] / 3


# ----------------------------------------------------------------------------- cut-init and BN

@pytest.mark.parametrize("version", ["v2", "v3"])
def test_cut_init_reaches_the_key_encoder_exactly(version):
    torch.manual_seed(1)
    plain = moco.build_model(small_args(version), 8)
    torch.manual_seed(1)
    cut = moco.build_model(small_args(version, cut=3.0), 8)
    for (name, p), p_plain in zip(cut.named_parameters(), plain.parameters()):
        if not name.startswith("key_"):
            assert torch.equal(p, p_plain / 3), name
    for q, k in key_pairs(cut):
        assert torch.equal(q, k)


@pytest.mark.parametrize("sync", [False, True])
def test_split_batchnorm_is_bn_per_sub_batch(sync, tmp_path):
    """Both paths, the fused one and the summed-over-ranks one (in a world of one process)."""
    if sync:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        check_split_batchnorm(ddp.SplitBatchNorm(3, splits=4, sync=sync))
    finally:
        if sync:
            torch.distributed.destroy_process_group()


def check_split_batchnorm(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    y = bn(x)
    chunks = x.chunk(4)
    ref = torch.cat([F.batch_norm(c, None, None, bn.weight, bn.bias, training=True) for c in chunks])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # Running statistics: one momentum-0.1 step from (0, 1) towards the sub-batches' mean statistics.
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var(dim=(0, 2, 3)) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.1 * means)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var)
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_shuffled_keys_come_back_in_image_order():
    # With one BN split the key encoder's output does not depend on the batch order.
    model = moco.build_model(small_args(bn_splits=1), 8)
    x = images(8)[0]  # 8! orders, so the shuffle is almost surely not the identity
    torch.testing.assert_close(model.keys(x, shuffle=True), model.keys(x), atol=1e-5, rtol=1e-5)
    split = moco.build_model(small_args(bn_splits=4), 8)
    assert sum(isinstance(m, ddp.SplitBatchNorm) for m in split.key_backbone.modules()) == 20  # ResNet-18's BNs


@pytest.mark.parametrize("size, low", [(32, 0.2), (64, 0.2), (96, 0.08)])
def test_v3_crops_from_a_fifth_of_small_images(size, low):
    # The MoCo v3 code's 8% is an ImageNet setting; at 32 px it leaves ~9 px (its ResNet recipes crop from 20%).
    assert [v.scale for v in moco.make_views(make_run(small_args("v3"), n=1, size=size))] == [(low, 1.0)] * 2


# ----------------------------------------------------------------------------- flags

def test_version_picks_the_defaults():
    def parse(*argv):
        return common.parse_args(moco.Args, moco.__doc__, argv, moco.defaults)
    v3 = parse("--version=v3")
    assert (v3.arch, v3.optimizer, v3.lr, v3.wd, v3.warmup, v3.proj_dim) == ("vit_small", "adamw", 1.5e-4, 0.1, 40, 256)
    v2 = parse()
    typed = parse("--version=v3", "--lr", "0.1")
    assert typed.lr == 0.1 and typed.wd == 0.1  # a typed flag wins; the rest follow --version
    assert (v2.version, v2.arch, v2.optimizer, v2.lr, v2.warmup, v2.proj_dim) == ("v2", "resnet18", "sgd", 0.03, 0, 128)
    assert parse("--version", "v3", "--dataset", "imagenet100").m == 0.99  # ImageNet's m and queue are v2's
    assert parse("--version", "v3", "--preset", "laptop").warmup == 1  # the preset wins over --version
    gradscale = parse("--version", "v3", "--power", "1")  # GradScale's lr is a sixth of v3's
    assert gradscale.lr == pytest.approx(1.5e-4 / 6) and gradscale.warmup == 100


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "12"], "must be a multiple of --bn-splits 8"),
    (["--queue", "8"], "--queue 8 must hold at least one batch of 16 keys"),
])
def test_bad_flags_are_one_sentence(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        safety.cli(lambda: moco.main([*TINY, "--out", str(tmp_path / "run"), *flags]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- end to end

def train_and_evaluate(tmp_path_factory, *flags):
    out = tmp_path_factory.mktemp("moco")
    r = run_main(moco.main, *TINY, *flags, "--out", out)
    assert r.returncode == 0, r.stderr
    # --accum 2 (v3 only): one warning that a micro-batch's in-batch negatives are fewer.
    assert r.stderr.count("warning: with --accum 2 each micro-batch of 8 images is its own contrastive batch, "
                          "with 7 negatives per query instead of 15") == ("--accum" in flags), r.stderr
    line = json.loads(open(out / "metrics.jsonl").read())
    for key in ("loss", "emb_norm_mean", "emb_norm_std", "feat_norm_mean", "collapse_std", "knn_top1"):
        assert isinstance(line[key], float) and math.isfinite(line[key]), key
    # Every analysis at the loss's embedding, k-NN top-1 on the backbone as logged in training.
    r = run_main(eval_knn.main, out / "last.pt", "--device", "cpu", "--json", out / "knn.json",
                 "--all", "--space", "loss", "--analyses", "knn:backbone", "--probe-epochs", "2")
    assert r.returncode == 0, r.stderr
    # eval_knn rebuilt the network from the checkpoint alone and finds the logged accuracy.
    assert f"moco epoch 1 on synthetic: weighted 200-NN top-1 = {line['knn_top1']:.2f}%" in r.stdout
    loss_space = "predictor" if "--version v3" in " ".join(flags) else "projector"  # v2 has no predictor
    analyses = json.load(open(out / "knn.json"))["analyses"]
    assert {k: v["space"] for k, v in analyses.items()} == dict.fromkeys(
        ["buckets", "novelty", "prototypes", "probe", "classes"], loss_space)
    return out, line, safety.load_checkpoint(str(out / "last.pt"))


def test_v2_end_to_end(tmp_path_factory):
    out, line, ckpt = train_and_evaluate(tmp_path_factory, "--version", "v2", "--queue", "24", "--cut", "3")
    # One step of 16 keys into 24 slots (the wrap-around is tested above).
    assert int(ckpt["model"]["queue_ptr"]) == 16 and ckpt["model"]["queue"].shape == (24, 128)
    assert ckpt["args"]["m"] == 0.99 and ckpt["args"]["version"] == "v2"
    with pytest.raises(safety.UsageError, match="has no predictor"):
        eval_knn.main([str(out / "last.pt"), "--device", "cpu", "--space", "predictor"])


def test_v3_end_to_end(tmp_path_factory):
    out, line, ckpt = train_and_evaluate(tmp_path_factory, "--version", "v3", "--arch", "vit_tiny", "--mlp-dim",
                                         "64", "--power", "1", "--accum", "2")
    assert line["pre_bn_norm_mean"] > 0  # the norm before the predictor's final BN, logged on a ViT
    assert ckpt["args"]["optimizer"] == "adamw" and "queue" not in ckpt["model"]
    # AdamW holds state only for trained parameters: not the key encoder, not the patch projection.
    model = moco.build_model(moco.Args(**ckpt["args"]), 16)
    assert model.backbone.encoder.layers[0].self_attention.num_heads == 3  # vit_tiny's
    assert len(ckpt["optimizer"]["state"]) == sum(p.requires_grad for p in model.parameters())
    assert torch.equal(ckpt["model"]["backbone.conv_proj.weight"], ckpt["model"]["key_backbone.conv_proj.weight"])
    result = eval_knn.main([str(out / "last.pt"), "--device", "cpu", "--space", "predictor", "--k", "5"])
    assert result["space"] == "predictor" and 0 <= result["knn_top1"] <= 100
