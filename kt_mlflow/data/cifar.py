"""CIFAR-10 from torchvision's on-disk layout, read as data (see ``cifar_pickle``), downloaded when asked.

``<data_root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``, or those files directly in
``<data_root>``. Train is the data batches found (50,000 images with all five), test is ``test_batch``.
An empty ``data_root`` gets the archive downloaded (md5-checked) and extracted into it; torchvision's
``CIFAR10`` class is never built, since it unpickles the batches.

Example:
    >>> load_cifar10_raw("~/data").train_x.shape  # doctest: +SKIP
    torch.Size([50000, 3, 32, 32])
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import KTError, first_line
from .cifar_pickle import read_cifar_batch
from .images import RawImages

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_HINT = f"{CIFAR_DIR}/ with data_batch_1..5 and test_batch (from {CIFAR_URL})"


def _batch_folder(root: Path) -> Optional[Path]:
    """``root/cifar-10-batches-py`` or ``root`` itself, whichever holds a CIFAR-10 batch file, else None."""
    for folder in (root / CIFAR_DIR, root):
        if any((folder / name).is_file() for name in CIFAR_TRAIN + (CIFAR_TEST,)):
            return folder
    return None


def _download(root: Path) -> Path:
    """Download and extract the archive into an empty ``root`` (a left-over archive is re-checked, not refetched)."""
    leftovers = [p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != CIFAR_URL.rsplit("/", 1)[1]]
    if leftovers:  # never download into a folder that holds something else: it is probably the wrong one
        raise KTError(f"CIFAR-10 data_root {root} holds no CIFAR-10 batches but other files ({leftovers[0]}, ...); "
                      f"point --data-root at {CIFAR_HINT}, or at an empty folder to download it.")
    try:
        from torchvision.datasets import utils

        utils.download_and_extract_archive(CIFAR_URL, str(root), md5=CIFAR_MD5)
    except Exception as e:
        raise KTError(f"could not download CIFAR-10 into {root} ({first_line(e)}); put {CIFAR_HINT} there.") from None
    return root / CIFAR_DIR


def _read(paths: List[Path]) -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(read_cifar_batch(p) for p in paths))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar10_raw(data_root: Optional[str]) -> RawImages:
    """CIFAR-10 as uint8 ``(N, 3, 32, 32)`` from ``data_root`` (downloaded into it when it is empty)."""
    if not data_root:
        raise KTError(f"cifar10 needs --data-root: a folder holding {CIFAR_HINT}, or an empty one to download into.")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise KTError(f"CIFAR-10 data_root {root} is not a folder; point --data-root at a folder holding "
                      f"{CIFAR_HINT}, or at an empty one to download into.")
    folder = _batch_folder(root) or _download(root)
    if not (folder / CIFAR_TEST).is_file():
        raise KTError(f"CIFAR-10 folder {folder} has no {CIFAR_TEST}; put {CIFAR_HINT} there "
                      "(or point --data-root at an empty folder to download it).")
    train = [folder / name for name in CIFAR_TRAIN if (folder / name).is_file()]
    if not train:
        raise KTError(f"CIFAR-10 folder {folder} has no data_batch_1..5; put {CIFAR_HINT} there "
                      "(or point --data-root at an empty folder to download it).")
    return RawImages("cifar10", *_read(train), *_read([folder / CIFAR_TEST]))
