"""Where a CPU training step of the laptop recipe spends its time, with torch.profiler.

Builds a method as its main() does under `--preset laptop` (real Fashion-MNIST, a
ResNet-18 of 16 base channels, batch 256), runs a few of the script's own train_step calls
and reports the share of each part: the augmentation (both views), and the rest of the step
(forward, loss, backward, optimizer), and the images/s, with the options that
benchmarks/README.md compares: threads, width, channels-last and torch.compile.

    python benchmarks/profile_cpu.py                       # SimSiam, 6 timed steps
    python benchmarks/profile_cpu.py --method simclr --steps 10 --threads 2
"""
import argparse
import importlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import common  # noqa: E402
import datasets  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="simsiam", choices=("simclr", "simsiam", "byol", "moco"))
    p.add_argument("--steps", type=int, default=6, help="timed steps (after the --untimed ones)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (torch.set_num_threads)")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base channels (laptop: 16)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--subset", type=int, default=4096, help="images loaded (only batches are drawn from them)")
    p.add_argument("--channels-last", action="store_true", help="run the network in channels-last memory format")
    p.add_argument("--compile", action="store_true",
                   help="compile the backbone with torch.compile (inductor; needs a C++ compiler)")
    p.add_argument("--untimed", type=int, default=2, help="untimed steps first (compiling happens in the first)")
    p.add_argument("--extra", default="", help="more flags for the method, e.g. '--proj-dim 512'")
    return p.parse_args(argv)


def setup(a):
    module = importlib.import_module(a.method)
    args = common.parse_args(module.Args, module.__doc__, [
        "--preset", "laptop", "--width", str(a.width), "--batch-size", str(a.batch_size), "--data-dir", a.data_dir,
        "--subset", str(a.subset), "--device", "cpu", *a.extra.split()], defaults=getattr(module, "defaults", None))
    data = datasets.load_dataset(args.dataset, args.data_dir, False, args.subset)
    run = common.Run(a.method, args, torch.device("cpu"), data, *datasets.channel_stats(data.train_x), folder="")
    model = module.build_model(args, data.size)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if a.compile:
        model.backbone.compile()  # in place: every caller of the backbone gets the compiled forward
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = common.make_optimizer(args, params, run.device, nesterov=getattr(args, "nesterov", False))
    views = module.make_views(run) if hasattr(module, "make_views") else (run.augment(), run.augment())
    return module, run, model, optimizer, views


def timed_views(views, channels_last):
    """The method's views, each call labelled "augment" for the profiler."""
    def wrap(view):
        def call(x):
            with record_function("augment"):
                out = view(x)
                return out.contiguous(memory_format=torch.channels_last) if channels_last else out
        return call
    return tuple(wrap(v) for v in views)


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(a.threads)
    module, run, model, optimizer, views = setup(a)
    views = timed_views(views, a.channels_last)
    x = run.data.train_x
    n = a.untimed
    batches = [x[(i * a.batch_size) % (len(x) - a.batch_size):][: a.batch_size] for i in range(a.steps + n)]
    t0 = time.perf_counter()
    for i in range(n):  # untimed: first-call allocations, and compiling
        module.train_step(model, optimizer, [batches[i]], views, run, i)
    untimed = time.perf_counter() - t0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n, a.steps + n):
            with record_function("step"):
                module.train_step(model, optimizer, [batches[i]], views, run, i)
    seconds = (time.perf_counter() - t0) / a.steps
    events = {e.key: e.cpu_time_total for e in prof.key_averages()}
    share = events.get("augment", 0) / max(events.get("step", 1), 1)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    print(f"{a.method}, width {a.width}, batch {a.batch_size}, {a.threads} thread(s)"
          f"{', channels-last' if a.channels_last else ''}{', compiled' if a.compile else ''}: "
          f"{untimed:.0f} s for {n} untimed steps; {seconds:.3f} s/step under the profiler, "
          f"{a.batch_size / seconds:.0f} images/s; augmentation {100 * share:.1f} % of the step")
    return {"seconds_per_step": seconds, "images_per_second": a.batch_size / seconds, "augment_share": share}


if __name__ == "__main__":
    main()
