"""One optimizer step of a method on fixed inputs, run by tests/test_ddp.py once as a
single process and once under torchrun with 2 processes, which must agree; and each
script's main() in turn under one torchrun.

    python tests/ddp_worker.py steps METHOD=OUT.pt ...     # each method's steps, into its file
    python tests/ddp_worker.py scripts '[["simclr.py", "--epochs", "1", ...], ...]'

One torchrun for all of them: every start costs each process seconds of importing torch."""
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common
import ddp  # noqa: E402
import datasets  # noqa: E402
import moco  # noqa: E402
import safety  # noqa: E402
import simclr  # noqa: E402

B = 8  # the global batch


def main(method, out):
    rank, size, _ = ddp.init_distributed(cuda=False)
    b = B // size
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 3, 16, 16, generator=g)
    x1, x2 = x1[rank * b: (rank + 1) * b], x2[rank * b: (rank + 1) * b]  # this rank's share
    torch.manual_seed(0)  # the same initial network on every rank
    result = {}
    if method == "infonce":
        # The gathered-negatives gradient: each rank sees its rows of the full batch.
        z = torch.randn(2, B, 6, generator=g)[:, rank * b: (rank + 1) * b].clone().requires_grad_()
        simclr.info_nce(z[0], z[1], 0.5).backward()
        result["grad"] = common.gather(z.grad.transpose(0, 1).contiguous(), grad=False).transpose(0, 1)
        result["scaled"] = torch.tensor(float(size))
    else:
        randperm = torch.randperm
        if method == "simclr":
            module, args, sync = simclr, simclr.Args(proj_dim=16, batch_size=B, lr=1.0, warmup=0, epochs=1), True
        elif method == "moco-v3":
            # SGD: Adam would turn float noise in near-zero gradients into full-size steps.
            args = moco.Args(version="v3", arch="vit_tiny", mlp_dim=32, batch_size=B, lr=1.0, optimizer="sgd",
                             wd=0.1, proj_dim=256, warmup=0, epochs=1)  # v3's wd and proj_dim (moco.defaults)
            module, sync = moco, True
        else:  # moco-v2: --bn-splits 2 is split BN over 2 sub-batches in one process, per-rank BN on 2 ranks
            torch.randperm = lambda n, **kw: torch.arange(n, device=kw.get("device"))  # no shuffle: comparable keys
            args = moco.Args(queue=16, bn_splits=2, batch_size=B, warmup=0, epochs=1)
            module, sync = moco, False
        try:
            # A Run of 10 steps in all, so that step i is at progress i / 10, as the scripts' loops see it.
            images = torch.zeros(10 * B, 3, 16, 16, dtype=torch.uint8)
            data = datasets.Data("fixed", images, None, None, None, num_classes=1)
            run = common.Run(method, args, torch.device("cpu"), data, [0.5] * 3, [0.25] * 3, "", None, rank, size)
            model = common.prepare(module.build_model(args, 16), run, sync_bn=sync)
            opt = common.make_optimizer(args, [p for p in model.parameters() if p.requires_grad], run.device)
            views = (lambda pair: pair[0], lambda pair: pair[1])  # the batch is the pair of views itself
            for i in range(2):
                module.train_step(model, opt, [(x1, x2)], views, run, i)
        finally:
            torch.randperm = randperm  # a test may run this in its own process
        result.update({k: v for k, v in model.named_parameters()})
        for name in ("queue", "queue_ptr"):
            if hasattr(model, name):
                result[name] = getattr(model, name)
        if method == "moco-v2":  # the number of sub-batches each BN layer normalizes separately, on this rank
            result["bn_splits"] = torch.tensor([getattr(m, "splits", 1) for m in model.modules()
                                                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)])
        if sync:
            result.update({k: v for k, v in model.named_buffers() if "running" in k})
    if rank == 0:
        torch.save({k: v.detach() for k, v in result.items()}, out)


def scripts(runs):
    """Each [script, flags...] of runs in turn, its main() through safety.cli as `torchrun script.py flags` runs it.
    They share one process group: torch names a default group made again after destroy_process_group as it named
    the first, and under torchrun's one store the new group would read the old one's keys and wait forever. So the
    first script joins the group (ddp.init_distributed) and only the last one leaves it (common.finish)."""
    import torch.distributed as dist
    destroy = dist.destroy_process_group
    try:
        for i, (script, *argv) in enumerate(runs):
            dist.destroy_process_group = destroy if i == len(runs) - 1 else lambda group=None: None
            module = importlib.import_module(script[:-3])
            safety.cli(lambda: module.main(argv))
    finally:
        dist.destroy_process_group = destroy


if __name__ == "__main__":
    if sys.argv[1] == "scripts":
        scripts(json.loads(sys.argv[2]))
    else:
        for pair in sys.argv[2:]:
            main(*pair.split("=", 1))
        if "RANK" in os.environ:  # leave together: a rank that exits with the group open can abort in gloo's threads
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()
