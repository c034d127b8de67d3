"""The MLproject entry points and the ``kt`` subcommands take the same parameters with the same defaults."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from kt_mlflow.cli import STEPS, build_parser, config_from_args, field_parser

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
TRACKED = [name for name, step in STEPS.items() if step.tracked]
TORCHRUN = [name for name in TRACKED if STEPS[name].distributed]   # also as NAME_torchrun
LAUNCHER = {"nnodes": "1", "nproc_per_node": "1", "rdzv_endpoint": "localhost:0", "rdzv_id": "kt"}
TORCHRUN_PREFIX = ("torchrun --nnodes {nnodes} --nproc-per-node {nproc_per_node} --rdzv-backend c10d "
                   "--rdzv-endpoint {rdzv_endpoint} --rdzv-id {rdzv_id} -m kt_mlflow ")


def test_every_tracked_step_is_an_entry_point_and_back():
    assert sorted(ENTRY_POINTS) == sorted(TRACKED + [f"{name}_torchrun" for name in TORCHRUN])
    assert TORCHRUN == ["generate", "train", "sweep"]


@pytest.mark.parametrize("name", TORCHRUN)
def test_torchrun_entry_points_are_the_step_under_torchrun(name):
    plain, job = ENTRY_POINTS[name], ENTRY_POINTS[f"{name}_torchrun"]
    assert {k: v for k, v in job["parameters"].items() if k not in LAUNCHER} == plain["parameters"]
    assert {k: job["parameters"][k]["default"] for k in LAUNCHER} == LAUNCHER
    assert job["command"] == TORCHRUN_PREFIX + plain["command"][len("kt "):]


@pytest.mark.parametrize("name", TRACKED)
def test_entry_point_params_and_defaults_match_the_cli(name):
    params = ENTRY_POINTS[name]["parameters"]
    config = STEPS[name].config
    assert sorted(params) == sorted(f.name for f in fields(config)), f"MLproject {name} parameters"
    for f in fields(config):
        spec = params[f.name]
        parsed = field_parser(str(f.type))(str(spec["default"]))
        assert parsed == f.default, f"MLproject {name}.{f.name} default {spec['default']!r} != CLI {f.default!r}"
        want = "float" if str(f.type) in ("int", "float") else "string"
        assert spec["type"] == want, f"MLproject {name}.{f.name} type"


@pytest.mark.parametrize("name", TRACKED)
def test_entry_point_command_passes_every_param_to_its_flag(name):
    command = ENTRY_POINTS[name]["command"]
    assert command.startswith(f"kt {name} ")
    passed = dict(re.findall(r"--([a-z-]+) \{([a-z_]+)\}", command))
    assert passed == {f.name.replace("_", "-"): f.name for f in fields(STEPS[name].config)}


@pytest.mark.parametrize("name", TRACKED)
def test_mlproject_defaults_parse_to_the_default_config(name):
    """What `mlflow run . -e NAME` passes with no -P is exactly the default config."""
    params = ENTRY_POINTS[name]["parameters"]
    argv = [name]
    for key, spec in params.items():
        argv += [f"--{key.replace('_', '-')}", str(spec["default"])]
    assert config_from_args(build_parser().parse_args(argv)) == STEPS[name].config()


def test_cli_help_imports_neither_torch_nor_mlflow():
    code = ("import sys; from kt_mlflow.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_kt_version_and_step_help_show_defaults_and_an_example(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("kt-mlflow ")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = capsys.readouterr().out
    assert "(default: 32)" in text and "example: kt generate" in text


PARAM_SETS = sorted(p for p in (REPO / "projects").glob("*/*.yaml") if p.parent.name != "families")  # not family files


@pytest.mark.parametrize("path", PARAM_SETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_named_parameter_sets_use_real_parameters(path):
    """projects/NAME/{generate,train,params}.yaml name parameters of the generate, train and sweep steps."""
    entry = {"generate.yaml": "generate", "train.yaml": "train", "params.yaml": "sweep"}[path.name]
    unknown = set(yaml.safe_load(path.read_text())) - set(ENTRY_POINTS[entry]["parameters"])
    assert not unknown, f"{path.name}: not parameters of {entry}: {sorted(unknown)}"


def test_config_knows_every_translator_architecture():
    from kt_mlflow.config import ARCHS
    from kt_mlflow.translators import ARCHITECTURES

    assert sorted(ARCHS) == ARCHITECTURES.names()
