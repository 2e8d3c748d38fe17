"""Dataclass configs from YAML/JSON dicts plus `key=value` overrides (OLMo-core style merge).

A run is one config file plus dotted overrides on the command line::

    python -m pipeline.train --config run.yaml model.n_layer=4 optim.lr=3e-4

Every unknown key is an error that names the key and lists the valid ones, so a typo never
silently trains with a default. Every value is converted to the field's declared type (`convert`):
YAML 1.1 reads `3e-4` as the *string* "3e-4", so a float field must not trust the parser, and a value
that cannot be converted is a ConfigError naming the key, the value and the type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import ConfigError

T = TypeVar("T")


def parse_override_value(text: str) -> Any:
    """`key=value` right-hand side: YAML scalars/lists (`4`, `3e-4`, `true`, `[1, 3]`, `null`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict (returns a new dict)."""
    out = json.loads(json.dumps(tree))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.n_layer=4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
        node[parts[-1]] = parse_override_value(value)
    return out


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:] or 'YAML'}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert_scalar(value: Any, tp: type) -> Any:
    """int / float / bool / str from what YAML or `key=value` produced; ValueError if impossible."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if isinstance(value, bool):  # True is an int in Python, never a number in a config
        raise ValueError
    if tp is int:
        if isinstance(value, int):
            return value
        number = float(value) if isinstance(value, (str, float)) else None  # "4", "1e3", 1000.0
        if number is None or not number.is_integer():
            raise ValueError
        return int(number)
    if tp is float:
        # "3e-4": YAML 1.1 reads a float without a dot as a string. NaN / inf are never a setting.
        number = float(value.strip() if isinstance(value, str) else value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)
        raise ValueError
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError
    return value


def convert(value: Any, tp: Any, key: str) -> Any:
    """`value` as declared type `tp` (scalars, Optional/unions, list[X], dict, nested dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise, error
            return convert(value, options[0], key)
        for arg in options:
            try:
                return convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key} = {value!r} is not a {type_name(tp)}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} = {value!r} must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} = {value!r} must be a list, e.g. [1, 3]")
        if args and origin is list:
            return [convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} = {value!r} must be a mapping")
        return value
    try:
        return _convert_scalar(value, tp)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key} = {value!r} is not a valid {type_name(tp)}") from None


def convert_fields(cls: type, data: dict, where: str) -> dict:
    """Convert the entries of `data` that name fields of dataclass `cls`; other keys pass through."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: convert(v, hints[k], f"{where}.{k}" if where else k) if k in names else v for k, v in data.items()}


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys raise ConfigError naming them."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    return cls(**convert_fields(cls, data, where))


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path) -> Path:
    """Relative config paths: cwd first (user files), then the repo root (shipped ds_configs/)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path if (REPO_ROOT / path).exists() else path
