"""Translators in MLflow: loading one reads its JSON and safetensors and runs nothing stored with it."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from kt_mlflow.blocks import create_family, flatten_block
from kt_mlflow.errors import KTError
from kt_mlflow.tracking.models import load_translator, log_translator
from kt_mlflow.translators import create_translator

FAMILY = create_family("paper_mnist")
EVIL = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


def _large(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, *v.shape, generator=g).abs() + 0.5
            for k, v in FAMILY.large_block().state_dict().items() if v.is_floating_point()}


def _translator(seed: int):
    torch.manual_seed(seed)
    return create_translator("channel_set", FAMILY, bn_aware=True, depth=1, width=8)


@pytest.fixture
def registered(local_tracking, tmp_path, monkeypatch):
    """A translator registered as kt-trust (artifacts under tmp_path/mlruns); returns it and its model folder."""
    monkeypatch.chdir(tmp_path)
    translator = _translator(0)
    with mlflow.start_run():
        log_translator(translator, {k: v[:1] for k, v in _large().items()}, "kt-trust")
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/kt-trust/1"))
    assert (folder / "MLmodel").is_file() and folder.is_relative_to(tmp_path / "mlruns")   # the stored model itself
    return translator, folder


def _same(a, b) -> None:
    large = _large()
    for k, v in a.translate_batch(large).items():
        torch.testing.assert_close(b.translate_batch(large)[k], v)


def test_the_pyfunc_loader_is_a_module_of_the_package(registered):
    translator, folder = registered
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "kt_mlflow.tracking.pyfunc_loader" and not flavor.get("code")
    assert sorted(p.name for p in (folder / flavor["data"]).iterdir()) == ["translator.json", "translator.safetensors"]
    assert not list(folder.rglob("*.py")) and not list(folder.rglob("*.pkl"))
    model = mlflow.pyfunc.load_model("models:/kt-trust/1")           # MLflow's own loading works the same
    flat = flatten_block(FAMILY, "large", _large()).numpy()
    want = flatten_block(FAMILY, "small", translator.translate_batch(_large())).numpy()
    assert abs(model.predict(flat) - want).max() == 0.0


def test_tampered_code_in_a_stored_model_changes_nothing(registered, tmp_path):
    translator, folder = registered
    marker = tmp_path / "ran"
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    meta["flavors"]["python_function"].update(loader_module="evil_loader", code="code", python_model="evil.py")
    (folder / "MLmodel").write_text(yaml.safe_dump(meta))
    (folder / "code" / "kt_mlflow").mkdir(parents=True)
    for name in ("code/evil_loader.py", "code/kt_mlflow/__init__.py", "evil.py"):
        (folder / name).write_text(EVIL.format(marker=str(marker)))
    _same(translator, load_translator("kt-trust"))
    _same(translator, load_translator("models:/kt-trust/1"))
    assert not marker.exists()


def test_a_folder_named_like_the_model_does_not_win(registered, tmp_path):
    translator, _ = registered
    decoy = _translator(1)
    decoy.save(tmp_path / "kt-trust" / "data" / "translator")
    (tmp_path / "kt-trust" / "MLmodel").write_text(yaml.safe_dump(
        {"flavors": {"python_function": {"loader_module": "kt_mlflow.tracking.pyfunc_loader", "data": "data/translator"}}}))
    _same(translator, load_translator("kt-trust"))              # a name is the registry's
    _same(decoy, load_translator("./kt-trust"))                 # a path only when given as one
    _same(decoy, load_translator(str(tmp_path / "kt-trust")))


def test_models_logged_as_code_load_as_data(tmp_path):
    """The earlier layout (a models-from-code pyfunc) is read as data too: its code never runs."""
    marker, old = tmp_path / "ran", tmp_path / "old"
    translator = _translator(2)
    translator.save(old / "artifacts" / "translator")
    (old / "translator_pyfunc.py").write_text(EVIL.format(marker=str(marker)))
    (old / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
        "python_model": "translator_pyfunc.py", "artifacts": {"translator": {"path": "artifacts/translator"}}}}}))
    _same(translator, load_translator(str(old)))
    assert not marker.exists()


def test_data_outside_the_model_folder_is_refused(tmp_path):
    _translator(3).save(tmp_path / "elsewhere")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"data": "../elsewhere"}}}))
    with pytest.raises(KTError, match="is not a kt-mlflow translator model") as err:
        load_translator(str(tmp_path / "model"))
    assert "\n" not in str(err.value)
    with pytest.raises(KTError, match="no translator at models:/nothing-here/latest"):
        load_translator("nothing-here")
