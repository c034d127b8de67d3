"""IDX files (the MNIST / Fashion-MNIST format), raw or gzip, with the header checked before the data is read.

Example:
    >>> from kt_mlflow.data import BUNDLED_MNIST
    >>> read_idx(BUNDLED_MNIST / "t10k-labels-idx1-ubyte.gz").shape
    (10000,)
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import BinaryIO, Optional, Tuple

import numpy as np
import torch

from ..errors import KTError

MNIST_URL_HINT = "the four MNIST IDX files (train-/t10k- images-idx3-ubyte and labels-idx1-ubyte, .gz or raw)"
CHUNK = 1 << 20


def _open_idx(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _stream_size(path: Path) -> int:
    """Bytes of the IDX stream: the file's size, or for gzip the decompressed size (streamed, not held)."""
    if path.suffix != ".gz":
        return path.stat().st_size
    size = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
    return size


def _read_header(f: BinaryIO, path: Path, hint: str) -> Tuple[int, ...]:
    """The dims of an unsigned-byte IDX file, from its 4-byte magic and ``ndim`` big-endian sizes."""
    magic = f.read(4)
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
        raise KTError(f"{path} is not an unsigned-byte IDX file; expected {hint}.")
    raw = f.read(4 * magic[3])
    if len(raw) < 4 * magic[3]:
        raise KTError(f"{path} has a truncated IDX header ({4 + len(raw)} of {4 + 4 * magic[3]} bytes); "
                      "re-download it.")
    return tuple(int.from_bytes(raw[i: i + 4], "big") for i in range(0, len(raw), 4))


def read_idx(path: Path, hint: str = MNIST_URL_HINT) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a uint8 array; malformed files raise a KTError naming them.

    The header is checked against the stream's size before any data is read, so a bad header never
    makes it allocate or read more than the file holds. ``hint`` says, in errors, which files belong there.

    Example:
        >>> read_idx(BUNDLED_MNIST / "t10k-images-idx3-ubyte.gz").shape  # doctest: +SKIP
        (10000, 28, 28)
    """
    try:
        with _open_idx(path) as f:
            dims = _read_header(f, path, hint)
            offset, expected = 4 + 4 * len(dims), math.prod(dims)
            have = _stream_size(path) - offset
            if have != expected:
                raise KTError(f"{path} is truncated: header says {dims}, file has {have} bytes of data; "
                              "re-download it.")
            raw = f.read(expected)
    except (OSError, EOFError, zlib.error) as e:
        raise KTError(f"cannot read {path} ({e}); replace it with an intact copy of {hint}.") from None
    if len(raw) != expected:
        raise KTError(f"{path} changed while it was read; replace it with an intact copy of {hint}.")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def find_idx(root: Path, stem: str) -> Optional[Path]:
    """``root/stem`` or ``root/stem.gz``, whichever exists first (the raw file wins), else None."""
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_idx_pair(images: Path, labels: Path, what: str, hint: str,
                  classes: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, 1, H, W)`` and int64 labels from an images/labels IDX pair that must match.

    Example:
        >>> x, y = read_idx_pair(BUNDLED_MNIST / "t10k-images-idx3-ubyte.gz",  # doctest: +SKIP
        ...                      BUNDLED_MNIST / "t10k-labels-idx1-ubyte.gz", "MNIST t10k", MNIST_URL_HINT)
    """
    x, y = read_idx(images, hint), read_idx(labels, hint)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise KTError(f"{what} images {x.shape} and labels {y.shape} in {images.parent} do not match; "
                      "re-download them.")
    if len(y) and int(y.max()) >= classes:  # a label past the classifier's outputs fails far away otherwise
        raise KTError(f"{labels} holds label {int(y.max())}, outside 0..{classes - 1}; re-download it.")
    return torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64))
