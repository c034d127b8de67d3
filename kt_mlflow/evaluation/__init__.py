"""Functional evaluation: put blocks into networks and measure test accuracy, many networks at once."""
from .functional import network_accuracy

__all__ = ["network_accuracy"]
