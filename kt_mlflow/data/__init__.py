"""Image datasets as in-memory tensors, fitted to a network's input.

``digits`` (scikit-learn's bundled 8x8 handwritten digits, resized to 28x28) needs no download.
``mnist`` without a ``data_root`` reads the real MNIST test set shipped in ``kt_mlflow/data/mnist``
(the unmodified 10,000 ``t10k`` images and labels, CC BY-SA 3.0, see its LICENSE.md; each file is
checked against its sha256 first), split 8,000 train / 2,000 test, deterministically: nothing
outside the package is needed. With a ``data_root`` it reads the IDX files there (the 60,000-image
train set when present, else the same 8,000 / 2,000 split of ``t10k``); a folder holding no MNIST
files gets the full set downloaded into it through torchvision. ``fashion_mnist`` and ``cifar10``
read torchvision's on-disk layouts under ``data_root`` (an empty one is downloaded into; CIFAR-10's
pickles are parsed as data, never unpickled); ``imagefolder`` reads ``<data_root>/<class>/<images>``.

Every dataset is then fitted to ``channels`` x ``image_size`` x ``image_size`` (see ``fit``); with the
defaults ``digits`` and ``mnist`` are exactly what they always were.

Example:
    >>> from kt_mlflow.data import load_dataset
    >>> data = load_dataset("digits")
    >>> data.train_x.shape[1:]
    torch.Size([1, 28, 28])
    >>> load_dataset("mnist", channels=3, image_size=32, colour=True).name
    'mnist-colour-32'
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Mapping, Optional, Tuple

from ..config import DATASETS
from ..errors import KTError
from .cifar import load_cifar10_raw
from .cifar_pickle import read_cifar_batch
from .digits import load_digits_raw
from .fit import check_fit_args, fit_dataset, fit_images
from .idx import MNIST_URL_HINT, read_idx
from .imagefolder import load_imagefolder_raw
from .images import SPLIT_SEED, ImageData, RawImages
from .mnist_sets import BUNDLED_MNIST, BUNDLED_SHA256, MNIST_MEAN, MNIST_STD, load_fashion_raw, load_mnist_raw

__all__ = ["BUNDLED_MNIST", "BUNDLED_SHA256", "DATASETS", "MNIST_MEAN", "MNIST_STD", "MNIST_URL_HINT", "SPLIT_SEED",
           "ImageData", "RawImages", "fit_images", "load_dataset", "load_for", "read_cifar_batch", "read_idx"]

SOURCE_CHANNELS: Dict[str, Optional[int]] = {  # channels as stored; None: decoded straight to what is asked
    "digits": 1, "mnist": 1, "fashion_mnist": 1, "cifar10": 3, "imagefolder": None}


def _load_raw(name: str, data_root: Optional[str]) -> Tuple[RawImages, Optional[Tuple[float, float]]]:
    """The dataset as read (uint8) and the fixed (mean, std) its unfitted form keeps, if any."""
    if name == "digits":
        return load_digits_raw(), (MNIST_MEAN, MNIST_STD)
    if name == "mnist":
        return load_mnist_raw(data_root), (MNIST_MEAN, MNIST_STD)
    if name == "fashion_mnist":
        return load_fashion_raw(data_root), None
    return load_cifar10_raw(data_root), None


@lru_cache(maxsize=4)
def load_dataset(name: str, data_root: Optional[str] = None, channels: int = 1, image_size: int = 28,
                 colour: bool = False) -> ImageData:
    """Load ``name`` (one of ``DATASETS``) fitted to ``channels`` x ``image_size``; cached per process.

    The tensors are shared by every caller of the same arguments: treat them as read-only.

    Example:
        >>> load_dataset("digits", channels=3, image_size=32).train_x.shape[1:]
        torch.Size([3, 32, 32])
    """
    if name not in DATASETS:
        raise KTError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    fit_args = (channels, image_size, colour)
    check_fit_args(name, SOURCE_CHANNELS[name], *fit_args)
    if name == "imagefolder":
        return fit_dataset(load_imagefolder_raw(data_root, channels, image_size), *fit_args)
    raw, fixed = _load_raw(name, data_root)
    return fit_dataset(raw, *fit_args, fixed=fixed)


def load_for(family, dataset: str, data_root: Optional[str] = None, colour: bool = False,
             pair_settings: Optional[Mapping[str, object]] = None) -> ImageData:
    """``dataset`` fitted to a block family's input (``in_channels``, ``image_size``); a pair set made on
    images in colour (its ``pair_settings``) gets them in colour too.

    Example:
        >>> from kt_mlflow.blocks import create_family
        >>> load_for(create_family("rgb32"), "mnist", colour=True).train_x.shape[1:]
        torch.Size([3, 32, 32])
    """
    colour = colour or bool((pair_settings or {}).get("colour", False))
    data = load_dataset(dataset, data_root, family.in_channels, family.image_size, colour)
    classes = int(max(data.train_y.max(), data.test_y.max())) + 1
    if classes > family.num_classes:  # a label past the classifier's outputs fails deep in training otherwise
        raise KTError(f"{dataset} ({data_root or 'bundled'}) has {classes} classes, but family {family.name} "
                      f"classifies {family.num_classes}; set input.classes: {classes} in the family file.")
    return data
