"""Typed, frozen config schemas loaded from YAML with ``key.sub=value`` overrides.

Generic: ``load_config(Schema, path, overrides)`` works for any frozen dataclass whose fields are
annotated with ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``,
``tuple[X, ...]``, ``dict``, or another such dataclass. Range limits go in the field metadata:
``field(default=1, metadata={"min": 1, "max": 8})``, ``"above": 0.0`` and ``"below": 1.0`` for
exclusive bounds, and ``"hint"``: a sentence the range error ends with. Floats must be finite; a
number in scientific notation that YAML 1.1 reads as a string (``1e-3``) is taken as a float, and
as an int when it is a whole number (``1e3``). Every error is a ``ConfigError`` that names the key
(``model.width``), what is allowed, and what was given.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import pathlib
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not fit its schema; the message names the key."""


# A number in scientific notation: YAML 1.1 (PyYAML) leaves one without a dot or without the
# exponent's sign a string (``1e-3``, ``1.0e3``).
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number_string(value: Any) -> decimal.Decimal | None:
    """``value`` as a Decimal if it is a string in scientific notation, else None."""
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return decimal.Decimal(value.strip())
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked (and converted where lossless) against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
        return from_dict(typing.cast(type, tp), value, prefix=key)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key {key!r}: expected null, got {value!r}")
        return None
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        number = _number_string(value)
        # ``1e3``, but not ``1e30`` digits long nor ``1.5e0``: only whole numbers of a sane size
        if number is not None and number == number.to_integral_value() and number.adjusted() < 19:
            return int(number)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an int, got {value!r}")
        return value
    if tp is float:
        number = _number_string(value)
        if number is not None:
            value = float(number)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise TypeError(f"schema annotation {tp!r} of {key!r} is not supported by load_config")


def _check_range(field: dataclasses.Field, value: Any, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, above, high, below = (field.metadata.get(k) for k in ("min", "above", "max", "below"))
    if (
        (low is not None and value < low)
        or (above is not None and value <= above)
        or (high is not None and value > high)
        or (below is not None and value >= below)
    ):
        limits = (
            low is not None and f">= {low}",
            above is not None and f"> {above}",
            high is not None and f"<= {high}",
            below is not None and f"< {below}",
        )
        bounds = " and ".join(part for part in limits if part)
        hint = f" ({field.metadata['hint']})" if "hint" in field.metadata else ""
        raise ConfigError(f"config key {key!r}: must be {bounds}, got {value!r}{hint}")


def from_dict(schema: type[T], data: dict, *, prefix: str = "") -> T:
    """Build ``schema`` from a (YAML) mapping, checking every key, type and range."""
    if not isinstance(data, dict):
        where = f"config key {prefix!r}" if prefix else "the config"
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, schema)) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise ConfigError(f"unknown config key(s) {names}; allowed here: {sorted(fields)}")
    hints = typing.get_type_hints(schema)
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(hints[name], value, key)
        _check_range(fields[name], values[name], key)
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key(s) {[f'{prefix}.{m}' if prefix else m for m in missing]}")
    try:
        return schema(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config {prefix}: {err}" if prefix else str(err)) from None  # messages name keys


def to_dict(config: Any) -> Any:
    """A frozen dataclass (tree) as plain YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def _list_index(node: list, part: str, where: str, override: str) -> int:
    """``part`` as an index into the list at key ``where`` (``0`` to ``len - 1``)."""
    if not part.isascii() or not part.isdigit():
        raise ConfigError(
            f"override {override!r}: {where!r} is a list of {len(node)} item(s), so {part!r} must be an "
            "integer index"
        )
    if int(part) >= len(node):
        raise ConfigError(
            f"override {override!r}: index {part} is out of range for {where!r}, a list of "
            f"{len(node)} item(s)"
        )
    return int(part)


def _child(node: dict | list, part: str, where: str, override: str) -> dict | list:
    """The mapping or list under ``part`` of ``node`` (at key ``where``); a missing mapping key
    gets an empty mapping."""
    if isinstance(node, list):
        child = node[_list_index(node, part, where, override)]
    else:
        child = node.setdefault(part, {})
    if not isinstance(child, (dict, list)):
        key = f"{where}.{part}" if where else part
        raise ConfigError(f"override {override!r}: {key!r} is not a mapping or a list")
    return child


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``["model.width=128", "attention.options={window: 32}", "compare.0.variant=local"]`` applied to
    a nested mapping; an integer part indexes a list (``compare.0``: its first item).

    Values are parsed as YAML (``3``, ``0.1``, ``true``, ``null``, ``[a, b]``, ``{k: v}``).
    """
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
    for override in overrides:
        path, sep, raw = override.partition("=")
        if not sep or not path:
            raise ConfigError(f"override {override!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({err})") from None
        node: dict | list = data
        *parents, leaf = path.split(".")
        for i, part in enumerate(parents):
            node = _child(node, part, ".".join(parents[:i]), override)
        if isinstance(node, list):
            node[_list_index(node, leaf, ".".join(parents), override)] = value
        else:
            node[leaf] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last, so a
    section appended to a long config would silently replace the one above it."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | pathlib.Path) -> dict:
    """A YAML file's top-level mapping, with clear errors for a missing, unreadable or malformed
    file, and for a key given twice."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read as UTF-8 text: {err}") from None
    if data is None:  # an empty file, or comments only: a wrong or truncated file, not "all defaults"
        raise ConfigError(f"config file {str(path)!r} is empty; write {{}} in it to run with every default")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping at the top, got {type(data).__name__}"
        )
    return data


def load_config(schema: type[T], path: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (None: schema defaults), apply ``key.sub=value`` overrides, validate."""
    data = {} if path is None else read_yaml(path)
    return from_dict(schema, apply_overrides(data, overrides))


def save_config(config: Any, path: str | pathlib.Path) -> None:
    """Write the fully resolved config as YAML (readable back by ``load_config``)."""
    pathlib.Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
