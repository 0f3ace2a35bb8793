"""Bad input and faults. The project rule: every one ends with one sentence on stderr that
names the flag or file and what to do, exit status 2 for usage errors, no traceback, and
no file changed that held good data.

A section runs the real script as a subprocess once for each new exit path, checking the
whole of it (status 2, one 'error: ' line naming the culprit, no traceback, files
byte-identical), and checks its other cases in-process through the function that raises
the UsageError, or through main() and safety.cli (conftest.run_main), which is much faster
(a subprocess spends seconds importing torch). Section 7 starts a process only where one
is needed: for a signal to stop, or to hold the folder's lock. To add a section, follow
that pattern under a new heading:

    1. checkpoints read by eval_knn.py: the method module, field types, weights
    2. CIFAR batch pickles that would run code when loaded
    3. labels and images that do not fit the dataset (cifar, fashionmnist, folder layouts)
    4. idx files: gzip bombs, absurd headers, short files, image and label counts
    5. --download without network
    6. flag values, checked before any folder exists (and eval_knn.py's output paths)
    7. faults during a run: NaN weights, a second run on the same folder, SIGTERM and
       Ctrl-C mid-epoch and mid-save, a full disk; each run is then resumed to the end
    8. dead ends: a folder without a checkpoint, a damaged metrics.jsonl, a finished run
"""
import dataclasses
import gzip
import os
import pickle
import re
import shlex
import struct
import tracemalloc
import urllib.error

import numpy as np
import pytest
import torch

import common
import safety
import datasets
import eval_knn
import simclr
from conftest import run_main, run_script
from test_data import publish_cifar, publish_flowers, save_jpeg, write_cifar, write_fashion, write_flowers, write_idx


def snapshot(folder):
    """Every file under folder with its bytes, to show afterwards that nothing was changed."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = fh.read()
    return out


def assert_refused(result, *names):
    """Exit status 2, no traceback, and stderr ending in one 'error: ' sentence that names
    each of `names`; returns that sentence."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def train(data_dir, tmp_path, *flags):
    """simclr.py on a dataset folder, as a user would start it; the run folder is in tmp_path."""
    return run_script("simclr.py", "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--epochs", "1",
                      "--device", "cpu", *flags, threads=1)


# ----------------------------------------------------------------------------- 1. checkpoints

@pytest.fixture(scope="module")
def good_ckpt():
    """A checkpoint as the scripts write it, for a small SimCLR (16 px synthetic images)."""
    args = simclr.Args(dataset="synthetic", proj_dim=8)
    return {"format": safety.FORMAT, "method": "simclr", "args": dataclasses.asdict(args), "epoch": 3,
            "img_size": 16, "num_classes": 4, "data_stats": [[0.5, 0.4, 0.3], [0.25, 0.2, 0.2]],
            "model": simclr.build_model(args, 16).state_dict()}


def test_eval_knn_imports_no_module_a_checkpoint_names(tmp_path, monkeypatch):
    # A module on sys.path that leaves a marker when imported: a checkpoint naming it must
    # be refused before anything is imported.
    marker = tmp_path / "imported"
    (tmp_path / "normssl_marker.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    path = tmp_path / "crafted.pt"
    torch.save({"format": safety.FORMAT, "method": "normssl_marker", "epoch": 1}, path)
    before = snapshot(tmp_path)
    message = assert_refused(run_script("eval_knn.py", str(path), "--device", "cpu", threads=1),
                             str(path), "'method' must be one of simclr, simsiam, byol, moco", "refusing to load it")
    assert not marker.exists() and snapshot(tmp_path) == before
    assert message == (f"error: {path} is not a valid normssl checkpoint: 'method' must be one of simclr, simsiam, "
                       "byol, moco but is 'normssl_marker'; refusing to load it (use a last.pt or epoch<N>.pt that "
                       "a method script wrote)")
    # The control: importing the module does leave the marker, so the test above can fail.
    run_script("-c", "import normssl_marker")
    assert marker.exists()


DELETE = object()  # a value for changed(): remove the field
NAN = float("nan")


def changed(ckpt, field, value):
    """ckpt with field set to value ('args.lr' for a flag; value DELETE removes the field)."""
    out = {**ckpt, "args": dict(ckpt["args"]), "model": dict(ckpt["model"])}
    where, key = (out["args"], field[5:]) if field.startswith("args.") else \
        (out["model"], field[6:]) if field.startswith("model.") else (out, field)
    if value is DELETE:
        del where[key]
    else:
        where[key] = value
    return out


# (field, crafted value, what the sentence must say): safety.check_checkpoint.
BAD_FIELDS = [
    ("method", "antigravity", "'method' must be one of simclr, simsiam, byol, moco but is 'antigravity'"),
    ("method", "os", "'method' must be one of simclr, simsiam, byol, moco but is 'os'"),
    ("method", ["simclr"], "'method' must be one of simclr, simsiam, byol, moco but is ['simclr']"),
    ("method", DELETE, "'method' must be one of simclr, simsiam, byol, moco but is None"),
    ("epoch", -1, "'epoch' must be an int >= 0 but is -1"),
    ("epoch", 2.5, "'epoch' must be an int >= 0 but is 2.5"),
    ("epoch", True, "'epoch' must be an int >= 0 but is True"),
    ("epoch", "3", "'epoch' must be an int >= 0 but is '3'"),
    ("img_size", 0, "'img_size' must be a positive int but is 0"),
    ("img_size", 16.0, "'img_size' must be a positive int but is 16.0"),
    ("num_classes", -4, "'num_classes' must be a positive int but is -4"),
    ("data_stats", [[0.5] * 3], "'data_stats' must be [mean, std] with 3 finite numbers each and std > 0"),
    ("data_stats", [[0.5] * 3, [0.2] * 2], "'data_stats' must be [mean, std]"),
    ("data_stats", [[NAN] * 3, [0.2] * 3], "'data_stats' must be [mean, std]"),
    ("data_stats", [[0.5] * 3, [0.2, 0.0, 0.2]], "'data_stats' must be [mean, std]"),
    ("data_stats", [["0.5"] * 3, [0.2] * 3], "'data_stats' must be [mean, std]"),
    ("args", "--lr 0.3", "'args' must be a dict of flag names to values but is '--lr 0.3'"),
    ("args", {1: 2}, "'args' must be a dict of flag names to values but is {1: 2}"),
    ("model", {}, "'model' must be a dict of parameter names to tensors but is {}"),
    ("model", [torch.zeros(1)], "'model' must be a dict of parameter names to tensors but is [tensor([0.])]"),
    ("model.projector.0.bias", [0.0] * 512, "must be a dict of parameter names to dense CPU tensors but is "
                                            "[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ...] at 'projector.0.bias'"),
    ("model.projector.0.bias", torch.zeros(512, device="meta"), "but is a torch.strided meta tensor"),
    ("model.projector.0.bias", torch.zeros(512).to_sparse(), "but is a torch.sparse_coo cpu tensor"),
]


@pytest.mark.parametrize("field,value,says", BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_FIELDS])
def test_checkpoint_fields_are_checked(good_ckpt, field, value, says):
    with pytest.raises(safety.UsageError, match="^x.pt is not a valid normssl checkpoint: ") as e:
        safety.check_checkpoint(changed(good_ckpt, field, value), "x.pt")
    assert says in str(e.value) and str(e.value).endswith("refusing to load it (use a last.pt or epoch<N>.pt "
                                                          "that a method script wrote)")


# (field, crafted value, what the sentence must say): eval_knn.load_model, past check_checkpoint.
BAD_NETWORKS = [
    ("args.lr", "fast", "'args.lr' must be a float but is 'fast'"),
    ("args.lr", NAN, "holds a flag value the command line refuses: --lr must be a finite number (got nan)"),
    ("args.cut", True, "'args.cut' must be a float but is True"),
    ("args.proj_dim", 8.0, "'args.proj_dim' must be an int but is 8.0"),
    ("args.download", 1, "'args.download' must be a bool but is 1"),
    ("args.arch", "resnet9000", "holds a flag value the command line refuses: --arch must be one of resnet18, "
                                "resnet50, vit_tiny, vit_small (got 'resnet9000')"),
    ("args.dataset", 10, "'args.dataset' must be a str but is 10"),
    ("args.proj_dim", 4, "does not match the simclr network its flags describe: 'projector.2.weight' is a "
                         "torch.float32 tensor of shape (8, 512) where the network has torch.float32 (4, 512)"),
    ("args.proj_dim", 10 ** 12, "'projector.2.weight' is a torch.float32 tensor of shape (8, 512) where the network "
                                "has torch.float32 (1000000000000, 512)"),  # 4 PB: built on the meta device only
    ("args.proj_dim", -5, "holds a flag value the command line refuses: --proj-dim must be positive (got -5)"),
    ("args.arch", "vit_tiny", "does not match the simclr network its flags describe: it lacks"),
    ("model.projector.2.bias", DELETE, "it lacks 'projector.2.bias' (1 missing, 0 unexpected tensors)"),
    ("model.head.weight", torch.zeros(3), "it has an unexpected 'head.weight' (0 missing, 1 unexpected tensors)"),
    ("model.projector.2.bias", torch.zeros(9), "'projector.2.bias' is a torch.float32 tensor of shape (9,) where"),
    ("model.projector.2.bias", torch.zeros(8, dtype=torch.long), "'projector.2.bias' is a torch.int64 tensor"),
]


@pytest.mark.parametrize("field,value,says", BAD_NETWORKS, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_NETWORKS])
def test_load_model_checks_flags_and_weights(good_ckpt, monkeypatch, field, value, says):
    # The file itself is read by load_checkpoint (tested in test_common and above); here the
    # crafted dict goes straight to the checks that load_model adds.
    monkeypatch.setattr(safety, "load_checkpoint", lambda path: changed(good_ckpt, field, value))
    with pytest.raises(safety.UsageError, match="^x.pt ") as e:
        eval_knn.load_model("x.pt")
    assert says in str(e.value) and "; refusing to load it" in str(e.value), str(e.value)


def test_load_model_accepts_ints_for_floats_and_fills_missing_flags(good_ckpt, monkeypatch):
    ckpt = changed(changed(good_ckpt, "args.lr", 1), "args.temperature", DELETE)
    ckpt["args"]["from_a_newer_version"] = [1, 2]  # unknown flags are ignored
    monkeypatch.setattr(safety, "load_checkpoint", lambda path: ckpt)
    model, loaded = eval_knn.load_model("x.pt")
    assert loaded["args"]["lr"] == 1.0 and loaded["args"]["temperature"] == 0.5  # the default
    assert torch.equal(model.projector[2].weight, good_ckpt["model"]["projector.2.weight"])


# ----------------------------------------------------------------------------- 2. pickled code in CIFAR files

class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def cifar_batch(n=4, labels=None, data=None):
    rng = np.random.default_rng(0)
    return {"batch_label": "training batch 1 of 5",
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
            "labels": rng.integers(0, 10, n).tolist() if labels is None else labels,
            "filenames": [f"img{i}.png" for i in range(n)]}


def rewrite(path, obj, protocol=2):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    # The real script, unpatched: no file written here has a published MD5 checksum, and the
    # first one torchvision checks is the one that carries the payload.
    marker = tmp_path / "pwned"
    write_cifar(tmp_path / "data", "cifar10")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    rewrite(batch, {**cifar_batch(), "data": Payload(marker)})
    before = snapshot(tmp_path)
    assert_refused(train(tmp_path / "data", tmp_path, "--dataset", "cifar10"),
                   f"{batch} is not the published cifar10 file", "delete it and download cifar10 again")
    assert not marker.exists(), "the pickle's payload ran"
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
    # The control: plain pickle.load does run it.
    with open(batch, "rb") as fh:
        pickle.load(fh, encoding="latin1")
    assert marker.exists()


@pytest.mark.parametrize("file", ["test_batch", "batches.meta"])
def test_a_changed_cifar_file_is_refused_unread(tmp_path, monkeypatch, file):
    # Every other file is taken for the published one; the payload goes in the last batch
    # torchvision checks, or in the meta file, which it unpickles after the batches.
    marker = tmp_path / "pwned"
    write_cifar(tmp_path, "cifar10")
    publish_cifar(monkeypatch, tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / file
    rewrite(path, {**cifar_batch(), "data": Payload(marker)})
    with pytest.raises(safety.UsageError) as e:
        datasets.load_dataset("cifar10", str(tmp_path))
    assert str(e.value) == (f"{path} is not the published cifar10 file (its MD5 checksum differs), so it is not "
                            "read; delete it and download cifar10 again")
    assert not marker.exists(), "the pickle's payload ran"


# ----------------------------------------------------------------------------- 3. labels and image shapes

def test_cifar_label_out_of_range(tmp_path, monkeypatch):
    # In-process: simclr.py's exit path for a bad CIFAR file is the one section 2 runs. The
    # published files hold no such label, so a file that does is refused by its checksum.
    write_cifar(tmp_path, "cifar10")
    publish_cifar(monkeypatch, tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    rewrite(batch, cifar_batch(labels=[0, 1, 10, 2]))
    before = snapshot(tmp_path)
    with pytest.raises(safety.UsageError) as e:
        datasets.load_dataset("cifar10", str(tmp_path))
    assert str(e.value) == (f"{batch} is not the published cifar10 file (its MD5 checksum differs), so it is not "
                            "read; delete it and download cifar10 again")
    assert snapshot(tmp_path) == before


BAD_BATCHES = [  # (dataset, a batch that does not fit it); none of them is a published file
    ("cifar10", cifar_batch(labels=[0, -1, 2, 3])),
    ("cifar100", {**cifar_batch(labels=[0, 99, 100, 3]), "fine_labels": [0, 99, 100, 3]}),
    ("cifar10", cifar_batch(labels=[0, 1, 2])),
    ("cifar10", cifar_batch(labels=[0.5, 1, 2, 3])),
    ("cifar10", cifar_batch(labels=[[0, 1], [2, 3]])),
    ("cifar10", cifar_batch(data=np.zeros((4, 1024), np.uint8))),
    ("cifar10", cifar_batch(data=np.zeros(4 * 3072, np.uint8))),
    ("cifar10", cifar_batch(data=np.zeros((4, 3072), np.float32))),
    ("cifar10", cifar_batch(data=[[0] * 3072] * 4)),
]


def test_cifar_batches_that_do_not_fit_are_refused(tmp_path, monkeypatch):
    for i, (name, batch) in enumerate(BAD_BATCHES):
        write_cifar(tmp_path / str(i), name)
        publish_cifar(monkeypatch, tmp_path / str(i), name)
        path = tmp_path / str(i) / ("cifar-10-batches-py/data_batch_1" if name == "cifar10" else
                                    "cifar-100-python/train")
        rewrite(path, batch)
        with pytest.raises(safety.UsageError, match=f"^{re.escape(str(path))} is not the published {name} file") as e:
            datasets.load_dataset(name, str(tmp_path / str(i)))
        assert str(e.value).endswith(f"delete it and download {name} again"), str(e.value)


def test_fashionmnist_labels_out_of_range(tmp_path):
    write_fashion(str(tmp_path))
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.array([0, 10, 3]), gz=True)
    with pytest.raises(safety.UsageError, match=r"t10k-labels-idx1-ubyte.gz holds label 10, outside the 10 classes "
                                                r"0 to 9; fetch it again$"):
        datasets.load_dataset("fashionmnist", str(tmp_path))


def test_fashionmnist_images_of_the_wrong_shape(tmp_path):
    write_fashion(str(tmp_path))
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), np.zeros((6, 32, 32)), gz=True)
    with pytest.raises(safety.UsageError, match=r"train-images-idx3-ubyte.gz is not a valid idx file \(it holds an "
                                                r"array of shape \(6, 32, 32\), not \(N, 28, 28\)\)"):
        datasets.load_dataset("fashionmnist", str(tmp_path))
    write_fashion(str(tmp_path))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros((6, 1)), gz=True)  # rank 2 labels
    with pytest.raises(safety.UsageError, match=r"not \(N\)\)"):
        datasets.load_dataset("fashionmnist", str(tmp_path))


def tiny_imagenet(root):
    os.makedirs(root / "val" / "images")
    (root / "wnids.txt").write_text("n01\nn02\n")
    lines = []
    for i, w in enumerate(("n01", "n02")):
        save_jpeg(str(root / "train" / w / "images" / f"{w}_0.JPEG"), (200 * i, 0, 0), (64, 64))
        save_jpeg(str(root / "val" / "images" / f"val_{i}.JPEG"), (200 * i, 0, 0), (64, 64))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_folder_dataset_cache_with_bad_labels_is_decoded_again(tmp_path, capsys):
    root = tmp_path / "tiny-imagenet-200"
    tiny_imagenet(root)
    good = datasets.load_dataset("tinyimagenet", str(tmp_path))
    cache = root / "normssl_cache_64.pt"
    d = torch.load(cache, weights_only=True)
    torch.save({**d, "train_y": torch.tensor([0, 7])}, cache)  # class 7 of 2
    again = datasets.load_dataset("tinyimagenet", str(tmp_path))
    assert f"ignoring the cache {cache}, which holds label 7, outside the 2 classes 0 to 1" in capsys.readouterr().err
    assert torch.equal(again.train_y, good.train_y) and torch.equal(again.train_x, good.train_x)
    torch.save({**d, "test_x": d["test_x"][:, :, :32]}, cache)  # not square
    datasets.load_dataset("tinyimagenet", str(tmp_path))
    assert "holds images as torch.uint8 (2, 3, 32, 64), not uint8 N x 3 x 64 x 64" in capsys.readouterr().err


def test_folder_dataset_with_a_broken_image(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            save_jpeg(str(tmp_path / split / c / "0.JPEG"), (0, 200, 0), (40, 30))
    (tmp_path / "train" / "b" / "0.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(safety.UsageError, match=f"^{re.escape(str(tmp_path))}/train/b/0.JPEG is not a readable "
                                                r"image \(UnidentifiedImageError\); replace it"):
        datasets.load_dataset("imagenet100", str(tmp_path))


def test_flowers102_labels_out_of_range(tmp_path, monkeypatch):
    # A label outside the 102 classes, or an image id outside imagelabels.mat, is in no
    # published .mat file: the file that holds one is refused by its checksum.
    root = tmp_path / "flowers-102"
    write_flowers(root, [1, 1, 2], {"trnid": [1], "valid": [2], "tstid": [3]})
    publish_flowers(monkeypatch, root)
    write_flowers(root, [1, 103, 2], {"trnid": [1], "valid": [2], "tstid": [3]})
    with pytest.raises(safety.UsageError, match=f"^{re.escape(str(root))}/imagelabels.mat is not the published "
                                                "flowers102 file .*; delete it and download flowers102 again$"):
        datasets.load_dataset("flowers102", str(tmp_path))
    write_flowers(root, [1, 1, 2], {"trnid": [1], "valid": [2], "tstid": [4]})
    with pytest.raises(safety.UsageError, match=f"^{re.escape(str(root))}/setid.mat is not the published flowers102"):
        datasets.load_dataset("flowers102", str(tmp_path))


# ----------------------------------------------------------------------------- 4. idx files

def gzip_bomb(path, header, gigabytes):
    """A valid idx header followed by `gigabytes` of zeros, gzipped to about 1 MB per GB:
    one 16 MB member of zeros written again and again (gzip readers join the members)."""
    zeros = gzip.compress(bytes(2 ** 24), compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(header))
        for _ in range(gigabytes * 64):
            fh.write(zeros)


def test_fashionmnist_gzip_bomb_stops_the_script(tmp_path):
    write_fashion(str(tmp_path / "data"))
    bomb = tmp_path / "data" / "train-images-idx3-ubyte.gz"
    gzip_bomb(bomb, struct.pack(">HBBIII", 0, 8, 3, 6, 28, 28), gigabytes=4)
    before = snapshot(tmp_path)
    assert_refused(train(tmp_path / "data", tmp_path, "--dataset", "fashionmnist"),
                   f"{bomb} is not a valid idx file (it goes on past the 4704 bytes of data its header promises); "
                   "delete it and fetch it again")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


BAD_IDX = [  # (header, payload bytes after it, what the sentence must say)
    (struct.pack(">HBBIII", 0, 8, 3, 100000, 100000, 100000), b"", "its header claims 1000000000000000 values, "
                                                                    "more than the 100000000 this reader accepts"),
    (struct.pack(">HBBIII", 0, 8, 3, 60000, 28, 28), bytes(1000),
     "it ends after 1000 of the 47040000 bytes of its data"),
    (struct.pack(">HBBIII", 0, 8, 3, 6, 28, 28), bytes(6 * 784 + 1), "it goes on past the 4704 bytes"),
    (struct.pack(">HBBIII", 0x0801, 8, 3, 6, 28, 28), bytes(6 * 784), "its magic number is not that of an idx file"),
    (struct.pack(">HBBIII", 0, 0x0D, 3, 6, 28, 28), bytes(6 * 784 * 4), "its magic number is not that of an idx file"),
    (struct.pack(">HBBI", 0, 8, 3, 6), b"", "it ends after 4 of the 12 bytes of its header"),
    (b"\x00\x00", b"", "it ends after 2 of the 4 bytes of its header"),
]


@pytest.mark.parametrize("header,payload,says", BAD_IDX, ids=[s[:30] for _, _, s in BAD_IDX])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_header_is_checked_before_the_data_is_read(tmp_path, header, payload, says, gz):
    path = str(tmp_path / ("images.gz" if gz else "images"))
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(header + payload)
    with pytest.raises(safety.UsageError, match=f"^{re.escape(path)} is not a valid idx file") as e:
        datasets.read_idx(path)
    assert says in str(e.value)


def test_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    path = str(tmp_path / "bomb.gz")
    gzip_bomb(path, struct.pack(">HBBIII", 0, 8, 3, 6, 28, 28), gigabytes=8)
    tracemalloc.start()
    with pytest.raises(safety.UsageError, match="goes on past the 4704 bytes"):
        datasets.read_idx(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 ** 26  # under 64 MB of the 8 GB it would inflate to


def test_fashionmnist_image_and_label_counts_must_agree(tmp_path):
    write_fashion(str(tmp_path))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(5), gz=True)
    with pytest.raises(safety.UsageError) as e:
        datasets.load_dataset("fashionmnist", str(tmp_path))
    assert str(e.value) == (f"{tmp_path}/train-images-idx3-ubyte.gz holds 6 images but "
                            f"{tmp_path}/train-labels-idx1-ubyte.gz holds 5 labels; fetch both files again")


# ----------------------------------------------------------------------------- 5. --download without network

OFFLINE = ("or work offline on Fashion-MNIST: apt-get install dataset-fashion-mnist, then --dataset fashionmnist "
           "--data-dir /usr/share/datasets/fashion-mnist")


def test_download_without_network_stops_the_script_and_cleans_up(tmp_path, monkeypatch):
    # No network: every URL goes to a proxy on a closed local port, so the refusal is instant.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "")
    (tmp_path / "keep.txt").write_text("results\n")
    before = snapshot(tmp_path)
    data_dir = tmp_path / "new" / "data"
    message = assert_refused(train(data_dir, tmp_path, "--dataset", "cifar10", "--download"),
                             "could not download cifar10 (", f"in {data_dir}/cifar-10-batches-py by hand",
                             "--no-download")
    assert message.endswith(OFFLINE)
    assert not (tmp_path / "new").exists() and not (tmp_path / "run").exists()  # the folder it made is gone
    assert snapshot(tmp_path) == before


def no_network(files, error=urllib.error.URLError("[Errno -3] Temporary failure in name resolution")):
    """Stands in for a torchvision dataset class's download(): creates what a download starts
    with, the folders and a partial archive, then fails as urllib does without network."""
    def download(dataset):
        for f in files:
            os.makedirs(os.path.dirname(os.path.join(dataset.root, f)), exist_ok=True)
            with open(os.path.join(dataset.root, f), "wb") as fh:
                fh.write(b"partial")
        raise error
    return download


def test_failed_download_keeps_what_was_there(tmp_path, monkeypatch):
    # data_dir and FashionMNIST/ existed, with files in them; raw/ and the archives are new.
    os.makedirs(tmp_path / "FashionMNIST")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "FashionMNIST" / "README").write_text("also mine\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download", no_network(
        ["FashionMNIST/raw/train-images-idx3-ubyte.gz", "FashionMNIST/partial.tmp", "stray.tmp"],
        RuntimeError("Error downloading train-images-idx3-ubyte.gz")))
    with pytest.raises(safety.UsageError) as e:
        datasets.load_dataset("fashionmnist", str(tmp_path), download=True)
    assert str(e.value) == (f"could not download fashionmnist (Error downloading train-images-idx3-ubyte.gz); "
                            f"put the four *-ubyte.gz files in {tmp_path} by hand (or pass --data-dir where they are) "
                            f"and --no-download, {OFFLINE}")
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path / "FashionMNIST")) == ["README"]


@pytest.mark.parametrize("name,cls", [("cifar100", "CIFAR100"), ("flowers102", "Flowers102")])
def test_failed_download_removes_the_folder_it_created(tmp_path, monkeypatch, name, cls):
    monkeypatch.setattr(f"torchvision.datasets.{cls}.download",
                        no_network(["archive.tgz.part", "flowers-102/jpg/x.jpg"]))
    data_dir = tmp_path / "a" / "b"
    with pytest.raises(safety.UsageError, match=rf"^could not download {name} \(<urlopen error \[Errno -3\] "
                                                r"Temporary failure in name resolution>\); put .* by hand .*, or work "
                                                "offline on Fashion-MNIST"):
        datasets.load_dataset(name, str(data_dir), download=True)
    assert os.listdir(tmp_path) == []


def test_interrupted_download_is_cleaned_up_and_still_interrupts(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.CIFAR10.download",
                        no_network(["cifar-10-python.tar.gz"], KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        datasets.load_dataset("cifar10", str(tmp_path / "data"), download=True)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 6. flag values

TINY = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--device", "cpu", "--knn-every", "0",
        "--save-every", "0", "--proj-dim", "8"]


@pytest.mark.parametrize("argv, says", [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--wd", "inf"], "--wd must be a finite number"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--temperature", "-0.5"], "--temperature must be positive"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1]"),
    (["--seed", "-1"], "--seed must be in [0, 2^31)"),
    (["--seed", str(2 ** 40)], "--seed must be in [0, 2^31)"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--proj-dim", "0"], "--proj-dim must be positive"),
    (["--width", "0"], "--width must be positive"),
    (["--power", "nan"], "--power must be a finite number"),
    (["--cut", "inf"], "--cut must be a finite number"),
    (["--opposite-cos", "2"], "--opposite-cos must be in [-1, 1]"),
])
def test_flag_values_are_refused_before_anything_is_created(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        simclr.main([*TINY, "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, argv, says", [
    ("byol.py", ["--tau-base", "1.5"], "--tau-base must be in [0, 1]"),
    ("byol.py", ["--hidden-dim", "0"], "--hidden-dim must be positive"),
    ("moco.py", ["--m", "2"], "--m must be in [0, 1]"),
    ("moco.py", ["--queue", "8"], "--queue 8 must hold at least one batch of 16 keys"),
    ("moco.py", ["--bn-splits", "3"], "must be a multiple of --bn-splits 3"),
    ("simsiam.py", ["--pred-dim", "-4"], "--pred-dim must be positive"),
])
def test_method_flags_are_refused(tmp_path, capsys, script, argv, says):
    import importlib
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as e:
        safety.cli(lambda: module.main([*TINY, "--out", str(tmp_path / "run"), *argv]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["simclr", "simsiam", "byol", "moco"])
def test_every_declared_range_is_enforced(capsys, script):
    """Each flag declared positive, or with low/high, is refused just outside its range,
    with a sentence naming it: a new flag gets its check by declaring its range."""
    import importlib
    module = importlib.import_module(script)
    ranged = [f for f in dataclasses.fields(module.Args) if f.metadata.get("positive") or
              f.metadata.get("low") is not None]
    assert len(ranged) >= 10
    shared = {f.name for f in dataclasses.fields(common.Args)
              if f.metadata["positive"] or f.metadata["low"] is not None}
    assert shared <= {f.name for f in ranged}, "a method's own help for a shared flag must keep the flag's range"
    for f in ranged:
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        bad = [-1 if meta["positive"] else meta["low"] - 1] + ([meta["high"] + 1] if meta["high"] is not None else [])
        for value in bad:
            with pytest.raises(SystemExit) as e:
                common.parse_args(module.Args, module.__doc__, [flag, str(type(f.default)(value))],
                                  getattr(module, "defaults", None))
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"{flag} must be" in err and f"(got {type(f.default)(value)})" in err, err


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """One finished epoch of SimCLR on the synthetic data, made once for this file."""
    out = tmp_path_factory.mktemp("good") / "run"
    r = run_main(simclr.main, *TINY, "--epochs", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("flags, says", [
    (["--t", "0"], "--t must be positive"),
    (["--t", "nan"], "--t must be positive and finite"),
    (["--k", "0"], "--k must be >= 1 (got 0)"),
    (["--bins", "0"], "--bins must be >= 1 (got 0)"),
    (["--probe-lr", "-1"], "--probe-lr must be positive and finite (got -1.0)"),
    (["--json", "{ckpt}"], "--json {ckpt} would overwrite {ckpt}, a run's own file"),
    (["--json", "{run}/metrics.jsonl"], "metrics.jsonl, a run's own file"),
    (["--json", "{run}/no/such/folder/x.json"], "cannot write into"),
    (["--json", "{run}"], "is a folder"),
])
def test_eval_knn_refuses_bad_values_and_outputs_before_any_work(good_run, capsys, flags, says):
    ckpt = str(good_run / "last.pt")
    flags = [f.format(ckpt=ckpt, run=good_run) for f in flags]
    before = snapshot(good_run)
    with pytest.raises((SystemExit, safety.UsageError)) as e:
        eval_knn.main([ckpt, "--device", "cpu", *flags])
    message = str(e.value) if isinstance(e.value, safety.UsageError) else capsys.readouterr().err
    if isinstance(e.value, SystemExit):  # a flag value: one line, as the training scripts say it, no usage dump
        assert e.value.code == 2 and message.count("\n") == 1 and message.startswith("error: "), message
    assert says.format(ckpt=ckpt) in message
    assert snapshot(good_run) == before


def test_eval_knn_takes_a_run_folder_for_its_last_pt(good_run):
    result = eval_knn.main([str(good_run), "--device", "cpu", "--k", "5"])
    assert result["epoch"] == 1 and 0 <= result["knn_top1"] <= 100


# ----------------------------------------------------------------------------- 7. faults during a run

def checkpoints_equal(a, b):
    a, b = safety.load_checkpoint(str(a)), safety.load_checkpoint(str(b))
    assert a["epoch"] == b["epoch"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


EPOCHS = ["--epochs", "5"]  # long enough that a signal sent after epoch 1 lands before the end


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """Uninterrupted epochs: what every interrupted and resumed run must equal, bitwise."""
    out = tmp_path_factory.mktemp("whole") / "run"
    r = run_main(simclr.main, *TINY, *EPOCHS, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def start(out, *extra):
    import subprocess
    import sys
    from conftest import ROOT
    # The same threads as run_main's runs (conftest's OMP_NUM_THREADS): bitwise equality
    # needs the same order of float additions.
    return subprocess.Popen([sys.executable, "simclr.py", *TINY, *EPOCHS, "--out", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=120):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended first: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("timed out")


def saved_epoch(out):
    try:
        return safety.load_checkpoint(str(out / "last.pt"))["epoch"]
    except (safety.UsageError, OSError):
        return 0


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_epoch_names_the_safe_epoch_and_resume_finishes_bitwise(tmp_path, whole_run, signal_name, code):
    import signal
    out = tmp_path / "run"
    proc = start(out)
    wait_for(lambda: saved_epoch(out) >= 1, proc)
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"last.pt holds epoch {saved_epoch(out)}" in err
    assert "--resume auto --out " + str(out) in err
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # no temporary file left behind
    if signal_name == "SIGINT":
        return  # how a run resumes does not depend on the signal that stopped it: once is enough
    r = run_main(simclr.main, "--resume", "auto", "--out", out)  # the resume needs no process of its own
    assert r.returncode == 0, r.stderr
    checkpoints_equal(whole_run / "last.pt", out / "last.pt")


def test_a_signal_before_the_first_checkpoint_claims_none(tmp_path, whole_run):
    import signal
    out = tmp_path / "run"
    proc = start(out)
    wait_for(lambda: (out / "lock").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if saved_epoch(out):
        pytest.skip("the first epoch finished before the signal arrived")
    assert proc.returncode == 143 and "holds no checkpoint" in err and "from epoch 0" in err, err
    r = run_main(simclr.main, *TINY, *EPOCHS, "--resume", "auto", "--out", out)
    assert r.returncode == 0, r.stderr
    checkpoints_equal(whole_run / "last.pt", out / "last.pt")


def test_an_interrupt_or_full_disk_mid_save_keeps_the_last_good_checkpoint(good_run, tmp_path, monkeypatch, capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    before = (out / "last.pt").read_bytes()
    for fault, code, says in [(KeyboardInterrupt, 130, "last.pt holds epoch 1"),
                              (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                               1, "could not write")]:
        def broken_save(obj, fh, fault=fault):
            fh.write(b"PK\x03\x04 half a zip file")
            raise fault
        monkeypatch.setattr(torch, "save", broken_save)
        with pytest.raises(SystemExit) as e:
            safety.cli(lambda: simclr.main(["--resume", "auto", "--out", str(out), "--epochs", "2"]))
        monkeypatch.undo()
        err = capsys.readouterr().err
        assert e.value.code == code and says in err and "Traceback" not in err, err
        assert (out / "last.pt").read_bytes() == before
        assert sorted(os.listdir(out)) == ["args.json", "last.pt", "metrics.jsonl"]  # no .tmp, no lock left


def test_nan_weights_stop_the_run_and_keep_the_good_checkpoint(good_run, tmp_path, monkeypatch, capsys):
    """The loss can stay finite while the weights are NaN (overflowed embeddings normalize
    to 0): a resumed run whose step poisons the weights stops with status 1, names the last
    good epoch and leaves last.pt as it was."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    before = (out / "last.pt").read_bytes()
    step, calls = torch.optim.SGD.step, []

    def poisoned(self, *a, **kw):  # the epoch's last step (of 2) leaves NaN weights behind
        result = step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result
    monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    with pytest.raises(SystemExit) as e:
        safety.cli(lambda: simclr.main(["--resume", "auto", "--out", str(out), "--epochs", "2"]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "the weights became NaN or infinite at epoch 2" in err, err
    assert "still holds epoch 1, the last good one" in err
    assert (out / "last.pt").read_bytes() == before


def test_nan_weights_from_a_huge_lr_are_caught(tmp_path):
    # On this CPU, lr 1e12 leaves a finite loss but NaN weights after epoch 1 (the case the
    # loss check alone missed); elsewhere the loss may go first. Either way: status 1, no checkpoint.
    r = run_main(simclr.main, *TINY, "--epochs", "1", "--power", "1", "--lr", "1e12", "--warmup", "0",
                 "--out", tmp_path / "run")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "became" in r.stderr and "no checkpoint was written" in r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_second_run_on_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, whole_run):
    out = tmp_path / "run"
    proc = start(out)
    wait_for(lambda: (out / "lock").exists(), proc)
    second = run_main(simclr.main, *TINY, *EPOCHS, "--resume", "auto", "--out", out)  # the first run is a process
    assert_refused(second, str(out), f"pid {proc.pid}")
    assert proc.poll() is None  # the first run was not disturbed
    proc.terminate()
    proc.communicate(timeout=60)
    assert not (out / "lock").exists()  # a run that ends releases its lock
    # A lock whose process is gone (a SIGKILL, a crash) is taken over with a notice.
    (out / "lock").write_text("999999999")
    r = run_main(simclr.main, *TINY, *EPOCHS, "--resume", "auto", "--out", out)
    assert r.returncode == 0 and "taking over" in r.stderr, r.stderr
    assert not (out / "lock").exists()


# ----------------------------------------------------------------------------- 8. dead ends

def test_a_folder_without_a_checkpoint_starts_over_with_resume_auto(tmp_path, whole_run):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n{"epo')
    r = run_main(simclr.main, *TINY, *EPOCHS, "--resume", "auto", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "has no checkpoint yet: starting from epoch 0" in r.stderr
    assert [json_epoch(line) for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    checkpoints_equal(whole_run / "last.pt", out / "last.pt")


def json_epoch(line):
    import json
    return json.loads(line)["epoch"]


def test_a_damaged_metrics_file_is_trimmed_on_resume(good_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('garbage\n{"epoch": 2, "loss": 1.0}\n{"epoch": 3, "lo')  # a later epoch, and a torn line
    r = run_main(simclr.main, "--resume", "auto", "--out", out, "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "skipped 2 damaged lines" in r.stderr
    assert [json_epoch(line) for line in open(out / "metrics.jsonl")] == [1, 2]


def test_resuming_a_finished_run_does_nothing_and_says_so(good_run):
    before = snapshot(good_run)
    r = run_main(simclr.main, "--resume", good_run)  # a folder stands for its last.pt
    assert r.returncode == 0 and "has finished all 1 epochs; nothing to do" in r.stdout, r.stderr
    assert snapshot(good_run) == before
