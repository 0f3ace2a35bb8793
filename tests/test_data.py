"""Dataset loaders on small files written in each dataset's real on-disk format."""
import gzip
import hashlib
import io
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
import torchvision

import safety
import datasets

FASHION = "/usr/share/datasets/fashion-mnist"


def write_cifar(root, name, n_per_file=4):
    """The python-version batches and the meta file of CIFAR-10 or CIFAR-100, with random images."""
    folder, train_files, test_files, key, meta = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                    ("batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels",
                     ("meta", {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": []})),
    }[name]
    os.makedirs(root / folder)
    rng = np.random.default_rng(0)
    written = {}
    for f in train_files + test_files:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_file).tolist()
        batch = {"data": data, key: labels, "filenames": [f"img{i}.png" for i in range(n_per_file)]}
        with open(root / folder / f, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        written[f] = (data, labels)
    with open(root / folder / meta[0], "wb") as fh:
        pickle.dump(meta[1], fh, protocol=2)
    return written, train_files, test_files


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def publish_cifar(monkeypatch, root, name):
    """Patch torchvision's table of the published CIFAR files' MD5 checksums, for this test
    only, to those of the files a test wrote under root, so that they load as real ones."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    for table in ("train_list", "test_list"):
        monkeypatch.setattr(cls, table, [[f, md5(folder / f)] for f, _ in getattr(cls, table)])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, monkeypatch, name):
    written, train_files, test_files = write_cifar(tmp_path, name)
    publish_cifar(monkeypatch, tmp_path, name)
    d = datasets.load_dataset(name, str(tmp_path))
    assert d.train_x.shape == (4 * len(train_files), 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (4, 3, 32, 32)
    data, labels = written[train_files[-1]]
    # Rows are stored channel-major: 1024 red, 1024 green, 1024 blue values.
    assert torch.equal(d.train_x[-4:], torch.from_numpy(data).view(4, 3, 32, 32))
    assert d.train_x[-1, 1, 0, 5].item() == data[-1, 1024 + 5]
    assert d.train_y[-4:].tolist() == labels and d.train_y.dtype == torch.int64


class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2 did when the real CIFAR files were written: bytes become Python 2
    str (BINSTRING), not Python 3's _codecs.encode call."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_str2(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str2


def test_cifar_python2_pickles_load(tmp_path, monkeypatch):
    # The real batches name numpy.core.multiarray._reconstruct (numpy 1's module) and hold
    # their keys and pixel bytes as Python 2 str; torchvision's pickle.load(encoding='latin1') reads both.
    written, train_files, _ = write_cifar(tmp_path, "cifar10")
    for f, (data, labels) in written.items():
        out = io.BytesIO()
        Python2Pickler(out, protocol=2).dump({b"batch_label": b"batch", b"data": data, b"labels": labels,
                                              b"filenames": [b"a.png"] * len(labels)})
        raw = out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
        (tmp_path / "cifar-10-batches-py" / f).write_bytes(raw)
    publish_cifar(monkeypatch, tmp_path, "cifar10")
    d = datasets.load_dataset("cifar10", str(tmp_path))
    data, labels = written[train_files[0]]
    assert torch.equal(d.train_x[:4], torch.from_numpy(data).view(4, 3, 32, 32)) and d.train_y[:4].tolist() == labels


def test_cifar_missing_and_corrupt_files_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(safety.UsageError, match=r"cifar10 file data_batch_1 not found in .*--no-download"):
        datasets.load_dataset("cifar10", str(tmp_path))
    write_cifar(tmp_path, "cifar10")
    publish_cifar(monkeypatch, tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(safety.UsageError, match=r"cifar10 file batches.meta not found in .*--no-download"):
        datasets.load_dataset("cifar10", str(tmp_path))
    write_cifar(tmp_path / "again", "cifar10")
    publish_cifar(monkeypatch, tmp_path / "again", "cifar10")
    corrupt = tmp_path / "again" / "cifar-10-batches-py" / "data_batch_3"
    corrupt.write_bytes(b"not a pickle")
    with pytest.raises(safety.UsageError, match=f"^{re.escape(str(corrupt))} is not the published cifar10 file .*; "
                                                "delete it and download cifar10 again$"):
        datasets.load_dataset("cifar10", str(tmp_path / "again"))


def test_long_tail_counts_follow_the_paper():
    labels = torch.arange(10).repeat_interleave(5000)
    keep = datasets.long_tail_indices(labels, 1.5)
    counts = torch.bincount(labels[keep]).tolist()
    assert counts == [5000, 3333, 2222, 1481, 987, 658, 438, 292, 195, 130]
    labels = torch.arange(100).repeat_interleave(500)
    counts = torch.bincount(labels[datasets.long_tail_indices(labels, 1.03365)]).tolist()
    assert counts[0] == 500 and counts[1] == 483 and counts[-1] == int(500 * 1.03365 ** -99) == 18
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_long_tailed_dataset_keeps_the_test_set(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", n_per_file=40)
    publish_cifar(monkeypatch, tmp_path, "cifar10")
    full = datasets.load_dataset("cifar10", str(tmp_path))
    lt = datasets.load_dataset("cifar10-lt", str(tmp_path))
    assert torch.equal(lt.test_x, full.test_x)
    counts = torch.bincount(lt.train_y, minlength=10)
    n_max = torch.bincount(full.train_y).max().item()
    assert counts.tolist() == [min(int(n_max * 1.5 ** -c), int((full.train_y == c).sum())) for c in range(10)]


def write_idx(path, array, gz):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_fashion(folder, gz=True, n=6):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n // 2, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n // 2)}
    for stem, a in arrays.items():
        write_idx(os.path.join(folder, stem + (".gz" if gz else "")), a, gz)
    return arrays


@pytest.mark.parametrize("layout,gz", [("flat", True), ("torchvision", False)])
def test_fashionmnist_idx(tmp_path, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_fashion(str(folder), gz)
    d = datasets.load_dataset("fashionmnist", str(tmp_path))
    assert d.train_x.shape == (6, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    img = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8))
    assert torch.equal(d.train_x[:, 0, 2:30, 2:30], img)  # padded by 2 px on each side
    assert torch.equal(d.train_x[:, 0], d.train_x[:, 2]) and d.train_x[:, :, :2].sum() == 0
    assert d.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_fashionmnist_errors(tmp_path):
    with pytest.raises(safety.UsageError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_dataset("fashionmnist", str(tmp_path))
    write_fashion(str(tmp_path))
    full = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as fh:
        raw = fh.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw[:-100])  # truncated
    with pytest.raises(safety.UsageError, match="not a valid idx file"):
        datasets.load_dataset("fashionmnist", str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(full[:50])  # broken gzip stream
    with pytest.raises(safety.UsageError, match="not a valid idx file"):
        datasets.load_dataset("fashionmnist", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="dataset-fashion-mnist is not installed")
def test_real_fashionmnist_and_its_long_tail():
    d = datasets.load_dataset("fashionmnist", FASHION)
    assert d.train_x.shape == (60000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32) and d.num_classes == 10
    assert torch.bincount(d.train_y).tolist() == [6000] * 10
    lt = datasets.load_dataset("fashionmnist-lt", FASHION)
    assert torch.bincount(lt.train_y).tolist() == [int(6000 * 1.5 ** -i) for i in range(10)]


def save_jpeg(path, colour, size):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def test_tinyimagenet_folder_layout_and_cache(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # deliberately unsorted; labels follow sorted order
    os.makedirs(root)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w, colour in zip(wnids, [(250, 0, 0), (0, 0, 250)]):
        for i in range(3):
            save_jpeg(str(root / "train" / w / "images" / f"{w}_{i}.JPEG"), colour, (64, 64))
    lines = []
    for i, (w, colour) in enumerate([("n01", (0, 0, 250)), ("n02", (250, 0, 0)), ("n01", (0, 0, 250))]):
        save_jpeg(str(root / "val" / "images" / f"val_{i}.JPEG"), colour, (64, 64))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    d = datasets.load_dataset("tinyimagenet", str(tmp_path))
    assert d.train_x.shape == (6, 3, 64, 64) and d.test_x.shape == (3, 3, 64, 64)
    assert d.train_y.tolist() == [0, 0, 0, 1, 1, 1]  # n01 first
    assert d.test_y.tolist() == [0, 1, 0]
    assert d.train_x[0, 2].float().mean() > 200 and d.train_x[0, 0].float().mean() < 30  # n01 is blue
    assert (root / "normssl_cache_64.pt").exists()
    again = datasets.load_dataset("tinyimagenet", str(tmp_path))
    assert torch.equal(again.train_x, d.train_x)


def test_tinyimagenet_missing_annotations(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    os.makedirs(root / "train")
    (root / "wnids.txt").write_text("n01\n")
    with pytest.raises(safety.UsageError, match="val_annotations.txt not found"):
        datasets.load_dataset("tinyimagenet", str(tmp_path))


def test_imagenet100_class_folders_resized_to_128(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        for c, colour in (("n0a", (0, 200, 0)), ("n0b", (200, 200, 0))):
            for i in range(n):
                save_jpeg(str(tmp_path / split / c / f"{i}.JPEG"), colour, (300, 200))  # landscape
    d = datasets.load_dataset("imagenet100", str(tmp_path))
    assert d.train_x.shape == (4, 3, 128, 128) and d.test_x.shape == (2, 3, 128, 128)
    assert d.train_y.tolist() == [0, 0, 1, 1] and d.test_y.tolist() == [0, 1]
    assert abs(d.train_x[2, 0].float().mean() - 200) < 5 and d.train_x[0, 0].float().mean() < 5
    with pytest.raises(safety.UsageError, match="ImageNet-100 folder train not found"):
        datasets.load_dataset("imagenet100", str(tmp_path / "nowhere"))


def write_flowers(root, labels, setid):
    """imagelabels.mat and setid.mat as the Flowers-102 site publishes them, and one jpg per label."""
    scipy_io = pytest.importorskip("scipy.io")
    for i in range(1, len(labels) + 1):
        save_jpeg(str(root / "jpg" / f"image_{i:05d}.jpg"), (40 * i, 0, 0), (150, 130))
    scipy_io.savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    scipy_io.savemat(root / "setid.mat", {k: np.array([v]) for k, v in setid.items()})


def publish_flowers(monkeypatch, root):
    """As publish_cifar, for torchvision's MD5 checksums of the two Flowers-102 .mat files."""
    table = {k: (f, md5(root / f)) if k != "image" else (f, m)
             for k, (f, m) in torchvision.datasets.Flowers102._file_dict.items()}
    monkeypatch.setattr(torchvision.datasets.Flowers102, "_file_dict", table)


def test_flowers102_mat_files(tmp_path, monkeypatch):
    root = tmp_path / "flowers-102"
    write_flowers(root, [1, 2, 2, 3, 1, 3], {"trnid": [1], "valid": [2, 4], "tstid": [3, 5, 6]})  # 1-based
    publish_flowers(monkeypatch, root)
    d = datasets.load_dataset("flowers102", str(tmp_path))
    # The paper trains on the (long-tailed) test split and evaluates on val.
    assert d.train_x.shape == (3, 3, 128, 128) and d.train_y.tolist() == [1, 0, 2]
    assert d.test_y.tolist() == [1, 2]
    assert abs(d.train_x[0, 0].float().mean() - 120) < 5
    assert torch.equal(datasets.load_dataset("flowers102", str(root)).train_x, d.train_x)  # the folder itself


def test_subset():
    d = datasets.load_dataset("synthetic", "unused", subset=10)
    assert d.train_x.shape == (10, 3, 16, 16) and len(d.test_y) == 10 and d.train_x.dtype == torch.uint8


def test_drop_classes_leaves_them_out_of_both_splits():
    d = datasets.load_dataset("synthetic", "unused")  # image i has class i % 4
    rest, unseen = datasets.drop_classes(d, [1, 3])
    assert set(rest.train_y.tolist()) == {0, 2} and set(rest.test_y.tolist()) == {0, 2}
    assert len(rest.train_y) == len(d.train_y) // 2 and rest.num_classes == 4  # labels keep their numbers
    assert torch.equal(rest.train_x, d.train_x[(d.train_y % 2) == 0])
    assert torch.equal(unseen, d.test_x[(d.test_y % 2) == 1])
    same, none = datasets.drop_classes(d, [])
    assert same is d and len(none) == 0
    with pytest.raises(safety.UsageError, match="--exclude-classes 4 is not a class of synthetic"):
        datasets.drop_classes(d, [0, 4])
    with pytest.raises(safety.UsageError, match="leaves no images"):
        datasets.drop_classes(d, [0, 1, 2, 3])
    assert datasets.parse_classes(" 3, 1,3 ") == [1, 3] and datasets.parse_classes("") == []
    assert datasets.parse_classes("1;2") is None
