"""Image datasets as in-memory tensors.

``digits`` (scikit-learn's bundled 8x8 handwritten digits, resized to 28x28) needs no download.
``mnist`` without a ``data_root`` reads the real MNIST test set shipped in ``kt_mlflow/data/mnist``
(the unmodified 10,000 ``t10k`` images and labels, CC BY-SA 3.0, see its LICENSE.md; each file is
checked against its sha256 first), split 8,000 train / 2,000 test, deterministically: nothing
outside the package is needed. With a ``data_root`` it reads the IDX files there (the 60,000-image
train set when present, else the same 8,000 / 2,000 split of ``t10k``); a folder holding no MNIST
files gets the full set downloaded into it through torchvision.

Example:
    >>> from kt_mlflow.data import load_dataset
    >>> data = load_dataset("digits")
    >>> data.train_x.shape[1:]
    torch.Size([1, 28, 28])
"""
from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import KTError, first_line

DATASETS = ("digits", "mnist")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLIT_SEED = 20240111  # fixed: every run and every worker sees the same train/test split
MNIST_URL_HINT = "the four MNIST IDX files (train-/t10k- images-idx3-ubyte and labels-idx1-ubyte, .gz or raw)"
MNIST_STEMS = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
BUNDLED_MNIST = Path(__file__).resolve().parent / "mnist"
BUNDLED_SHA256: Dict[str, str] = {  # the unmodified MNIST t10k files
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_CHUNK = 1 << 20


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


def _open_idx(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _stream_size(path: Path) -> int:
    """Bytes of the IDX stream: the file's size, or for gzip the decompressed size (streamed, not held)."""
    if path.suffix != ".gz":
        return path.stat().st_size
    size = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
    return size


def _read_header(f: BinaryIO, path: Path) -> Tuple[int, ...]:
    """The dims of an unsigned-byte IDX file, from its 4-byte magic and ``ndim`` big-endian sizes."""
    magic = f.read(4)
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
        raise KTError(f"{path} is not an unsigned-byte IDX file; expected {MNIST_URL_HINT}.")
    raw = f.read(4 * magic[3])
    if len(raw) < 4 * magic[3]:
        raise KTError(f"{path} has a truncated IDX header ({4 + len(raw)} of {4 + 4 * magic[3]} bytes); "
                      "re-download it.")
    return tuple(int.from_bytes(raw[i: i + 4], "big") for i in range(0, len(raw), 4))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a uint8 array; malformed files raise a KTError naming them.

    The header is checked against the stream's size before any data is read, so a bad header never
    makes it allocate or read more than the file holds.
    """
    try:
        with _open_idx(path) as f:
            dims = _read_header(f, path)
            offset, expected = 4 + 4 * len(dims), math.prod(dims)
            have = _stream_size(path) - offset
            if have != expected:
                raise KTError(f"{path} is truncated: header says {dims}, file has {have} bytes of data; "
                              "re-download it.")
            raw = f.read(expected)
    except (OSError, EOFError, zlib.error) as e:
        raise KTError(f"cannot read {path} ({e}); replace it with an intact copy of {MNIST_URL_HINT}.") from None
    if len(raw) != expected:
        raise KTError(f"{path} changed while it was read; replace it with an intact copy of {MNIST_URL_HINT}.")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def _find(root: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _read_mnist(root: Path) -> ImageData:
    """The IDX files in ``root``: train and t10k when both are there, else t10k split 8,000 / 2,000."""
    files = {s: _find(root, s) for s in MNIST_STEMS}
    if files["t10k-images-idx3-ubyte"] is None or files["t10k-labels-idx1-ubyte"] is None:
        raise KTError(
            f"MNIST data_root {root} has no t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]; "
            f"put {MNIST_URL_HINT} there, or omit --data-root for the bundled MNIST test set."
        )

    def pair(prefix: str) -> Tuple[torch.Tensor, torch.Tensor]:
        x = read_idx(files[f"{prefix}-images-idx3-ubyte"])
        y = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise KTError(f"MNIST {prefix} images {x.shape} and labels {y.shape} in {root} do not match; "
                          "re-download them.")
        return _normalise(torch.from_numpy(x.copy())[:, None]), torch.from_numpy(y.astype(np.int64))

    test_x, test_y = pair("t10k")
    if files["train-images-idx3-ubyte"] and files["train-labels-idx1-ubyte"]:
        train_x, train_y = pair("train")
        return ImageData("mnist", train_x, train_y, test_x, test_y)
    # Only the test set is here: a fixed 8,000 / 2,000 split stands in for MNIST.
    return ImageData("mnist", *_split(test_x, test_y, n_test=len(test_x) // 5))


def _load_mnist_folder(root: Path) -> ImageData:
    """``--data-root``: the IDX files there, or the full MNIST downloaded into it when it holds none."""
    if not root.is_dir():
        raise KTError(f"MNIST data_root {root} is not a folder; point --data-root at a folder holding {MNIST_URL_HINT} "
                      "(an empty one to download them), or omit it for the bundled MNIST test set.")
    if not any(_find(root, s) for s in MNIST_STEMS):
        return _download_mnist(root)
    return _read_mnist(root)


def _download_mnist(root: Path) -> ImageData:
    """The full MNIST (60,000 + 10,000 images) downloaded into ``root`` through torchvision, read from there."""
    try:
        from torchvision.datasets import MNIST

        for train in (True, False):  # a no-op where root/MNIST/raw already holds the files
            MNIST(str(root), train=train, download=True)
    except Exception as e:
        raise KTError(f"could not download MNIST into {root} ({first_line(e)}); put {MNIST_URL_HINT} there, "
                      "or omit --data-root for the bundled MNIST test set.") from None
    return _read_mnist(root / "MNIST" / "raw")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load_bundled_mnist() -> ImageData:
    """The MNIST test set shipped in the package, each file checked against its sha256 first."""
    for name, want in BUNDLED_SHA256.items():
        path = BUNDLED_MNIST / name
        try:
            problem = None if _sha256(path) == want else "does not match its sha256 (corrupt or modified)"
        except OSError:
            problem = "is missing or unreadable"
        if problem:
            raise KTError(f"bundled MNIST file {path} {problem}; reinstall kt-mlflow "
                          "(in a checkout: git checkout -- kt_mlflow/data/mnist).")
    return _read_mnist(BUNDLED_MNIST)


@lru_cache(maxsize=4)
def load_dataset(name: str, data_root: Optional[str] = None) -> ImageData:
    """Load ``name`` ('digits' or 'mnist') as tensors; cached per process (the tensors are read-only)."""
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return _load_mnist_folder(Path(data_root).expanduser()) if data_root else _load_bundled_mnist()
    raise KTError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
