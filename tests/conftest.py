import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One intra-op thread, here and in the scripts the tests start: the models are tiny, and
# two OpenMP threads on a busy 2-core machine spin against each other and run many times
# slower than one.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_script(*argv, timeout=600):
    """Run one of the repo's scripts in a subprocess, as a user would."""
    import subprocess
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
