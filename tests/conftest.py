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
