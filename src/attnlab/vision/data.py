"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (`bash install.sh` installs it): 60k training and
10k test images of 28 x 28 grey pixels in 10 classes, read from the package's idx.gz files. Nothing is downloaded
at run time; a missing or damaged file is a one-line error naming the fix.

The folder is $ATTNLAB_FASHION_MNIST when set, else the first complete one of /usr/share/datasets/fashion-mnist
(Debian) and <attnlab cache>/fashion-mnist.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch

from ..data import DataNotInstalled
from ..models import cache_dir
from ..types import OptionError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# images in each split of the real dataset: a --train-size / --test-size above these is refused before any read
SIZES = {"train": 60000, "test": 10000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# mean and standard deviation of the training pixels (in [0, 1]); inputs are normalised with them
MEAN, STD = 0.2860, 0.3530
_INSTALL = ("install Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`; `bash install.sh` "
            "does it) or set ATTNLAB_FASHION_MNIST to a folder holding its four idx.gz files")


def candidate_dirs() -> list[Path]:
    env = os.environ.get("ATTNLAB_FASHION_MNIST")
    return ([Path(env)] if env else []) + [DEBIAN_DIR, cache_dir() / "fashion-mnist"]


def fashion_mnist_dir() -> Path:
    """The folder holding all four files: $ATTNLAB_FASHION_MNIST when set (and only it: a wrong setting is an
    error, not a silent fall-back), else the first complete one of the Debian and cache folders."""
    names = [n for pair in FILES.values() for n in pair]
    env = os.environ.get("ATTNLAB_FASHION_MNIST")
    if env:
        missing = [n for n in names if not (Path(env) / n).is_file()]
        if missing:
            raise DataNotInstalled(f"ATTNLAB_FASHION_MNIST={env!r} lacks {', '.join(missing)}; {_INSTALL}")
        return Path(env)
    for d in candidate_dirs():
        if all((d / n).is_file() for n in names):
            return d
    raise DataNotInstalled(f"Fashion-MNIST not found (looked in {', '.join(str(d) for d in candidate_dirs())}); {_INSTALL}")


def read_idx(path: Path) -> torch.Tensor:
    """An idx file (gzip) as a uint8 tensor: [N, rows, cols] for images (magic 2051), [N] for labels (2049)."""
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataNotInstalled(f"{path} is not a readable gzip file ({e}); {_INSTALL}") from None
    if len(raw) < 8:
        raise DataNotInstalled(f"{path} is truncated; {_INSTALL}")
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        shape, offset = (n, rows, cols), 16
    elif magic == 2049:
        shape, offset = (n,), 8
    else:
        raise DataNotInstalled(f"{path} is not an idx image or label file (magic {magic}); {_INSTALL}")
    size = 1
    for s in shape:
        size *= s
    if len(raw) - offset != size:
        raise DataNotInstalled(f"{path} holds {len(raw) - offset} bytes of data, its header says {size}; {_INSTALL}")
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).view(shape)


def fashion_mnist(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of `split` ('train' or 'test'); the first `limit` if given."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = fashion_mnist_dir()
    images, labels = (read_idx(d / n) for n in FILES[split])
    if images.shape[0] != labels.shape[0]:
        raise DataNotInstalled(f"{d}: {split} has {images.shape[0]} images but {labels.shape[0]} labels; {_INSTALL}")
    if limit is not None:
        if limit > images.shape[0]:  # never fewer images than asked for, silently
            raise OptionError(f"{split}_size {limit} exceeds the {images.shape[0]} {split} images in {d}")
        images, labels = images[:limit], labels[:limit]
    return images, labels.long()
