"""Image datasets as in-memory tensors.

``digits`` (scikit-learn's bundled 8x8 handwritten digits, resized to 28x28) needs no download and is
the offline default. ``mnist`` reads IDX files from ``data_root`` (a folder holding only the 10,000
``t10k`` images is split 8,000 train / 2,000 test, deterministically) or downloads through torchvision.

Example:
    >>> from kt_mlflow.data import load_dataset
    >>> data = load_dataset("digits")
    >>> data.train_x.shape[1:]
    torch.Size([1, 28, 28])
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import KTError

DATASETS = ("digits", "mnist")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLIT_SEED = 20240111  # fixed: every run and every worker sees the same train/test split
MNIST_URL_HINT = "the four MNIST IDX files (train-/t10k- images-idx3-ubyte and labels-idx1-ubyte, .gz or raw)"


@dataclass(frozen=True)
class ImageData:
    """Normalised images ``(N, 1, 28, 28)`` float32 and int64 labels, already split."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device: torch.device) -> "ImageData":
        return ImageData(self.name, *(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


def _normalise(images_u8: torch.Tensor) -> torch.Tensor:
    return ((images_u8.float() / 255.0) - MNIST_MEAN) / MNIST_STD


def _split(x: torch.Tensor, y: torch.Tensor, n_test: int) -> Tuple[torch.Tensor, ...]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _load_digits() -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a declared dependency
        raise KTError("dataset 'digits' needs scikit-learn; run: pip install scikit-learn") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    # Bring to MNIST's geometry: a 20x20 digit centred in a 28x28 frame.
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    x = _normalise((x.clamp(0, 1) * 255).round().to(torch.uint8))
    y = torch.tensor(d.target, dtype=torch.int64)
    return ImageData("digits", *_split(x, y, n_test=360))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a uint8 array; malformed files raise a KTError naming them."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise KTError(f"cannot read {path} ({e}); replace it with an intact copy of {MNIST_URL_HINT}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise KTError(f"{path} is not an unsigned-byte IDX file; expected {MNIST_URL_HINT}.")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise KTError(f"{path} is truncated: header says {dims}, file has {len(raw) - offset} bytes of data; re-download it.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find(root: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _load_mnist_folder(root: Path) -> ImageData:
    if not root.is_dir():
        raise KTError(f"MNIST data_root {root} is not a folder; point --data-root at a folder holding {MNIST_URL_HINT}.")
    files = {s: _find(root, s) for s in (
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte")}
    if files["t10k-images-idx3-ubyte"] is None or files["t10k-labels-idx1-ubyte"] is None:
        raise KTError(
            f"MNIST data_root {root} has no t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]; "
            f"put {MNIST_URL_HINT} there, or omit --data-root to download MNIST."
        )

    def pair(prefix: str) -> Tuple[torch.Tensor, torch.Tensor]:
        x = read_idx(files[f"{prefix}-images-idx3-ubyte"])
        y = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise KTError(f"MNIST {prefix} images {x.shape} and labels {y.shape} in {root} do not match; re-download them.")
        return _normalise(torch.from_numpy(x.copy())[:, None]), torch.from_numpy(y.astype(np.int64))

    test_x, test_y = pair("t10k")
    if files["train-images-idx3-ubyte"] and files["train-labels-idx1-ubyte"]:
        train_x, train_y = pair("train")
        return ImageData("mnist", train_x, train_y, test_x, test_y)
    # Only the test set is here: a fixed 8,000 / 2,000 split stands in for MNIST.
    return ImageData("mnist", *_split(test_x, test_y, n_test=len(test_x) // 5))


def _download_mnist() -> ImageData:  # pragma: no cover - needs the internet
    from torchvision.datasets import MNIST

    root = Path(os.environ.get("KT_DATA_HOME", Path.home() / ".cache" / "kt_mlflow"))
    try:
        train, test = MNIST(root, train=True, download=True), MNIST(root, train=False, download=True)
    except Exception as e:
        raise KTError(f"could not download MNIST ({e}); pass --data-root with {MNIST_URL_HINT}.") from None
    return ImageData("mnist", _normalise(train.data[:, None]), train.targets, _normalise(test.data[:, None]), test.targets)


@lru_cache(maxsize=4)
def load_dataset(name: str, data_root: Optional[str] = None) -> ImageData:
    """Load ``name`` ('digits' or 'mnist') as tensors; cached per process (the tensors are read-only)."""
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return _load_mnist_folder(Path(data_root).expanduser()) if data_root else _download_mnist()
    raise KTError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
