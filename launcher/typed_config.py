"""Strict conversion between YAML data and typed dataclass configs.

Every section of a run's config is a plain dataclass owned by the package that uses it
(``model.config``, ``data_pipeline.config``, ...). This module turns YAML mappings into
those dataclasses and back, and applies ``--set section.key=value`` overrides. It is
strict on purpose: an unknown key or a value of the wrong type is a one-line
``ConfigError`` naming the key path and the expected type, because a typo in a config
that silently falls back to a default can cost a multi-day run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message is one line naming it."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus two silent surprises: a key given twice (YAML keeps the
    last, so a second ``model:`` section would drop the first) and ``{key:value}`` without
    a space (YAML reads one key ``'key:value'`` with no value, which timm then ignores)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' may repeat keys on purpose: its keys are overridden
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: key {key!r} appears twice (first on line {seen[key]}); "
                                  "YAML would silently keep only the last")
            seen[key] = line
            if (isinstance(key, str) and ":" in key and isinstance(value_node, yaml.ScalarNode)
                    and value_node.value == "" and node.flow_style):
                name, _, value = key.partition(":")
                raise ConfigError(f"line {line}: {key!r} is read as a key without a value; "
                                  f"write '{name}: {value}' (YAML needs a space after ':')")
        return super().construct_mapping(node, deep=deep)


def load_yaml(stream: Any) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys and ``{key:value}`` (see _StrictLoader)."""
    return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclasses.dataclass(frozen=True)
class SetValue:
    """A ``--set`` scalar as typed and as YAML reads it: a ``str`` key takes the text
    (``train.run_name=0123`` is '0123', not YAML's octal 83), any other type the value."""

    text: str
    value: Any


# A section's value ranges, checked when a config is loaded: a ``RULES`` class attribute
# maps space-separated keys to a spec, plain data so that the sections' packages need
# nothing from ``launcher``. Specs: "positive int", "non-empty" (a list), ">= 0", "> 0",
# ">= 1", "[0, 1]", "[0, 1)"; a list must be non-empty and each item fit; null always fits
# (its type allows it). Anything else a section checks in ``validate(path)``.
_COMPARE = {">=": float.__ge__, ">": float.__gt__}


def _fits(value: Any, spec: str) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and (spec == "non-empty" or all(_fits(v, spec) for v in value))
    if spec == "positive int":
        return value >= 1
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        return (low <= value if spec[0] == "[" else low < value) and (value <= high if spec[-1] == "]" else value < high)
    op, bound = spec.split()
    return _COMPARE[op](float(value), float(bound))


def _expected(value: Any, spec: str) -> str:
    if spec in ("positive int", "non-empty"):
        return "a positive int" if spec == "positive int" else "a non-empty list"
    bound = f"in {spec}" if spec[0] in "[(" else spec
    return f"a non-empty list of values {bound}" if isinstance(value, (list, tuple)) else f"a value {bound}"


def check_rules(config: Any, path: str) -> None:
    """Apply ``type(config).RULES`` and ``config.validate(path)``; ConfigError naming the key."""
    for keys, spec in getattr(type(config), "RULES", {}).items():
        for key in keys.split():
            value = getattr(config, key)
            if not _fits(value, spec):
                raise ConfigError(f"{_join(path, key)}: expected {_expected(value, spec)}, got {value!r}")
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate(path)
        except ValueError as err:  # the sections' own checks raise ValueError naming the key
            raise ConfigError(str(err)) from None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def convert(tp: Any, value: Any, path: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if isinstance(value, SetValue):
        wants_text = tp is str or (origin is Literal and value.text in typing.get_args(tp))
        value = value.text if wants_text else value.value
    if tp is Any:
        return value
    if value is None and (dataclasses.is_dataclass(tp) or origin is dict):
        value = {}  # a section or mapping with every key commented out: its defaults
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping ({tp.__name__}), got {_describe(value)}")
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        # YAML 1.1 reads a bare off/on/yes/no as a bool: 'apex: off' means the choice 'off'.
        spelled = [a for a in typing.get_args(tp) if isinstance(a, str) and yaml.safe_load(a) is value]
        if isinstance(value, bool) and spelled:
            return spelled[0]
        read_as = " (YAML reads a bare on/off/yes/no/true/false as a boolean)" if isinstance(value, bool) else ""
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}{read_as}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}")
            return tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_type = args[0] if args else Any
        items = [convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {
            convert(key_type, k, f"{path}.<key>"): convert(value_type, v, f"{path}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # YAML reads "1e5" as a string and "1.6e+5" as a float: whole numbers are ints.
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
    elif tp is float:
        # YAML reads "1e-4" as a string; accept it, and ints, for float fields.
        number = _number(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(f"{path}: expected a finite float, got {_describe(value)}")
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is not None and not isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected str, got {_describe(value)} (quote it in YAML: '{value}')")
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")


def _number(value: Any) -> float | None:
    """``value`` as a float where it is a number or a string of one, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        key_path = _join(path, key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(fields)
            raise ConfigError(f"{key_path}: unknown key{hint}; known keys: {known}")
        kwargs[key] = convert(hints[key], value, key_path)
    config = cls(**kwargs)
    check_rules(config, path)
    return config


def to_dict(config: Any) -> Any:
    """Plain YAML-able data from a dataclass config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in update.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section (every key commented out) changes nothing
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """``'train.lr=1e-4'`` -> ``{'train': {'lr': 1e-4}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unparsable value is taken as a plain string
    except ConfigError as err:
        raise ConfigError(f"--set {text}: {str(err).split(': ', 1)[1]}") from None
    if value is not None and not isinstance(value, (str, dict, list)):
        value = SetValue(raw.strip(), value)
    nested: dict = {}
    cursor = nested
    for key in keys[:-1]:
        cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = value
    return nested
