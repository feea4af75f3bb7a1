"""Typed settings: dataclass fields that carry their help, command-line flag and bounds, checked in one place.

A *section* is a dataclass of settings (`setting(...)` fields); a *run config* is a dataclass whose fields are
sections or settings. `check` enforces every field's type, choices (a `Literal` annotation) and bounds (`ge`, `gt`,
`le`); `to_dict` / `from_dict` turn a config into nested plain data (the YAML of `run_config.yaml`) and back.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from functools import cache
from typing import Any, Literal, Union

from .errors import RRMError


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, nargs: str | None = None, action: str | None = None,
            const: Any = None, metavar: str | None = None, label: str | None = None, error: str | None = None,
            factory: Any = None) -> Any:
    """A dataclass field of a section. `flag`: its command-line name (default `--field-name`); `ge` / `gt` / `le`:
    bounds (applied to each item of a list); `label`: how messages name it (default: the flag); `error`: the message
    for a value out of bounds (default '<flag> must be >= <ge>, got <value>'); `nargs`, `action`, `const`,
    `metavar`: passed to argparse."""
    metadata = {key: value for key, value in dict(help=help, flag=flag, ge=ge, gt=gt, le=le, nargs=nargs, action=action,
                                                    const=const, metavar=metavar, label=label, error=error).items()
                if value is not None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(default: Any) -> Any:
    """A field holding a section; `default` (a zero-argument callable) gives a run's own defaults for it."""
    return dataclasses.field(default_factory=default)


@cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(value_or_type: Any) -> bool:
    return dataclasses.is_dataclass(value_or_type)


def flag_of(cls: type, field: dataclasses.Field) -> str:
    """A setting's command-line flag: its section's `FLAGS` entry, the field's `flag`, or `--field-name`."""
    named = getattr(cls, "FLAGS", {}).get(field.name) or field.metadata.get("flag")
    return named or "--" + field.name.replace("_", "-")


def label_of(cls: type, field: dataclasses.Field) -> str:
    return field.metadata.get("label") or flag_of(cls, field)


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`, else (annotation, False)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _type_name(annotation: Any) -> str:
    base, optional = unwrap_optional(annotation)
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        name = "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, _type_name(item))
    elif typing.get_origin(base) is Literal:
        name = "one of " + ", ".join(str(a) for a in typing.get_args(base))
    else:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base, str(base))
    return name + (" or null" if optional else "")


def _fits(value: Any, annotation: Any) -> bool:
    base, optional = unwrap_optional(annotation)
    if value is None:
        return optional
    if typing.get_origin(base) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(base)[0]) for v in value)
    if typing.get_origin(base) is Literal:
        return True  # choices are checked with their own message
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def check(config: Any) -> None:
    """Check every setting of `config` (a section or a run config, recursively): type, choices and bounds."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if is_section(value):
            check(value)
            continue
        annotation, label = hints(type(config))[field.name], label_of(type(config), field)
        if not _fits(value, annotation):
            raise RRMError(f"{label} must be {_type_name(annotation)}, got {value!r}")
        base, _ = unwrap_optional(annotation)
        item_type = typing.get_args(base)[0] if typing.get_origin(base) is list else base
        for item in value if isinstance(value, list) else [value]:
            if typing.get_origin(item_type) is Literal and item is not None and item not in typing.get_args(item_type):
                choices = ", ".join(str(c) for c in typing.get_args(item_type))
                raise RRMError(f"unknown {label} '{item}'; use one of {choices}")
            _check_bounds(item, field, label, list_item=isinstance(value, list))


def _check_bounds(value: Any, field: dataclasses.Field, label: str, list_item: bool) -> None:
    if value is None or isinstance(value, (str, bool)):
        return
    what = f"{label} values" if list_item else label
    for key, sign, holds in (("ge", ">=", lambda bound: value >= bound), ("gt", ">", lambda bound: value > bound),
                             ("le", "<=", lambda bound: value <= bound)):
        bound = field.metadata.get(key)
        if bound is not None and not holds(bound):
            raise RRMError(field.metadata.get("error") or f"{what} must be {sign} {bound:g}, got {value}")


def _as_number(value: Any) -> Any:
    """`value`, or the number a string such as '1e-3' spells (YAML 1.1 reads exponents without a dot as text)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain data (sections as dicts), in field order."""
    return {f.name: to_dict(v) if is_section(v := getattr(config, f.name)) else _plain(v)
            for f in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def from_dict(cls: type, data: dict[str, Any], base: Any = None, where: str = "") -> Any:
    """A `cls` whose settings are `base`'s (default: `cls()`), with those `data` names replaced; unknown keys are
    refused with their place (`where`, e.g. the file)."""
    config = base if base is not None else cls()
    if not isinstance(data, dict):
        raise RRMError(f"{where or cls.__name__} must hold a mapping of settings, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in data.items():
        if key not in names:
            raise RRMError(f"unknown setting '{key}' in {where or cls.__name__}; known: {', '.join(names)}")
        current = getattr(config, key)
        if is_section(current):
            changes[key] = from_dict(type(current), value or {}, current, f"{where}: {key}")
        else:
            changes[key] = _as_number(value) if unwrap_optional(hints(cls)[key])[0] is float else value
    return dataclasses.replace(config, **changes)


def parse_kwargs(pairs: list[str] | None) -> dict:
    """`["img_size=28", "patch_size=7"]` -> `{"img_size": 28, "patch_size": 7}` (values as Python literals)."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RRMError(f"'{pair}' is not key=value; write pairs such as img_size=28 patch_size=7")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs
