"""The README's CPU quickstart, run as written (on a small budget): a newcomer with a fresh
clone gets a start line, a k-NN number, a norm, the paths of what was written, the next
command, and from eval_knn.py a norm analysis."""
import os
import re
import shlex

import pytest

from conftest import ROOT, run_script

FASHION = "/usr/share/datasets/fashion-mnist"
BUDGET = ["--subset", "256", "--epochs", "1", "--batch-size", "64"]  # typed after the README's flags, so they win


def quickstart_commands():
    """The commands of the fenced block right after '<!-- quickstart -->' in README.md."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- quickstart -->\s*```[a-z]*\n(.*?)```", text, re.S)
    assert block, "README.md has no quickstart block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.startswith("python ")]


def test_readme_quickstart_runs_and_says_what_it_did(tmp_path):
    if not os.path.isdir(FASHION):
        pytest.skip("dataset-fashion-mnist is not installed")
    train, evaluate = quickstart_commands()
    assert train[:2] == ["python", "simclr.py"] and "--preset" in train and evaluate[1] == "eval_knn.py"
    out = str(tmp_path / "quickstart")
    folder = train[train.index("--out") + 1]
    train = [out if a == folder else a for a in train]
    r = run_script(*train[1:], *BUDGET)
    assert r.returncode == 0, r.stderr
    start = r.stdout.splitlines()[0]
    assert start.startswith("simclr | fashionmnist: 256 train / 256 test images, 32 px | device ")
    assert f"run folder {out}" in start and "batch 64" in start and "warmup 1 of 1 epochs" in start
    assert "--preset laptop: --dataset fashionmnist" in r.stderr  # the preset says what it set
    done = re.search(r"done: k-NN top-1 ([\d.]+) %, embedding norm ([\d.]+), wall time \d+ s", r.stdout)
    assert done and float(done.group(2)) > 0, r.stdout
    assert float(done.group(1)) > 10  # above chance (10 classes) on real images, even after 4 steps
    assert f"wrote {out}/last.pt and {out}/metrics.jsonl" in r.stdout
    assert f"next: python eval_knn.py {out}/last.pt --all" in r.stdout
    evaluate = [out if a == folder else a.replace(folder, out) for a in evaluate]
    r = run_script(*evaluate[1:])
    assert r.returncode == 0, r.stderr
    assert "weighted 200-NN top-1" in r.stdout and "Spearman(norm bin, accuracy)" in r.stdout
    try:
        import matplotlib  # noqa: F401
        assert f"figure: {out}/figs/buckets.png" in r.stdout and os.path.exists(f"{out}/figs/buckets.png")
    except ImportError:
        assert "matplotlib is not installed" in r.stderr
