import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Two intra-op threads (a CI machine's 2 cores), here and in the scripts the tests start.
# On a machine busy with other work, OpenMP threads spin against each other and run many
# times slower than one: run the suite with OMP_NUM_THREADS=1 there.
os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_script(*argv, timeout=600, cwd=ROOT, threads=None):
    """Run one of the repo's scripts in a subprocess, as a user would."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def run_main(main, *argv, threads=None, cwd=ROOT):
    """main(argv) in this process, through safety.cli as a script's `if __name__ == "__main__"` runs it: the
    same exit status, stdout and stderr as run_script gives, without the 2-3 s a new interpreter spends
    importing torch. For every check that needs no process of its own; a signal, a kill, torchrun and one
    "as a user types it" check per behaviour do, and use run_script. Writes to the file descriptors
    themselves (C code, child processes) are not caught here."""
    import contextlib
    import io
    import subprocess
    import warnings
    import safety
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    here, before, code = os.getcwd(), torch.get_num_threads(), 0
    try:
        os.chdir(cwd)
        torch.set_num_threads(threads or int(os.environ["OMP_NUM_THREADS"]))  # as run_script's runs get
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # shown on its stderr, as a new interpreter's default filters show them
            for kind in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", kind)
            warnings.showwarning = lambda *w: err.write(warnings.formatwarning(*w[:4]))
            safety.cli(lambda: main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(before)
        os.chdir(here)
    return subprocess.CompletedProcess(argv, code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode())


def make_run(args, n=16, size=8, classes=2):
    """A common.Run over n random uint8 images on the CPU, for driving a script's train_step."""
    import common
    import datasets
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    data = datasets.Data("random", x, y, x, y, num_classes=classes)
    return common.Run("test", args, torch.device("cpu"), data, [0.5] * 3, [0.25] * 3, folder="")


def gradients_at_p(model, compute_loss, x1, x2, args_at, powers, after_backward=None):
    """Run compute_loss once per GradScale power, capturing the predictor
    output p of each view and the gradient that reaches it. Returns ({power: (loss,
    gradient at p (2B, D), stats)}, p of both views (2B, D), from the last run)."""
    outputs, grads = [], {}

    def capture(module, inputs, p):
        view = len(outputs)
        outputs.append(p.detach())
        p.register_hook(lambda g: grads.__setitem__(view, g))

    hook = model.predictor.register_forward_hook(capture)
    runs = {}
    for power in powers:
        outputs.clear(), grads.clear()
        model.zero_grad(set_to_none=True)
        loss, stats = compute_loss(model, x1, x2, args_at(power))
        loss.backward()
        if after_backward:
            after_backward()
        runs[power] = (loss.item(), torch.cat([grads[0], grads[1]]), stats)
    hook.remove()
    return runs, torch.cat(outputs)
