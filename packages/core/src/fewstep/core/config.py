"""Typed dataclass configs from the command line: ``--key value`` overrides with dotted
keys into nested dataclasses, converted by the field's annotation, and a clear error
listing the valid keys for anything unknown."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["--a", "1", "--b=x", "--flag"]`` -> ``{"a": "1", "b": "x", "flag": "true"}``.
    Dashes in keys become underscores."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a dataclass accepts."""
    keys = []
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def convert(text: str, tp: Any, key: str) -> Any:
    """Convert a command-line string to the annotated type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(text, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ValueError(f"--{key}: {text!r} is not one of {list(args)}")
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}: expected true/false, got {text!r}")
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"--{key}: expected {tp.__name__}, got {text!r}") from None
    if origin in (tuple, list):
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(p.strip(), args[0], key) for p in parts)
        if origin is tuple:
            if len(parts) != len(args):
                raise ValueError(f"--{key}: expected {len(args)} comma-separated values")
            return tuple(convert(p.strip(), a, key) for p, a in zip(parts, args, strict=True))
        return [convert(p.strip(), args[0], key) for p in parts]
    if origin is dict:
        try:
            return dict(json.loads(text))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise ValueError(f"--{key}: expected a JSON object, got {text!r}") from None
    raise ValueError(f"--{key}: cannot parse values of type {tp}")


def apply_overrides(cfg: Any, overrides: dict[str, str]) -> Any:
    """A copy of dataclass ``cfg`` with dotted-key overrides applied."""
    valid = valid_keys(type(cfg))
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise KeyError(
            f"unknown option(s) {', '.join('--' + k for k in unknown)} for "
            f"{type(cfg).__name__}; valid options: {', '.join('--' + k for k in valid)}"
        )
    return _apply(cfg, overrides, "")


def _apply(cfg: Any, overrides: dict[str, str], prefix: str) -> Any:
    changes = {}
    for name, tp in field_types(type(cfg)).items():
        if dataclasses.is_dataclass(tp):
            sub = {k: v for k, v in overrides.items() if k.startswith(f"{prefix}{name}.")}
            if sub:
                changes[name] = _apply(getattr(cfg, name), sub, f"{prefix}{name}.")
        elif prefix + name in overrides:
            changes[name] = convert(overrides[prefix + name], tp, prefix + name)
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a dataclass from ``to_dict`` output (unknown keys are an error)."""
    kwargs = {}
    types_ = field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise KeyError(f"unknown keys {sorted(unknown)} for {cls.__name__}")
    for name, value in data.items():
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value)
        elif typing.get_origin(tp) is tuple and value is not None:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
