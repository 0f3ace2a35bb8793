"""Datasets as uint8 images (N, 3, H, W) and int64 labels, loaded once onto the training device, and
the augmentation that draws every image's crop, flip and colours in one batched call there: no
DataLoader, no CPU workers (airbench's recipe)."""
import dataclasses
import gzip
import math
import os
import struct
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from safety import RunFailed, UsageError, check_input, write_atomic

DATASETS = ("cifar10", "cifar100", "cifar10-lt", "cifar100-lt", "fashionmnist", "fashionmnist-lt",
            "tinyimagenet", "imagenet100", "flowers102", "synthetic")


# ----------------------------------------------------------------------------- datasets
@dataclasses.dataclass
class Data:
    """A dataset as uint8 images (N, 3, H, W) and int64 labels (N,)."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def size(self):
        return self.train_x.shape[-1]

    def to(self, device):
        return dataclasses.replace(self, **{k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)})


# Long-tailed train splits (embedding-norms paper, Sec. 7): class i keeps int(n * base**-i).
LONG_TAIL = {"cifar10-lt": 1.5, "cifar100-lt": 1.03365, "fashionmnist-lt": 1.5}


def long_tail_indices(labels, base):
    """Indices that keep the first int(n_max * base**-i) images of class i, in original order."""
    labels = torch.as_tensor(labels)
    n_max = int(torch.bincount(labels).max())
    keep = [(labels == c).nonzero().flatten()[: int(n_max * base ** -c)] for c in range(int(labels.max()) + 1)]
    return torch.cat(keep).sort().values


def load_dataset(name, data_dir, download=False, subset=0):
    """Load a dataset by name; any missing or malformed file raises UsageError."""
    loaders = dict(cifar10=_cifar, cifar100=_cifar, fashionmnist=_fashionmnist, tinyimagenet=_tinyimagenet,
                   imagenet100=_imagenet100, flowers102=_flowers102, synthetic=_synthetic)
    base = name[:-3] if name in LONG_TAIL else name
    (train_x, train_y), (test_x, test_y) = loaders[base](base, data_dir, download)
    for split, y in (("training", train_y), ("test", test_y)):
        if not len(y):
            raise UsageError(f"{name} in {data_dir} has no {split} images; check --data-dir and the folder layout")
    if name in LONG_TAIL:
        keep = long_tail_indices(train_y, LONG_TAIL[name])
        train_x, train_y = train_x[keep], train_y[keep]
    if subset:
        train_x, train_y, test_x, test_y = train_x[:subset], train_y[:subset], test_x[:subset], test_y[:subset]
    return Data(name, train_x.contiguous(), train_y.long(), test_x.contiguous(), test_y.long(),
                num_classes=int(max(train_y.max(), test_y.max())) + 1)


def parse_classes(text):
    """'5, 6,7' -> [5, 6, 7] (sorted, without repeats); '' -> []; None if it is not such a list."""
    try:
        return sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        return None


def drop_classes(data, classes):
    """Leave `classes` out of both splits, as if the dataset never had them (the labels
    keep their numbers); returns (the rest, the test images of the left-out classes)."""
    if not classes:
        return data, data.test_x[:0]
    if bad := [c for c in classes if not 0 <= c < data.num_classes]:
        raise UsageError(f"--exclude-classes {bad[0]} is not a class of {data.name}, "
                         f"whose classes are 0 to {data.num_classes - 1}")
    out_train, out_test = (torch.isin(y, torch.tensor(classes, device=y.device)) for y in (data.train_y, data.test_y))
    if out_train.all() or out_test.all():
        raise UsageError(f"--exclude-classes {','.join(map(str, classes))} leaves no images to train or test on; "
                         "leave out fewer classes")
    return (dataclasses.replace(data, train_x=data.train_x[~out_train], train_y=data.train_y[~out_train],
                                test_x=data.test_x[~out_test], test_y=data.test_y[~out_test]), data.test_x[out_test])


# The loaders below return ((train_x, train_y), (test_x, test_y)). torchvision reads the
# published formats and checks their MD5 checksums; the folder datasets are decoded once.

def _need(paths, what, how):
    for p in paths:
        if not os.path.exists(p):
            raise UsageError(f"{what} {os.path.basename(p)} not found in {os.path.dirname(p)}; {how}")
        if not os.path.isdir(p):
            check_input(p, what)  # a FIFO would block the read that checks its MD5


def _download(name, data_dir, fetch, folder, files, inner=()):
    """Run torchvision's download, fetch(). If it fails (no network, a dead mirror, a bad checksum) or is interrupted,
    remove just what it made (missing folders of data_dir, new entries there and in `inner`); say how to do without."""
    import http.client
    import shutil
    created, path = None, os.path.abspath(data_dir)
    while not os.path.exists(path):
        created, path = path, os.path.dirname(path)
    before = {d: set(os.listdir(d)) for d in (os.path.join(data_dir, i) for i in ("", *inner)) if os.path.isdir(d)}
    try:
        fetch()
    except BaseException as e:  # Ctrl-C too: no half-downloaded archive is left behind
        new = [os.path.join(d, f) for d, kept in before.items() if os.path.isdir(d) for f in set(os.listdir(d)) - kept]
        for p in [created] if created else new:  # a created data_dir holds all that is new
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        if not isinstance(e, (OSError, RuntimeError, http.client.HTTPException)):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f"could not download {name} ({reason}); put {files} in {folder} by hand (or pass --data-dir "
                         "where they are) and --no-download, or work offline on Fashion-MNIST: apt-get install "
                         "dataset-fashion-mnist, then --dataset fashionmnist --data-dir "
                         "/usr/share/datasets/fashion-mnist") from None


def _not_published(name, files):
    """The refusal of the first of `files`, (path, md5) pairs, that is not the published file
    (torchvision's own error says only 'Dataset not found or corrupted')."""
    from torchvision.datasets.utils import check_integrity
    bad = next((p for p, md5 in files if not check_integrity(p, md5)), os.path.dirname(files[0][0]))
    return UsageError(f"{bad} is not the published {name} file (its MD5 checksum differs), so it is not read; "
                      f"delete it and download {name} again")


def _cifar(name, data_dir, download):
    import torchvision  # imported where needed: it costs ~2 s, and a bad flag should fail fast
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = os.path.join(data_dir, cls.base_folder)
    if download and not os.path.isdir(root):
        _download(name, data_dir, lambda: cls(data_dir, download=True), root, "the extracted python-version batches")
    meta = [cls.meta["filename"], cls.meta["md5"]]
    files = [(os.path.join(root, f), md5) for f, md5 in cls.train_list + cls.test_list + [meta]]
    _need([p for p, _ in files], f"{name} file", f"put the extracted '{cls.base_folder}' folder under --data-dir "
          "(a method script without --no-download fetches it)")
    try:  # The batches are pickles, which can run code when loaded: torchvision checks all of them first.
        splits = [cls(data_dir, train=train) for train in (True, False)]
    except RuntimeError:
        raise _not_published(name, files) from None
    return [(torch.from_numpy(d.data).permute(0, 3, 1, 2), torch.tensor(d.targets)) for d in splits]  # (N, 3, 32, 32)


def read_idx(path, shape=None, max_values=10 ** 8):  # Fashion-MNIST's largest file holds 47M values
    """Read an idx file (the MNIST format), gzipped or not, as a uint8 tensor; shape: the expected dimensions, None for
    any (e.g. (None, 28, 28)). The header is checked first, then exactly the bytes it promises are read, so a gzip bomb
    or absurd dimensions are refused before anything large is decompressed. (torchvision reads only its own layout.)"""
    def exactly(fh, n, what):
        if len(data := fh.read(n)) != n:
            raise ValueError(f"it ends after {len(data)} of the {n} bytes of its {what}")
        return data
    try:
        with (gzip.open if path.endswith(".gz") else open)(check_input(path, "idx file"), "rb") as fh:
            zero, dtype, ndim = struct.unpack(">HBB", exactly(fh, 4, "header"))
            if zero != 0 or dtype != 0x08:
                raise ValueError("its magic number is not that of an idx file of unsigned bytes")
            dims = struct.unpack(f">{ndim}I", exactly(fh, 4 * ndim, "header"))
            if shape is not None and (len(dims) != len(shape) or any(s not in (None, d) for s, d in zip(shape, dims))):
                raise ValueError(f"it holds an array of shape {dims}, not "
                                 f"({', '.join('N' if s is None else str(s) for s in shape)})")
            if (count := math.prod(dims)) > max_values:
                raise ValueError(f"its header claims {count} values, more than the {max_values} this reader accepts")
            raw = exactly(fh, count, "data")
            if fh.read(1):
                raise ValueError(f"it goes on past the {count} bytes of data its header promises")
    except (OSError, EOFError, ValueError, zlib.error) as e:  # zlib.error: a corrupt gzip stream
        raise UsageError(f"{path} is not a valid idx file ({e}); delete it and fetch it again")
    return torch.from_numpy(np.frombuffer(raw, np.uint8).copy()).reshape(dims)  # frombuffer refuses 0 bytes


def _fashionmnist(name, data_dir, download):
    # The idx files in data_dir (Debian's /usr/share/datasets/fashion-mnist) or torchvision's data_dir/FashionMNIST/raw.
    folders = [data_dir, os.path.join(data_dir, "FashionMNIST", "raw")]
    if download and not any(os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")) for d in folders):
        import torchvision
        _download(name, data_dir, lambda: torchvision.datasets.FashionMNIST(data_dir, download=True),
                  data_dir, "the four *-ubyte.gz files", inner=("FashionMNIST", os.path.join("FashionMNIST", "raw")))
    def read(stem, shape):
        for path in (os.path.join(d, stem + s) for d in folders for s in ("", ".gz")):
            if os.path.exists(path):
                return path, read_idx(path, shape)
        raise UsageError(f"Fashion-MNIST file {stem} not found in {' or '.join(folders)}; install it with 'apt-get "
                         "install dataset-fashion-mnist' and pass --data-dir /usr/share/datasets/fashion-mnist "
                         "(a method script without --no-download fetches it)")
    def split(prefix):
        images, x = read(f"{prefix}-images-idx3-ubyte", (None, 28, 28))  # (N, 28, 28)
        labels, y = read(f"{prefix}-labels-idx1-ubyte", (None,))  # (N,)
        if len(x) != len(y):
            raise UsageError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; "
                             "fetch both files again")
        if len(y) and y.max() >= 10:  # idx bytes are never negative
            raise UsageError(f"{labels} holds label {int(y.max())}, outside the 10 classes 0 to 9; fetch it again")
        # Pad 28 -> 32 so the CIFAR pipeline applies unchanged; grey -> 3 channels.
        return F.pad(x, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1), y.long()
    return split("train"), split("t10k")


def _load_images(paths, size):
    """Decode image files in parallel, resize the short side to `size` and centre-crop a square."""
    from PIL import Image
    def one(path):
        check_input(path, "image")  # a FIFO would block Image.open
        try:
            with Image.open(path) as im:
                s = size / min(im.size)
                im = im.convert("RGB").resize(tuple(max(size, round(n * s)) for n in im.size), Image.BILINEAR)
                left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                im = im.crop((left, top, left + size, top + size))
                return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, size, size)
        except Exception as e:  # missing, truncated, not an image, a decompression bomb: PIL has many errors
            raise UsageError(f"{path} is not a readable image ({type(e).__name__}); replace it with a good copy "
                             "from the dataset's archive")
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return torch.stack(list(pool.map(one, paths))) if paths else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def _split_problem(x, y, num_classes, size):
    """What is wrong with one cached split, as a phrase ('holds label 7, outside ...'), or None."""
    if x.dtype != torch.uint8 or x.shape[1:] != (3, size, size):
        return f"holds images as {x.dtype} {tuple(x.shape)}, not uint8 N x 3 x {size} x {size}"
    if y.dtype != torch.int64 or y.shape != (len(x),):
        return f"holds labels as {y.dtype} {tuple(y.shape)}, not {len(x)} int64 class numbers"
    bad = y[(y < 0) | (y >= num_classes)]
    return f"holds label {int(bad[0])}, outside the {num_classes} classes 0 to {num_classes - 1}" if len(bad) else None


def _cached(cache_path, build, num_classes, size):
    """Decode a folder dataset once, by build(), and keep it as a uint8 tensor file next to the images. A cache
    that does not hold size-px images of num_classes classes (stale, damaged or edited) is decoded again."""
    if os.path.exists(cache_path):
        try:
            d = torch.load(cache_path, weights_only=True)
            splits = (d["train_x"], d["train_y"]), (d["test_x"], d["test_y"])
            problem = next(filter(None, (_split_problem(x, y, num_classes, size) for x, y in splits)), None)
        except Exception as e:  # a damaged file, or one without tensors where they belong
            problem = f"is unreadable ({type(e).__name__})"
        if problem is None:
            return splits
        print(f"warning: ignoring the cache {cache_path}, which {problem}; decoding the images again", file=sys.stderr)
    (train_x, train_y), (test_x, test_y) = splits = build()
    if len(train_y) and len(test_y):  # load_dataset refuses an empty split; it must not be cached
        cache = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
        try:
            write_atomic(cache_path, lambda fh: torch.save(cache, fh), "wb")
        except RunFailed as e:  # a read-only dataset folder: the next run decodes again
            print(f"warning: {e}; decoding again next time", file=sys.stderr)
    return splits


def _class_folders(root, classes, size):
    """The images root/<class>/**/* as torchvision's ImageFolder finds them (sorted, image extensions only), but
    without following links to folders, which may loop; decoded to size px. Class i of `classes` is label i."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    samples = [(os.path.join(d, f), i) for i, c in enumerate(classes) for d, _, files in
               sorted(os.walk(os.path.join(root, c))) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return _load_images([p for p, _ in samples], size), torch.tensor([y for _, y in samples], dtype=torch.long)


def _tinyimagenet(name, data_dir, download):
    root = data_dir if os.path.exists(os.path.join(data_dir, "wnids.txt")) else \
        os.path.join(data_dir, "tiny-imagenet-200")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    _need([os.path.join(root, "wnids.txt"), os.path.join(root, "train"), annotations], "Tiny-ImageNet",
          "download tiny-imagenet-200.zip from the CS231n site and unzip it under --data-dir")
    with open(os.path.join(root, "wnids.txt")) as fh:
        wnids = sorted(line.strip() for line in fh if line.strip())
    def build():
        paths, labels, index = [], [], {w: i for i, w in enumerate(wnids)}
        with open(annotations) as fh:  # val/ is one flat folder; this file gives each image's class
            for line in fh:
                if len(parts := line.split("\t")) < 2 or parts[1] not in index:
                    raise UsageError(f"malformed line in {annotations}: {line.strip()[:80]!r}")
                paths.append(os.path.join(root, "val", "images", parts[0]))
                labels.append(index[parts[1]])
        return _class_folders(os.path.join(root, "train"), wnids, 64), (_load_images(paths, 64), torch.tensor(labels))
    return _cached(os.path.join(root, "normssl_cache_64.pt"), build, len(wnids), 64)


def _imagenet100(name, data_dir, download):
    _need([os.path.join(data_dir, "train"), os.path.join(data_dir, "val")], "ImageNet-100 folder",
          "arrange the 100 classes as <data-dir>/train/<class>/*.JPEG and <data-dir>/val/<class>/*.JPEG")
    classes = sorted(e.name for e in os.scandir(os.path.join(data_dir, "train")) if e.is_dir())
    def build():  # val/ takes train/'s class numbers, so a class missing from val/ shifts no label
        print("decoding the ImageNet-100 images once to 128 px...", file=sys.stderr)
        return [_class_folders(os.path.join(data_dir, split), classes, 128) for split in ("train", "val")]
    return _cached(os.path.join(data_dir, "normssl_cache_128.pt"), build, len(classes), 128)


def _flowers102(name, data_dir, download):
    from torchvision.datasets import Flowers102 as cls
    if os.path.exists(os.path.join(data_dir, "setid.mat")):  # --data-dir is the flowers-102 folder itself
        data_dir = os.path.dirname(os.path.abspath(data_dir))
    root = os.path.join(data_dir, "flowers-102")
    if download and not os.path.exists(os.path.join(root, "setid.mat")):
        _download(name, data_dir, lambda: cls(data_dir, download=True), root, "jpg/, imagelabels.mat and setid.mat",
                  inner=("flowers-102",))
    _need([os.path.join(root, f) for f in ("jpg", "imagelabels.mat", "setid.mat")], "Flowers-102",
          "unpack 102flowers.tgz, imagelabels.mat and setid.mat into <data-dir>/flowers-102 (a method script "
          "without --no-download fetches them)")
    def build():
        try:  # The paper trains on the 6,149-image 'test' split (long-tailed) and evaluates on 'val'.
            splits = [cls(data_dir, split, loader=str) for split in ("test", "val")]  # items: (path, label)
        except ImportError:
            raise UsageError("flowers102 needs scipy to read its .mat label files; run 'pip install scipy'") from None
        except RuntimeError:
            mats = [(os.path.join(root, f), md5) for key, (f, md5) in cls._file_dict.items() if key != "image"]
            raise _not_published(name, mats) from None
        return [(_load_images([p for p, _ in d], 128), torch.tensor([y for _, y in d])) for d in splits]
    return _cached(os.path.join(root, "normssl_cache_128.pt"), build, 102, 128)


def _synthetic(name, data_dir, download, n_train=256, n_test=128, classes=4, size=16):
    """Tiny images for tests and smoke runs: each class has its own colour and stripe
    orientation. 16 px keeps a ResNet-18 step on a CPU well under a second."""
    g = torch.Generator().manual_seed(1234)
    colours = torch.rand(classes, 3, 1, 1, generator=g)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    def make(n):
        y = torch.arange(n) % classes
        angle = y.float() * math.pi / classes
        stripes = torch.sin((xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]) * 0.8)
        img = colours[y] * (0.6 + 0.4 * stripes[:, None]) + 0.15 * torch.randn(n, 3, size, size, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), y
    return make(n_train), make(n_test)


def channel_stats(x):
    """Per-channel mean and std of uint8 images (N, 3, H, W) in [0, 1], from up to 10k images."""
    x = x[:10000].float() / 255
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def normalize(x, mean, std):
    """uint8 (B, 3, H, W) -> float, standardized per channel, no augmentation."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x.float() / 255 - mean) / std


# ----------------------------------------------------------------------------- augmentation
# Everything below works on a whole batch at once on the data's device, with one random draw per image and no Python
# loop over samples. Each op follows the semantics of torchvision's transform of the same name (tests compare them).

def sample_crops(n, height, width, scale, ratio, device):
    """Per-image RandomResizedCrop boxes (top, left, h, w), each (n,), torchvision's algorithm:
    up to 10 tries of a random area fraction and log-uniform aspect ratio, else a centre crop."""
    area = height * width * torch.empty(n, 10, device=device).uniform_(*scale)  # (n, 10 tries)
    aspect = torch.exp(torch.empty_like(area).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(dim=1, keepdim=True)  # index of the first try that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # Fallback when no try fits: the whole image, clipped to the allowed aspect range.
    in_ratio = width / height
    fw, fh = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height)
    found = ok.any(dim=1)
    w, h = torch.where(found, w, torch.full_like(w, fw)), torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return top, left, h, w


def resized_crop(x, top, left, h, w, size, flip=None):
    """Crop box i of image i (all (B,) tensors) and resize it bilinearly to size x size;
    mirror horizontally where flip is True. x: float (B, C, H, W)."""
    B, C, H, W = x.shape
    steps = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size  # output pixel centres
    # Source coordinates in pixels, as torchvision's resize computes them (half-pixel
    # centres), clamped to the crop so its edge pixels repeat instead of its neighbours.
    xs = (left[:, None] + steps * w[:, None] - 0.5).clamp(min=left[:, None], max=(left + w - 1)[:, None])  # (B, S)
    ys = (top[:, None] + steps * h[:, None] - 0.5).clamp(min=top[:, None], max=(top + h - 1)[:, None])
    if flip is not None:
        xs = torch.where(flip[:, None], xs.flip(1), xs)
    # grid_sample wants coordinates in [-1, 1] with pixel centres at (2i + 1) / n - 1.
    gx = ((2 * xs + 1) / W - 1)[:, None, :].expand(B, size, size)
    gy = ((2 * ys + 1) / H - 1)[:, :, None].expand(B, size, size)
    grid = torch.stack([gx, gy], dim=-1)  # (B, S, S, 2), x first
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(x):
    """Luma of (B, 3, H, W) as (B, 1, H, W), with the ITU-R 601 weights torchvision uses."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def adjust_brightness(x, f):  # f: (B, 1, 1, 1); blend with black
    return (x * f).clamp(0, 1)


def adjust_contrast(x, f):  # blend with the image's mean grey level
    mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x, f):  # blend with the grey image
    return (f * x + (1 - f) * grey(x)).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate hue by shift (B, 1, 1, 1), in turns, through RGB -> HSV -> RGB."""
    r, g, b = x.unbind(1)
    v, minc = x.max(dim=1).values, x.min(dim=1).values  # HSV's value is the largest channel
    span = v - minc
    flat = span == 0
    safe = torch.where(flat, torch.ones_like(span), span)
    s = span / torch.where(v == 0, torch.ones_like(v), v)
    # Hue in sixths of a turn, measured from the dominant channel.
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.remainder(torch.where(flat, torch.zeros_like(h), h) / 6 + shift.view(-1, 1, 1), 1.0)
    # Back to RGB: the standard sextant formulas.
    h6 = h * 6
    i = torch.floor(h6).long() % 6
    frac = h6 - torch.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    table = torch.stack([torch.stack(c, 1) for c in
                         [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 1)  # (B, 6, 3, H, W)
    return table.gather(1, i[:, None, None].expand(-1, 1, 3, -1, -1)).squeeze(1)


def gaussian_blur(x, sigma, kernel_size):
    """Blur image i with its own sigma[i]; separable kernel, reflect padding, as torchvision."""
    B, C, H, W = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, k)
    y = F.pad(x.reshape(1, B * C, H, W), (kernel_size // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)


@dataclasses.dataclass
class Augment:
    """One view's augmentation recipe, applied to a uint8 batch on its own device. Defaults are the SimCLR/SimSiam
    CIFAR recipe (SimSiam paper, Sec. A: crop scale 0.2-1, jitter 0.4/0.4/0.4/0.1 with p=0.8, greyscale p=0.2); blur
    is only used for images of 64 px and more, as in the CIFAR experiments of those papers."""
    size: int
    mean: tuple
    std: tuple
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0

    def __call__(self, x):
        B, dev = x.shape[0], x.device
        u = lambda: torch.rand(B, 1, 1, 1, device=dev)  # one draw per image
        top, left, h, w = sample_crops(B, x.shape[2], x.shape[3], self.scale, self.ratio, dev)
        x = resized_crop(x.float() / 255, top, left, h, w, self.size, torch.rand(B, device=dev) < self.flip_p)
        # torchvision's ColorJitter with each image's own factors and op order; skipped images get identity factors.
        apply, (bri, con, sat, hue) = u() < self.jitter_p, self.jitter
        factor = lambda lo, hi, off: torch.where(apply, torch.empty(B, 1, 1, 1, device=dev).uniform_(lo, hi), off)
        factors = [factor(1 - s, 1 + s, 1.0) for s in (bri, con, sat)] + [factor(-hue, hue, 0.0)]
        order = torch.rand(B, 4, device=dev).argsort(dim=1)  # a random permutation per image
        x = apply_jitter(x, *factors, order, apply)
        x = torch.where(u() < self.grey_p, grey(x).expand(-1, 3, -1, -1), x)
        if self.blur_p > 0 and self.size >= 64:
            kernel = int(0.1 * self.size) // 2 * 2 + 1  # 10% of the image, odd (SimCLR, App. A)
            sigma = torch.empty(B, device=dev).uniform_(0.1, 2.0)
            x = torch.where(u() < self.blur_p, gaussian_blur(x, sigma, kernel), x)
        if self.solarize_p > 0:
            x = torch.where(u() < self.solarize_p, solarize(x), x)
        # mean and std made once per device: a host-to-device copy in every step would make the CPU wait for the GPU.
        stats = self.__dict__.setdefault("_stats", {})
        if dev not in stats:
            stats[dev] = [torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (self.mean, self.std)]
        return (x - stats[dev][0]) / stats[dev][1]  # the channels-last model's first conv makes it channels-last


def apply_jitter(x, fb, fc, fs, fh, order, apply=True):
    """Brightness (op 0), contrast (1), saturation (2) and hue (3) with per-image factors (B, 1, 1, 1), image i running
    them in the order order[i] (B, 4). Hue runs only where apply (B, 1, 1, 1) holds: a zero shift is not exact."""
    for k in range(4):
        op = order[:, k].view(-1, 1, 1, 1)
        # Stage k runs, for each image, the op it drew for position k; the other three ops
        # get identity factors (exact no-ops), so no image is indexed out of the batch.
        x = adjust_brightness(x, torch.where(op == 0, fb, 1.0))
        x = adjust_contrast(x, torch.where(op == 1, fc, 1.0))
        x = adjust_saturation(x, torch.where(op == 2, fs, 1.0))
        x = torch.where((op == 3) & apply, adjust_hue(x, fh), x)
    return x
