"""MNIST and Fashion-MNIST: IDX files from the package, a ``--data-root`` folder, or a torchvision download.

``mnist`` without a ``data_root`` reads the real MNIST test set shipped in ``kt_mlflow/data/mnist``
(each file checked against its sha256 first), split 8,000 train / 2,000 test. ``fashion_mnist`` always
needs a ``data_root``: torchvision's ``FashionMNIST/raw`` layout, the four files directly there, or an
empty folder to download them into.

Example:
    >>> load_mnist_raw(None).train_x.shape
    torch.Size([8000, 1, 28, 28])
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional

from ..errors import KTError, first_line
from .idx import CHUNK, MNIST_URL_HINT, find_idx, read_idx_pair
from .images import RawImages, split

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_STEMS = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
FASHION_HINT = ("the four Fashion-MNIST IDX files (train-/t10k- images-idx3-ubyte and labels-idx1-ubyte, "
                ".gz or raw)")
BUNDLED_MNIST = Path(__file__).resolve().parent / "mnist"
BUNDLED_SHA256: Dict[str, str] = {  # the unmodified MNIST t10k files
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}


def _read_mnist(root: Path) -> RawImages:
    """The IDX files in ``root``: train and t10k when both are there, else t10k split 8,000 / 2,000."""
    files = {s: find_idx(root, s) for s in MNIST_STEMS}
    if files["t10k-images-idx3-ubyte"] is None or files["t10k-labels-idx1-ubyte"] is None:
        raise KTError(
            f"MNIST data_root {root} has no t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]; "
            f"put {MNIST_URL_HINT} there, or omit --data-root for the bundled MNIST test set."
        )
    test_x, test_y = read_idx_pair(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"],
                                   "MNIST t10k", MNIST_URL_HINT)
    if files["train-images-idx3-ubyte"] and files["train-labels-idx1-ubyte"]:
        train_x, train_y = read_idx_pair(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"],
                                         "MNIST train", MNIST_URL_HINT)
        return RawImages("mnist", train_x, train_y, test_x, test_y)
    # Only the test set is here: a fixed 8,000 / 2,000 split stands in for MNIST.
    return RawImages("mnist", *split(test_x, test_y, n_test=len(test_x) // 5))


def _load_mnist_folder(root: Path) -> RawImages:
    """``--data-root``: the IDX files there, or the full MNIST downloaded into it when it holds none."""
    if not root.is_dir():
        raise KTError(f"MNIST data_root {root} is not a folder; point --data-root at a folder holding {MNIST_URL_HINT} "
                      "(an empty one to download them), or omit it for the bundled MNIST test set.")
    if not any(find_idx(root, s) for s in MNIST_STEMS):
        return _download_mnist(root)
    return _read_mnist(root)


def _download_mnist(root: Path) -> RawImages:
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
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load_bundled_mnist() -> RawImages:
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


def load_mnist_raw(data_root: Optional[str]) -> RawImages:
    """MNIST as uint8: the bundled test set without ``data_root``, else the files in (or downloaded to) it."""
    return _load_mnist_folder(Path(data_root).expanduser()) if data_root else _load_bundled_mnist()


def _fashion_folder(root: Path) -> Optional[Path]:
    """Where the Fashion-MNIST files are: torchvision's ``FashionMNIST/raw`` first, then ``root`` itself."""
    for folder in (root / "FashionMNIST" / "raw", root):
        if any(find_idx(folder, s) for s in MNIST_STEMS):
            return folder
    return None


def _download_fashion(root: Path) -> Path:
    """Fashion-MNIST downloaded into ``root/FashionMNIST/raw`` by torchvision (which only reads IDX files)."""
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as e:
        raise KTError(f"could not download Fashion-MNIST into {root} ({first_line(e)}); put {FASHION_HINT} "
                      "there.") from None
    return root / "FashionMNIST" / "raw"


def load_fashion_raw(data_root: Optional[str]) -> RawImages:
    """Fashion-MNIST (60,000 train + 10,000 test) as uint8 from ``data_root``, downloaded there if it holds none.

    Example:
        >>> load_fashion_raw("~/data").test_x.shape  # doctest: +SKIP
        torch.Size([10000, 1, 28, 28])
    """
    if not data_root:
        raise KTError("fashion_mnist needs --data-root: a folder with the Fashion-MNIST IDX files "
                      "(or FashionMNIST/raw), or an empty one to download them into.")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise KTError(f"Fashion-MNIST data_root {root} is not a folder; point --data-root at a folder holding "
                      f"{FASHION_HINT}, or at an empty one to download them into.")
    folder = _fashion_folder(root) or _download_fashion(root)
    files = {s: find_idx(folder, s) for s in MNIST_STEMS}
    missing = [s for s, path in files.items() if path is None]
    if missing:
        raise KTError(f"Fashion-MNIST folder {folder} lacks {', '.join(m + '[.gz]' for m in missing)}; "
                      f"put {FASHION_HINT} there, or point --data-root at an empty folder to download them.")
    pairs = [read_idx_pair(files[f"{p}-images-idx3-ubyte"], files[f"{p}-labels-idx1-ubyte"],
                           f"Fashion-MNIST {p}", FASHION_HINT) for p in ("train", "t10k")]
    return RawImages("fashion_mnist", *pairs[0], *pairs[1])
