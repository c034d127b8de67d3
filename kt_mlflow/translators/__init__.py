"""Translator architectures (a registry) and the ``Translator``: a trained net plus its block family.

Example:
    >>> from kt_mlflow.translators import create_translator
    >>> from kt_mlflow.blocks import create_family
    >>> tr = create_translator("mixer", create_family("paper_mnist"), depth=2, width=32)
    >>> small = tr.translate(create_family("paper_mnist").large_block().state_dict())
    >>> tuple(small["conv1.weight"].shape)
    (3, 6, 3, 3)
"""
from __future__ import annotations

from ..registry import Registry
from .channel_set import ChannelSetTranslator
from .mixer import MixerTranslator
from .mlp import MLPTranslator

ARCHITECTURES = Registry("translator architecture")
ARCHITECTURES.register("mixer")(MixerTranslator)
ARCHITECTURES.register("mlp")(MLPTranslator)
ARCHITECTURES.register("channel_set")(ChannelSetTranslator)

from .translator import Translator, create_translator  # noqa: E402

__all__ = ["ARCHITECTURES", "Translator", "create_translator", "MixerTranslator", "MLPTranslator", "ChannelSetTranslator"]
