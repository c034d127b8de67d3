"""Block families as data files (YAML or JSON): the schema, and its checks as one-line errors.

A family file describes the base network (input, begin block, large block, last block) and the
small block that replaces the large one::

    name: my_family
    input: {channels: 1, image_size: 28, classes: 10}
    begin: {width: 6, kernel: 3}        # width: the residual channels every block keeps
    large: {kind: basic, hidden: 6}
    small: {kind: bottleneck, hidden: 3}
    last: {width: 12}

Optional keys, with their defaults: ``begin.kind`` (``conv``: conv, BN, ReLU, max-pool; or ``patch``:
a patch embedding, with ``begin.patch`` the patch size, default 4, in place of ``begin.kernel``),
``large.kernel``/``small.kernel`` (the conv blocks' kernel, default ``begin.kernel``), ``large.norm``/
``small.norm`` (an ``mlp`` block's pre-LayerNorm, default true) and ``last.kind`` (``conv``: a strided
1x1 conv, BN, ReLU and a linear classifier over ``last.width`` channels; or ``pool``: LayerNorm,
mean over positions, linear classifier, no width). Conv blocks (``basic``, ``bottleneck``) go
between a conv begin and a conv last; ``mlp`` blocks (the residual MLP of transformers and
MLP-Mixers) between a patch begin and a pool last.

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
from typing import Any, Dict, Mapping, Sequence, Tuple

from .errors import KTError

# section -> {key: BlockFamily field}
SCHEMA: Dict[str, Dict[str, str]] = {
    "input": {"channels": "in_channels", "image_size": "image_size", "classes": "num_classes"},
    "begin": {"width": "width", "kernel": "kernel"},
    "large": {"kind": "large", "hidden": "large_hidden"},
    "small": {"kind": "small", "hidden": "small_hidden"},
    "last": {"width": "last_width"},
}
# Optional keys: section -> {key: (BlockFamily field, default)}; written to a spec only when not the default.
OPTIONAL: Dict[str, Dict[str, Tuple[str, Any]]] = {
    "begin": {"kind": ("begin_kind", "conv"), "patch": ("patch", 4)},
    "large": {"kernel": ("large_kernel", 0), "norm": ("large_norm", True)},
    "small": {"kernel": ("small_kernel", 0), "norm": ("small_norm", True)},
    "last": {"kind": ("last_kind", "conv")},
}
CONV_KINDS = ("basic", "bottleneck")  # blocks of convolutions; the others are per-position MLPs
BEGIN_KINDS, LAST_KINDS = ("conv", "patch"), ("conv", "pool")
EXAMPLE = {"name": "paper_mnist", "input": {"channels": 1, "image_size": 28, "classes": 10},
           "begin": {"width": 6, "kernel": 3}, "large": {"kind": "basic", "hidden": 6},
           "small": {"kind": "bottleneck", "hidden": 3}, "last": {"width": 12}}
SUFFIXES = (".yaml", ".yml", ".json")


def fields_to_spec(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """``BlockFamily`` fields -> the nested file schema."""
    spec: Dict[str, Any] = {"name": fields["name"]}
    for section, keys in SCHEMA.items():
        spec[section] = {key: fields[field] for key, field in keys.items() if _applies(section, key, fields)}
        for key, (field, default) in OPTIONAL.get(section, {}).items():
            if fields.get(field, default) != default:
                spec[section][key] = fields[field]
    return spec


def _applies(section: str, key: str, fields: Mapping[str, Any]) -> bool:
    """Keys that a begin/last kind has no use for (a patch begin's kernel, a pool last's width)."""
    if (section, key) == ("begin", "kernel"):
        return fields.get("begin_kind", "conv") == "conv"
    if (section, key) == ("last", "width"):
        return fields.get("last_kind", "conv") == "conv"
    return True


def spec_digest(spec: Mapping[str, Any]) -> str:
    """12 hex digits that change when any part of the family changes."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _check_keys(where: str, got: Mapping[str, Any], allowed: Sequence[str], optional: Sequence[str] = ()) -> None:
    if not isinstance(got, Mapping):
        raise KTError(f"{where} must be a mapping with keys {', '.join(allowed)}, got {got!r}.")
    unknown = sorted(set(got) - set(allowed) - set(optional))
    missing = [k for k in allowed if k not in got]
    allowed = [*allowed, *optional]
    if unknown:
        raise KTError(f"{where}: unknown key {unknown[0]!r}; the keys here are {', '.join(allowed)}.")
    if missing:
        raise KTError(f"{where}: missing key {missing[0]!r}; the keys here are {', '.join(allowed)}.")


def _whole(where: str, key: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise KTError(f"{where}: {key} must be a whole number >= {low}, got {value!r}.")


def _check_sizes(where: str, f: Mapping[str, Any]) -> None:
    for key, field in (("input.channels", "in_channels"), ("input.image_size", "image_size"),
                       ("input.classes", "num_classes"), ("begin.width", "width"), ("begin.kernel", "kernel"),
                       ("begin.patch", "patch"), ("large.hidden", "large_hidden"), ("small.hidden", "small_hidden"),
                       ("last.width", "last_width")):
        _whole(where, key, f[field])
    for key, field in (("large.kernel", "large_kernel"), ("small.kernel", "small_kernel")):
        _whole(where, key, f[field], low=0)
    for key in ("begin.kernel", "large.kernel", "small.kernel"):
        value = f[{"begin.kernel": "kernel", "large.kernel": "large_kernel", "small.kernel": "small_kernel"}[key]]
        if value % 2 == 0 and value:
            raise KTError(f"{where}: {key} must be odd (the blocks pad to keep their size), got {value}.")
    for key in ("large.norm", "small.norm"):
        if not isinstance(f[key.replace(".", "_")], bool):
            raise KTError(f"{where}: {key} must be true or false, got {f[key.replace('.', '_')]!r}.")
    if f["num_classes"] < 2:
        raise KTError(f"{where}: input.classes must be >= 2, got {f['num_classes']}.")
    if f["begin_kind"] == "patch" and f["image_size"] % f["patch"]:
        raise KTError(f"{where}: input.image_size {f['image_size']} is not a multiple of begin.patch {f['patch']}; "
                      f"use a patch size that divides it.")
    if f["image_size"] < 4:
        raise KTError(f"{where}: input.image_size {f['image_size']} is too small: the begin block pools by 2 and "
                      f"the last block strides by 2; use 4 or more.")


def _check_kind_keys(where: str, spec: Mapping[str, Any]) -> None:
    """Optional keys that only one kind reads: set for another kind, they would be silently ignored."""
    for section, key, kinds in (("large", "kernel", CONV_KINDS), ("small", "kernel", CONV_KINDS),
                                ("large", "norm", ("mlp",)), ("small", "norm", ("mlp",)), ("begin", "patch", ("patch",))):
        kind = spec[section].get("kind", "conv")
        if key in spec[section] and kind not in kinds:
            raise KTError(f"{where}: {section}.{key} does not apply to {section}.kind {kind!r}; "
                          f"it is for {', '.join(kinds)}.")


def _check_kinds(where: str, f: Mapping[str, Any], kinds: Sequence[str]) -> None:
    """Kinds exist, and the blocks fit between the begin and last kinds."""
    for key, field, choices in (("begin.kind", "begin_kind", BEGIN_KINDS), ("last.kind", "last_kind", LAST_KINDS),
                                ("large.kind", "large", kinds), ("small.kind", "small", kinds)):
        if f[field] not in choices:
            what = "a block kind" if field in ("large", "small") else f"a {key.split('.')[0]} kind"
            raise KTError(f"{where}: {key} {f[field]!r} is not {what}; choose one of: {', '.join(choices)}.")
    conv_begin = f["begin_kind"] == "conv"
    for side in ("large", "small"):
        conv_block = f[side] in CONV_KINDS
        if conv_block != conv_begin:
            fits = "a conv block (basic, bottleneck)" if conv_begin else "an mlp block"
            raise KTError(f"{where}: {side}.kind {f[side]!r} does not fit begin.kind {f['begin_kind']!r}; "
                          f"a {f['begin_kind']} begin takes {fits}.")
    if (f["last_kind"] == "conv") != conv_begin:
        want = "conv" if conv_begin else "pool"
        raise KTError(f"{where}: last.kind {f['last_kind']!r} does not fit begin.kind {f['begin_kind']!r}; use {want!r}.")


def spec_to_fields(spec: Mapping[str, Any], where: str, kinds: Sequence[str]) -> Dict[str, Any]:
    """The nested file schema -> ``BlockFamily`` fields; every problem is a one-line KTError naming the key."""
    _check_keys(where, spec, ["name", *SCHEMA])
    if not isinstance(spec["name"], str) or not spec["name"].strip():
        raise KTError(f"{where}: name must be a non-empty string, got {spec['name']!r}.")
    fields: Dict[str, Any] = {"name": spec["name"]}
    for section, keys in SCHEMA.items():
        optional = OPTIONAL.get(section, {})
        got = spec[section] if isinstance(spec[section], Mapping) else {}
        kind = got.get("kind", optional.get("kind", (None, None))[1])
        required = [k for k in keys if _applies(section, k, {f"{section}_kind": kind})]
        _check_keys(f"{where}: {section}", spec[section], required, [*optional, *(set(keys) - set(required))])
        fields.update({field: got[key] for key, field in keys.items() if key in got})
        fields.update({field: got.get(key, default) for key, (field, default) in optional.items()})
    _check_kind_keys(where, spec)
    fields.setdefault("kernel", 3)
    fields.setdefault("last_width", 1)
    _check_kinds(where, fields, kinds)
    _check_sizes(where, fields)
    kernels = [fields[f"{side}_kernel"] or fields["kernel"] for side in ("large", "small")]
    if fields["small"] == fields["large"] and fields["small_hidden"] >= fields["large_hidden"] and kernels[1] >= kernels[0]:
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
