"""scikit-learn's bundled 8x8 handwritten digits, brought to MNIST's 28x28 geometry; nothing to download.

Example:
    >>> load_digits_raw().train_x.shape
    torch.Size([1437, 1, 28, 28])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import KTError
from .images import RawImages, split


def load_digits_raw() -> RawImages:
    """The 1,797 digits as uint8 ``(N, 1, 28, 28)``, split 1,437 train / 360 test by ``SPLIT_SEED``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a declared dependency
        raise KTError("dataset 'digits' needs scikit-learn; run: pip install scikit-learn") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    # Bring to MNIST's geometry: a 20x20 digit centred in a 28x28 frame.
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.tensor(d.target, dtype=torch.int64)
    return RawImages("digits", *split(x, y, n_test=360))
