"""Block families as YAML/JSON files: the schema's checks, round trips, and a family no registry knows."""
from __future__ import annotations

import json
import shutil

import mlflow
import pytest
import yaml

from kt_mlflow.blocks import create_family, family_from_spec, family_of, family_spec
from kt_mlflow.errors import KTError
from kt_mlflow.family_file import spec_digest

NARROW = {"name": "narrow8", "input": {"channels": 1, "image_size": 28, "classes": 10},
          "begin": {"width": 8, "kernel": 3}, "large": {"kind": "basic", "hidden": 8},
          "small": {"kind": "bottleneck", "hidden": 4}, "last": {"width": 12}}


def write(tmp_path, spec, name="family.yaml"):
    path = tmp_path / name
    path.write_text(json.dumps(spec) if name.endswith(".json") else yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", ["family.yaml", "family.json"])
def test_a_family_file_builds_the_family_it_describes(tmp_path, name):
    fam = create_family(str(write(tmp_path, NARROW, name)))
    assert (fam.name, fam.width, fam.large_hidden, fam.small_hidden) == ("narrow8", 8, 8, 4)
    assert fam.small_block().conv1.weight.shape[:2] == (4, 8)  # small hidden 4 reads the 8 residual channels
    assert family_spec(fam) == NARROW


def test_registered_families_round_trip_through_files(tmp_path):
    for registered in ("paper_mnist", "wide_mnist"):
        fam = create_family(registered)
        assert create_family(str(write(tmp_path, family_spec(fam), f"{registered}.yaml"))) == fam
    assert spec_digest(family_spec(create_family("paper_mnist"))) != spec_digest(NARROW)


def bad(**change):
    spec = json.loads(json.dumps(NARROW))
    for key, value in change.items():
        section, _, field = key.partition("__")
        if field:
            spec[section][field] = value
        elif value is None:
            del spec[section]
        else:
            spec[section] = value
    return spec


@pytest.mark.parametrize("spec, message", [
    (bad(colour="red"), "unknown key 'colour'"),
    (bad(large__depth=2), "large: unknown key 'depth'"),
    (bad(small=None), "missing key 'small'"),
    (bad(large__kind="transformer"), "large.kind 'transformer' is not a block kind; choose one of: basic, bottleneck"),
    (bad(begin__width=0), "begin.width must be a whole number >= 1, got 0"),
    (bad(input__classes=1), "input.classes must be >= 2"),
    (bad(input__image_size=3), "input.image_size 3 is too small"),
    (bad(begin__kernel=4), "begin.kernel must be odd"),
    (bad(small__kind="basic", small__hidden=8), "small.hidden (8) must be below large.hidden (8)"),
    (bad(name=""), "name must be a non-empty string"),
])
def test_each_impossible_family_is_one_line_naming_the_key(tmp_path, spec, message):
    with pytest.raises(KTError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        create_family(str(write(tmp_path, spec)))
    assert "\n" not in str(err.value)


def test_unreadable_or_unknown_families_are_one_line(tmp_path):
    with pytest.raises(KTError, match="no family file at"):
        create_family(str(tmp_path / "missing.yaml"))
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    with pytest.raises(KTError, match="not valid YAML"):
        create_family(str(tmp_path / "broken.yaml"))
    (tmp_path / "code.yaml").write_text("!!python/object/apply:os.system ['echo hacked']")
    with pytest.raises(KTError, match="not valid YAML"):   # safe_load: nothing in a family file runs
        create_family(str(tmp_path / "code.yaml"))
    with pytest.raises(KTError, match="unknown block family 'nope'.*or pass a YAML/JSON family file"):
        create_family("nope")


def test_a_file_family_runs_end_to_end_with_no_file_or_registry_left(tmp_path, local_tracking, monkeypatch):
    """generate -> train with a family no registry knows; the family file is gone before loading."""
    from kt_mlflow.config import GenerateConfig, TrainConfig
    from kt_mlflow.pairs.store import load_split
    from kt_mlflow.steps.generate import run_generate
    from kt_mlflow.steps.train import run_train
    from kt_mlflow.tracking.models import load_translator

    monkeypatch.setenv("KT_HOME", str(tmp_path / "home"))
    (tmp_path / "specs").mkdir()
    path = write(tmp_path / "specs", NARROW)
    gen = GenerateConfig(dataset="digits", family=str(path), n_pairs=4, n_val=2, members=2, epochs=1,
                         small_epochs=1, workers=1)
    gen_id = run_generate(gen)
    folder = gen.folder()
    assert "/family-digits-" in folder   # the file's stem and a digest of its content name the folder
    settings = load_split(folder, "train").settings
    assert settings["family"] == "narrow8" and settings["family_spec"] == NARROW
    assert family_of(settings) == family_from_spec(NARROW)
    run = mlflow.get_run(gen_id)
    assert run.data.params["family_digest"] == spec_digest(NARROW)
    assert yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{gen_id}/family.yaml")) == NARROW

    shutil.rmtree(path.parent)   # nothing describes narrow8 any more but the pairs themselves
    _, version = run_train(TrainConfig(dataset="digits", pairs=gen_id, depth=1, width=8, epochs=1, val_every=1))
    tr = load_translator(f"models:/kt-narrow8-mixer/{version}")
    assert tr.family == family_from_spec(NARROW)
    small = tr.translate(tr.family.large_block().state_dict())
    assert small["conv1.weight"].shape == (4, 8, 3, 3)
    with pytest.raises(KTError, match="expected .* for a narrow8 base network"):
        tr.compress(create_family("paper_mnist").base_network())


def test_old_pair_sets_without_a_spec_mean_the_registered_family():
    assert family_of({"family": "paper_mnist"}) == create_family("paper_mnist")
