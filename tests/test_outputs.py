"""Output that cannot be written, in eval_knn.py and simulate.py (issue 30): every output path is checked before
any work, every file is written whole or not at all (safety.write_atomic), and an interrupt names what was written.

Each test builds its inputs, runs the script's main() in-process through safety.cli, as `python X.py` runs it, and
checks the exit status, the one stderr line, and that nothing that existed before was changed. As root, chmod cannot
make a folder read-only, so there a read-only folder is simulated: os.access says so, or the write fails with EROFS.
"""
import builtins
import errno
import hashlib
import importlib.util
import json
import os
import signal
import time

import pytest
import torch

from test_human import tiny_checkpoint

import eval_knn
import safety
import simulate

HAS_MPL = importlib.util.find_spec("matplotlib") is not None  # optional: without it simulate.py writes no PNG


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as simclr.py leaves it: last.pt (an untrained ResNet-18 on 16 px synthetic images), an older
    epoch1.pt, metrics.jsonl and args.json."""
    folder = tmp_path_factory.mktemp("outputs") / "run"
    folder.mkdir()
    tiny_checkpoint(folder / "last.pt", dataset="synthetic", subset=32)
    torch.save({"format": safety.FORMAT, "epoch": 0}, folder / "epoch1.pt")  # never loaded here: only its name counts
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 5.0, "knn_top1": None}) + "\n")
    (folder / "args.json").write_text(json.dumps({"format": safety.FORMAT, "method": "simclr", "args": {}}))
    return folder


@pytest.fixture(autouse=True)
def fresh_status(monkeypatch):
    """safety.STATUS as a new process starts with it: no run folder, nothing written yet."""
    for key in ("folder", "saved", "lock", "created", "args"):
        monkeypatch.setitem(safety.STATUS, key, None)
    monkeypatch.setitem(safety.STATUS, "written", [])


def snapshot(*folders):
    """Every entry under folders: a link's target, a file's size, mtime and MD5, or 'folder'."""
    out = {}
    for top in folders:
        for d, subdirs, files in os.walk(top):
            for name in subdirs + files:
                p = os.path.join(d, name)
                st = os.lstat(p)
                out[p] = os.readlink(p) if os.path.islink(p) else "folder" if os.path.isdir(p) else \
                    (st.st_size, st.st_mtime_ns, hashlib.md5(open(p, "rb").read()).hexdigest())
    return out


def cli(main, *argv):
    """main(argv) through safety.cli, as the script's `if __name__ == "__main__"` runs it: its exit status."""
    with pytest.raises(SystemExit) as e:
        safety.cli(lambda: main([str(a) for a in argv]))
    return e.value.code


def stderr_line(capsys, before_any_work=False):
    """The one line the command printed on stderr; before_any_work: and nothing on stdout."""
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not before_any_work or out == "", out  # eval_knn prints its k-NN table once it has worked
    return err.strip()


def temporaries(folder):
    return [f for f in os.listdir(folder) if ".tmp" in f]


def failing_open(error, after=0):
    """An open() for safety.write_atomic whose temporary file fails with `error` once `after` bytes are written:
    at once (a read-only mount refuses to create it) or mid-write (a disk that fills up)."""
    def fake(path, mode="r", *args, **kwargs):
        if ".tmp" not in os.path.basename(path):
            return builtins.open(path, mode, *args, **kwargs)
        if not after:
            raise OSError(error, os.strerror(error), path)
        fh = builtins.open(path, mode, *args, **kwargs)

        def write(data):
            type(fh).write(fh, data[:after])  # part of it lands, then the disk is full
            raise OSError(error, os.strerror(error))
        fh.write = write
        return fh
    return fake


def test_read_only_folder(run, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "landscape.json").write_text("previous")
    before = snapshot(run, tmp_path)
    ro.chmod(0o555)
    with monkeypatch.context() as m:
        if os.geteuid() == 0:  # root may write anywhere: the folder says no, as it does to anyone else
            access = os.access
            m.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(ro) else access(p, mode, **kw))
        # Checked before any work: eval_knn refuses the --json path, simulate.py its --out.
        assert cli(eval_knn.main, run / "last.pt", "--json", ro / "r.json", "--device", "cpu") == 2
        assert stderr_line(capsys, True) == f"error: --json {ro}/r.json: cannot write into {ro} (not a writable " \
                                            "folder); pick another"
        assert cli(simulate.main, "landscape", "--quick", "--out", ro) == 2
        assert stderr_line(capsys, True) == f"error: cannot write into --out {ro} (permission denied) (see --help)"
    ro.chmod(0o755)
    # A folder that only the write finds read-only (a read-only mount, as root): exit 1 and the old file kept.
    monkeypatch.setattr(safety, "open", failing_open(errno.EROFS), raising=False)
    assert cli(simulate.main, "landscape", "--quick", "--out", ro) == 1
    err = stderr_line(capsys)
    assert err.startswith(f"error: could not write {ro}/landscape.csv (") and "Read-only file system" in err, err
    assert err.endswith("nothing was saved"), err
    assert snapshot(run, tmp_path) == before and temporaries(ro) == []


def test_folder_where_a_file_goes(run, tmp_path, capsys):
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "grid.png").mkdir()
    (tmp_path / "file").write_text("kept")
    (tmp_path / "sim" / "landscape.csv").mkdir(parents=True)
    before = snapshot(run, tmp_path)
    ckpt = run / "last.pt"
    for flags, says in [(["--json", tmp_path / "folder.json"], f"--json {tmp_path}/folder.json is a folder; give a "
                                                               "file name"),
                        (["--prototypes-out", tmp_path / "grid.png"], f"--prototypes-out {tmp_path}/grid.png is a "
                                                                      "folder; give a file name"),
                        (["--json", tmp_path / "file" / "r.json"], f"--json {tmp_path}/file/r.json: cannot write into "
                                                                   f"{tmp_path}/file (not a writable folder)"),
                        (["--figures", tmp_path / "file"], f"--figures {tmp_path}/file is a file; give a folder")]:
        assert cli(eval_knn.main, ckpt, *flags, "--device", "cpu") == 2
        assert stderr_line(capsys, True).startswith(f"error: {says}")
    # simulate.py: a file in the way of --out before any work; a folder where an output goes stops its write.
    assert cli(simulate.main, "landscape", "--quick", "--out", tmp_path / "file" / "sub") == 2
    assert stderr_line(capsys, True).startswith(f"error: cannot use --out {tmp_path}/file/sub as the output folder "
                                                "(Not a directory)")
    assert cli(simulate.main, "landscape", "--quick", "--out", tmp_path / "sim") == 1
    err = stderr_line(capsys)
    assert err.startswith(f"error: could not write {tmp_path}/sim/landscape.csv (") and "Is a directory" in err, err
    assert snapshot(run, tmp_path) == before and temporaries(tmp_path / "sim") == []


def test_full_disk(run, tmp_path, monkeypatch, capsys):
    js = tmp_path / "r.json"
    js.write_text("previous numbers")
    out = tmp_path / "sim"
    out.mkdir()
    for ext in ("csv", "json", "png"):
        (out / f"landscape.{ext}").write_text(f"previous {ext}")
    before = snapshot(run, tmp_path)
    monkeypatch.setattr(safety, "open", failing_open(errno.ENOSPC, after=10), raising=False)
    assert cli(eval_knn.main, run / "last.pt", "--json", js, "--device", "cpu", "--k", "5") == 1
    assert stderr_line(capsys) == f"error: could not write {js} ([Errno 28] No space left on device); the previous " \
                                  "r.json is intact"
    assert cli(simulate.main, "landscape", "--quick", "--out", out) == 1
    assert stderr_line(capsys) == f"error: could not write {out}/landscape.csv ([Errno 28] No space left on device); " \
                                  "the previous landscape.csv is intact"
    assert snapshot(run, tmp_path) == before  # no cut-off file: the previous ones keep their bytes
    assert temporaries(tmp_path) == [] and temporaries(out) == []


@pytest.mark.parametrize("name", ["grid", "grid.jpg", "grid.pdf"])
def test_image_path_without_a_png_extension(run, tmp_path, capsys, name):
    before = snapshot(run, tmp_path)
    assert cli(eval_knn.main, run / "last.pt", "--prototypes-out", tmp_path / name, "--device", "cpu") == 2
    assert stderr_line(capsys, True) == f"error: --prototypes-out {tmp_path / name}: the grid is saved as a PNG, so " \
                                        "name it *.png"
    assert snapshot(run, tmp_path) == before


def test_json_through_a_link_onto_a_runs_own_file(run, tmp_path, capsys):
    ckpt = run / "last.pt"
    for own in ("metrics.jsonl", "last.pt", "epoch1.pt", "args.json"):
        (tmp_path / f"{own}.json").symlink_to(run / own)
    (tmp_path / "grid.png").symlink_to(run / "last.pt")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere.json").symlink_to(tmp_path / "notes.txt")
    before = snapshot(run, tmp_path)
    for own in ("metrics.jsonl", "last.pt", "epoch1.pt", "args.json"):
        link = tmp_path / f"{own}.json"
        assert cli(eval_knn.main, ckpt, "--json", link, "--device", "cpu") == 2
        assert stderr_line(capsys, True) == f"error: --json {link} would overwrite {run / own}, a run's own file; " \
                                            "choose another path"
    assert cli(eval_knn.main, ckpt, "--prototypes-out", tmp_path / "grid.png", "--device", "cpu") == 2
    assert stderr_line(capsys, True) == f"error: --prototypes-out {tmp_path}/grid.png would overwrite {ckpt}, a " \
                                        "run's own file; choose another path"
    assert snapshot(run, tmp_path) == before
    # A link to any other file is replaced by the new file, never written through: its target keeps its bytes.
    eval_knn.main([str(ckpt), "--json", str(tmp_path / "elsewhere.json"), "--device", "cpu", "--k", "5"])
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "elsewhere.json").is_symlink()
    assert json.loads((tmp_path / "elsewhere.json").read_text())["epoch"] == 1


def interrupt(signum):
    """The signal, sent to this process as Ctrl-C (SIGINT) or kill (SIGTERM) would send it."""
    def handler(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the signal's handler raises KeyboardInterrupt here
        raise AssertionError(f"signal {signum} was not delivered")
    return handler


def test_interrupt_after_a_figure_was_written(run, tmp_path, monkeypatch, capsys):
    grid, js = tmp_path / "grid.png", tmp_path / "r.json"
    before = snapshot(run)
    # eval_knn: the grid is written; Ctrl-C comes in the middle of writing --json, which is then not left cut off.
    with monkeypatch.context() as m:
        m.setattr(json, "dump", lambda obj, fh, **kw: (fh.write("{"), interrupt(signal.SIGINT)()))
        assert cli(eval_knn.main, run / "last.pt", "--analyses", "prototypes", "--prototypes-out", grid, "--json", js,
                   "--device", "cpu", "--k", "5") == 130
    assert stderr_line(capsys) == f"interrupted; wrote {grid} before it"
    assert grid.exists() and os.listdir(tmp_path) == ["grid.png"] and snapshot(run) == before
    # simulate.py all: landscape's files are written, then SIGTERM stops the next subcommand.
    out, landscape = tmp_path / "sim", simulate.SUBCOMMANDS["landscape"]
    monkeypatch.setattr(simulate, "SUBCOMMANDS", {"landscape": landscape, "norms": (interrupt(signal.SIGTERM), "")})
    assert cli(simulate.main, "all", "--quick", "--out", out) == 143
    files = [f"landscape.{ext}" for ext in ("csv", "json", "png")[:2 + HAS_MPL]]
    assert stderr_line(capsys) == f"terminated (SIGTERM); wrote {', '.join(f'{out}/{f}' for f in files)} before it"
    assert sorted(os.listdir(out)) == sorted(files)
    # Stopped before its first file: nothing was written, and the message says so.
    safety.STATUS["written"] = []
    assert cli(simulate.main, "norms", "--quick", "--out", out) == 143
    assert stderr_line(capsys) == "terminated (SIGTERM); nothing was written"
