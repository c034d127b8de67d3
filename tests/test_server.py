"""A tracking server that does not answer is one line within seconds, for every subcommand."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port

from kt_mlflow.errors import KTError
from kt_mlflow.tracking.server import check_tracking_server

COMMANDS = {
    "generate": [], "train": [], "evaluate": [], "main": [], "sweep": ["--n-trials", "1"],
    "compress": ["--model", "kt-x", "--input", "missing.pt", "--output", "out.pt"],
    "register": ["--translator", "kept"],
    "finetune": ["--input", "missing.pt", "--output", "out.pt"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_against_a_closed_port_ends_in_one_line(command, tmp_path):
    uri = f"http://user:secret@127.0.0.1:{free_port()}/?token=abc"
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "translator.json").write_text("{}")          # what `kt register` checks before asking MLflow
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kt_mlflow", command, *COMMANDS[command]], cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, "KT_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 30 and done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"kt {command}: error: the MLflow tracking server http://user:***@127.0.0.1:")
    assert "does not answer" in line and "secret" not in line and "abc" not in line


def test_a_server_that_accepts_but_never_answers_times_out_as_configured(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        held = []
        threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
        monkeypatch.setenv("KT_TRACKING_TIMEOUT", "1.5")
        with pytest.raises(KTError, match=r"does not answer \(.*timed out.*\).*waited up to 1.5 s"):
            check_tracking_server(f"http://127.0.0.1:{port}")
        assert held                                      # it connected: the wait was for an answer


def test_a_live_server_and_stores_that_are_no_server_pass(tracking_server):
    check_tracking_server(tracking_server)
    check_tracking_server("sqlite:///somewhere.db")
    check_tracking_server("")


def test_the_closed_port_test_covers_every_subcommand():
    from kt_mlflow.cli import STEPS

    assert set(COMMANDS) == set(STEPS)
