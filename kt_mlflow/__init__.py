"""kt-mlflow: Knowledge Translation (arXiv 2401.05772) as an MLflow project and plugin.

Example:
    >>> import kt_mlflow
    >>> fam = kt_mlflow.create_family("paper_mnist")
    >>> tr = kt_mlflow.load_translator("kt-paper_mnist-mixer")   # doctest: +SKIP
    >>> small_net = tr.compress(my_trained_base_network)          # doctest: +SKIP
"""
from .blocks import create_family, family_names
from .errors import KTError

__version__ = "0.1.0"


def load_translator(name_or_uri: str, device: str = "cpu"):
    """Pull a registered translator by name or ``models:/NAME@alias`` (see ``tracking.models``)."""
    from .tracking.models import load_translator as _load

    return _load(name_or_uri, device)


__all__ = ["create_family", "family_names", "load_translator", "KTError", "__version__"]
