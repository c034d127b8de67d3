"""Block families as data files (YAML or JSON): the schema, and its checks as one-line errors.

A family file describes the base network (input, begin block, large block, last block) and the
small block that replaces the large one::

    name: my_family
    input: {channels: 1, image_size: 28, classes: 10}
    begin: {width: 6, kernel: 3}        # width: the residual channels every block keeps
    large: {kind: basic, hidden: 6}
    small: {kind: bottleneck, hidden: 3}
    last: {width: 12}

This module maps that schema to and from the flat fields of ``BlockFamily`` and imports no torch.

Example:
    >>> fields = spec_to_fields(EXAMPLE, "example", kinds=("basic", "bottleneck"))
    >>> fields["small_hidden"], fields_to_spec(fields)["small"]
    (3, {'kind': 'bottleneck', 'hidden': 3})
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

from .errors import KTError

# section -> {key: BlockFamily field}
SCHEMA: Dict[str, Dict[str, str]] = {
    "input": {"channels": "in_channels", "image_size": "image_size", "classes": "num_classes"},
    "begin": {"width": "width", "kernel": "kernel"},
    "large": {"kind": "large", "hidden": "large_hidden"},
    "small": {"kind": "small", "hidden": "small_hidden"},
    "last": {"width": "last_width"},
}
EXAMPLE = {"name": "paper_mnist", "input": {"channels": 1, "image_size": 28, "classes": 10},
           "begin": {"width": 6, "kernel": 3}, "large": {"kind": "basic", "hidden": 6},
           "small": {"kind": "bottleneck", "hidden": 3}, "last": {"width": 12}}
SUFFIXES = (".yaml", ".yml", ".json")


def fields_to_spec(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """``BlockFamily`` fields -> the nested file schema."""
    spec: Dict[str, Any] = {"name": fields["name"]}
    for section, keys in SCHEMA.items():
        spec[section] = {key: fields[field] for key, field in keys.items()}
    return spec


def spec_digest(spec: Mapping[str, Any]) -> str:
    """12 hex digits that change when any part of the family changes."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _check_keys(where: str, got: Mapping[str, Any], allowed: Sequence[str]) -> None:
    if not isinstance(got, Mapping):
        raise KTError(f"{where} must be a mapping with keys {', '.join(allowed)}, got {got!r}.")
    unknown, missing = sorted(set(got) - set(allowed)), [k for k in allowed if k not in got]
    if unknown:
        raise KTError(f"{where}: unknown key {unknown[0]!r}; the keys here are {', '.join(allowed)}.")
    if missing:
        raise KTError(f"{where}: missing key {missing[0]!r}; the keys here are {', '.join(allowed)}.")


def _check_sizes(where: str, f: Mapping[str, Any]) -> None:
    for key, field in (("input.channels", "in_channels"), ("input.image_size", "image_size"),
                       ("input.classes", "num_classes"), ("begin.width", "width"), ("begin.kernel", "kernel"),
                       ("large.hidden", "large_hidden"), ("small.hidden", "small_hidden"), ("last.width", "last_width")):
        if not isinstance(f[field], int) or isinstance(f[field], bool) or f[field] < 1:
            raise KTError(f"{where}: {key} must be a whole number >= 1, got {f[field]!r}.")
    if f["kernel"] % 2 == 0:
        raise KTError(f"{where}: begin.kernel must be odd (the blocks pad to keep their size), got {f['kernel']}.")
    if f["num_classes"] < 2:
        raise KTError(f"{where}: input.classes must be >= 2, got {f['num_classes']}.")
    if f["image_size"] < 4:
        raise KTError(f"{where}: input.image_size {f['image_size']} is too small: the begin block pools by 2 and "
                      f"the last block strides by 2; use 4 or more.")


def spec_to_fields(spec: Mapping[str, Any], where: str, kinds: Sequence[str]) -> Dict[str, Any]:
    """The nested file schema -> ``BlockFamily`` fields; every problem is a one-line KTError naming the key."""
    _check_keys(where, spec, ["name", *SCHEMA])
    if not isinstance(spec["name"], str) or not spec["name"].strip():
        raise KTError(f"{where}: name must be a non-empty string, got {spec['name']!r}.")
    fields: Dict[str, Any] = {"name": spec["name"]}
    for section, keys in SCHEMA.items():
        _check_keys(f"{where}: {section}", spec[section], list(keys))
        fields.update({field: spec[section][key] for key, field in keys.items()})
    for side in ("large", "small"):
        if fields[side] not in kinds:
            raise KTError(f"{where}: {side}.kind {fields[side]!r} is not a block kind; choose one of: {', '.join(kinds)}.")
    _check_sizes(where, fields)
    if fields["small_hidden"] >= fields["large_hidden"] and fields["small"] == fields["large"]:
        raise KTError(f"{where}: small.hidden ({fields['small_hidden']}) must be below large.hidden "
                      f"({fields['large_hidden']}) when both blocks are {fields['large']!r}: nothing would shrink.")
    return fields


def read_spec(path: Path) -> Dict[str, Any]:
    """The family spec in a YAML or JSON file (parsed as data only: nothing in it runs)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise KTError(f"family file {path} must end in {', '.join(SUFFIXES)}.")
    if not path.is_file():
        raise KTError(f"no family file at {path}; pass a registered family name or a YAML/JSON family file.")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KTError(f"family file {path} cannot be read ({type(e).__name__}); write it as YAML or JSON.") from None
    except Exception as e:  # yaml.YAMLError
        raise KTError(f"family file {path} is not valid YAML ({type(e).__name__}); see docs/usage.md.") from None


def looks_like_file(name: str) -> bool:
    """A ``--family`` value naming a file rather than a registered family."""
    return name.endswith(SUFFIXES) or "/" in name or "\\" in name
