"""Writes create or replace regular files only, with the user's umask; anything else is refused by name."""
from __future__ import annotations

import os
import socket
import stat

import pytest

from kt_mlflow import cli
from kt_mlflow.errors import KTError
from kt_mlflow.io import atomic_write, atomic_write_json


def _text(path):
    return lambda tmp: tmp.write_text("new")


def test_a_new_file_gets_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", _text(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o640
    atomic_write_json(tmp_path / "a.txt", {"x": 1})                   # a regular file is replaced
    assert (tmp_path / "a.txt").read_text().strip().startswith("{")


@pytest.mark.parametrize("kind", ["symlink", "directory", "device", "fifo", "socket"])
def test_anything_but_a_regular_file_is_refused_and_left_as_it_was(tmp_path, kind):
    target = tmp_path / "kept.txt"
    target.write_text("kept")
    path = tmp_path / "out"
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = type(path)("/dev/null")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    with pytest.raises(KTError, match="kt writes only regular files") as err:
        atomic_write(path, _text(tmp_path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert target.read_text() == "kept" and (kind != "symlink" or path.is_symlink())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    if kind == "device":
        assert path.is_char_device()


def test_compress_refuses_such_outputs_before_any_work(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "somewhere")
    for output in ("/dev/null", str(tmp_path / "dir"), str(tmp_path / "link")):
        # the model and input do not exist: the output is checked first, in one line
        assert cli.main(["compress", "--model", "nothing", "--input", "missing.pt", "--output", output]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"kt compress: error: --output {output} is ") and "\n" not in err


def test_generate_refuses_an_output_that_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    for output, kind in ((tmp_path / "file", "a file"), (tmp_path / "link", "a symbolic link")):
        assert cli.main(["generate", "--dataset", "digits", "--output", str(output)]) == 2
        assert capsys.readouterr().err.strip() == (f"kt generate: error: --output {output} is {kind}; give a "
                                                    f"directory path (new or one kt made).")
