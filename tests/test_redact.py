"""One rule redacts credentials from every URL kt prints, logs or stores."""
from __future__ import annotations

import pytest

from kt_mlflow.redact import redact


@pytest.mark.parametrize("url, shown", [
    ("postgresql://me:pw@db:5432/optuna?password=pw2&sslmode=require&sslkey=/k.pem&api_token=t",
     "postgresql://me:***@db:5432/optuna?password=***&sslmode=require&sslkey=***&api_token=***"),
    ("http://user:secret@127.0.0.1:5000/?token=abc", "http://user:***@127.0.0.1:5000/?token=***"),
    ("sqlite:///home/me/optuna.db", "sqlite:///home/me/optuna.db"),
    ("https://mlflow.example.com", "https://mlflow.example.com"),
])
def test_credentials_are_redacted_and_the_rest_kept(url, shown):
    assert redact(url) == shown
