"""Your own images: ``<data_root>/<class>/<image files>``, decoded by PIL straight to the network's input size.

Classes are the sub-folders sorted by name (labels 0..K-1). With both ``<data_root>/train/<class>/`` and
``<data_root>/test/<class>/`` those are the split; otherwise all images are split 80 / 20 by ``SPLIT_SEED``.
Image files are png, jpg, jpeg, bmp, gif or webp (any case) directly in a class folder; others are ignored.

Example:
    >>> load_imagefolder_raw("~/flowers", channels=3, image_size=64).train_x.shape[1:]  # doctest: +SKIP
    torch.Size([3, 64, 64])
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import KTError, first_line
from .images import RawImages, split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PROGRESS_OVER = 1_000  # show a decode progress bar only when it is worth watching
LAYOUT = "<data_root>/<class>/<images> (or <data_root>/train/<class>/ and <data_root>/test/<class>/)"


def _classes(folder: Path, minimum: int = 2) -> List[str]:
    """The class folder names in ``folder``, sorted; at least ``minimum`` (a test split may lack classes)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < minimum:
        raise KTError(f"imagefolder {folder} has {len(names)} class folder(s) ({', '.join(names) or 'none'}); "
                      f"it needs at least {minimum}, laid out as {LAYOUT}.")
    return names


def _images(folder: Path) -> List[Path]:
    """The image files directly in a class folder, sorted by name; a class without any is an error."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KTError(f"imagefolder class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                      "add some or remove the folder.")
    return files


def _labelled(folder: Path, classes: Sequence[str], names: Sequence[str]) -> Tuple[List[Path], List[int]]:
    """Every image under ``folder/<name>`` for ``names``, labelled by its index in ``classes``."""
    paths, labels = [], []
    for name in names:
        files = _images(folder / name)
        paths += files
        labels += [classes.index(name)] * len(files)
    return paths, labels


def _decode(paths: Sequence[Path], channels: int, image_size: int) -> torch.Tensor:
    """uint8 ``(N, channels, image_size, image_size)``: each image converted by PIL and resized bilinearly."""
    from PIL import Image
    from tqdm import tqdm

    mode = "RGB" if channels == 3 else "L"  # PIL's L is the same luma, 0.299 R + 0.587 G + 0.114 B
    out = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="decoding images", unit="img", disable=len(paths) <= PROGRESS_OVER)):
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise KTError(f"cannot read image {path} ({first_line(e)}); replace or remove it.") from None
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(out)


def load_imagefolder_raw(data_root: Optional[str], channels: int, image_size: int) -> RawImages:
    """The images under ``data_root`` as uint8 at the network's input size, labelled by sorted class name."""
    if not data_root:
        raise KTError(f"imagefolder needs --data-root: a folder laid out as {LAYOUT}.")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise KTError(f"imagefolder data_root {root} is not a folder; point --data-root at one laid out as {LAYOUT}.")
    name = f"imagefolder-{'rgb' if channels == 3 else 'gray'}-{image_size}"
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, test_classes = _classes(root / "train"), _classes(root / "test", minimum=1)
        extra = [c for c in test_classes if c not in classes]
        if extra:
            raise KTError(f"imagefolder {root / 'test'} has class {extra[0]!r}, which {root / 'train'} lacks; "
                          "give train and test the same class folders.")
        train_paths, train_y = _labelled(root / "train", classes, classes)
        test_paths, test_y = _labelled(root / "test", classes, test_classes)
        x = _decode(train_paths + test_paths, channels, image_size)
        y = torch.tensor(train_y + test_y, dtype=torch.int64)
        n = len(train_paths)
        return RawImages(name, x[:n], y[:n], x[n:], y[n:])
    classes = _classes(root)
    paths, labels = _labelled(root, classes, classes)
    x, y = _decode(paths, channels, image_size), torch.tensor(labels, dtype=torch.int64)
    return RawImages(name, *split(x, y, n_test=max(1, len(paths) // 5)))
