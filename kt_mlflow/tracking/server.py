"""Fail fast when the tracking server does not answer, instead of MLflow's minutes of retries.

Example:
    >>> check_tracking_server("sqlite:///mlflow.db")   # not a server: nothing to ask
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Optional

from ..errors import KTError
from ..redact import redact

TIMEOUT_ENV = "KT_TRACKING_TIMEOUT"   # seconds to wait for the server's answer (default 15)


def check_tracking_server(uri: Optional[str] = None) -> None:
    """One line, within ``$KT_TRACKING_TIMEOUT`` seconds, if the MLflow server at ``uri`` (default
    ``$MLFLOW_TRACKING_URI``) does not answer; any HTTP answer counts (a proxy may guard /health)."""
    uri = uri if uri is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "15"))
    except ValueError:
        raise KTError(f"{TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}.") from None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise KTError(f"the MLflow tracking server {redact(uri)} does not answer ({reason}); start it, or point "
                      f"MLFLOW_TRACKING_URI at one that runs (waited up to {timeout:g} s: {TIMEOUT_ENV}).") from None
