"""Credentials out of URLs before they are printed, logged or stored (one rule for every URL kt shows).

Example:
    >>> redact("postgresql://me:pw@db/optuna?password=pw2&sslmode=require")
    'postgresql://me:***@db/optuna?password=***&sslmode=require'
"""
from __future__ import annotations

import re

_USERINFO = re.compile(r"(://[^:/@]+:)[^@]*@")
_SECRET_QUERY = re.compile(r"([?&][^=&]*(?:pass|pwd|secret|token|key|cred)[^=&]*=)[^&]*", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` without its credentials: the password of its user info, and the values of query-string
    keys such as ``password=``, ``sslkey=`` or ``token=``."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", url))
