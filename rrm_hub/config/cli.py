"""Command lines from run configs: flags generated from the config dataclasses, `--config FILE.yaml` (flags
override it, as in timm's `train.py`), `run_config.yaml` written by every run, and the command that reproduces one.

    config = cli.parse(DistillConfig, argv, description=__doc__)   # defaults <- YAML files <- flags, validated
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from .. import settings
from ..errors import RRMError

C = TypeVar("C")
CONFIG_FILE = "run_config.yaml"


def fields_of(config: Any) -> list[tuple[str | None, Any, dataclasses.Field]]:
    """(section name or None, the section or run config holding it, field) for every setting of `config`."""
    rows = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if settings.is_section(value):
            rows += [(field.name, value, inner) for inner in dataclasses.fields(value)]
        else:
            rows.append((None, config, field))
    return rows


def flag(owner: Any, field: dataclasses.Field) -> str:
    return settings.flag_of(type(owner), field)


def _argparse_options(owner: Any, field: dataclasses.Field) -> dict:
    annotation, optional = settings.unwrap_optional(settings.hints(type(owner))[field.name])
    meta, default = field.metadata, getattr(owner, field.name)
    help_text = meta.get("help", "")
    if not (default is None or default is False or default == []) and "default" not in help_text:
        help_text += f" (default: {_shown(default)})"
    options: dict = {"help": help_text.replace("%", "%%"), "default": argparse.SUPPRESS}
    if annotation is bool:  # an optional one (None: decided by the run) also has --no-<flag>
        return {**options, "action": argparse.BooleanOptionalAction if optional else "store_true"}
    item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
    if typing.get_origin(item) is Literal:
        options["choices"] = typing.get_args(item)
        item = type(typing.get_args(item)[0])
    else:
        options["metavar"] = field.name.upper()
    options["type"] = item
    if typing.get_origin(annotation) is list:
        options["nargs"] = meta.get("nargs", "+")
    for key in ("nargs", "action", "const", "metavar"):
        if key in meta:
            options[key] = meta[key]
    if options.get("action") == "append":
        options.pop("nargs", None)
    return options


def _shown(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def build_parser(config: Any, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting of `config` (an instance: its values are the defaults shown),
    grouped by section, plus `--config`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", metavar="FILE.yaml", default=[],
                        help=f"settings from a YAML file, by section (as the run's own {CONFIG_FILE}); repeatable, "
                        "later files and flags override earlier ones")
    groups: dict[str | None, Any] = {}
    for name, owner, field in fields_of(config):
        if name not in groups:
            title = getattr(owner, "TITLE", name) if name else "run"
            groups[name] = parser.add_argument_group(title)
        dest = f"{name}.{field.name}" if name else field.name
        groups[name].add_argument(flag(owner, field), dest=dest, **_argparse_options(owner, field))
    return parser


def load_yaml(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file of settings by section; `base: OTHER.yaml` (relative to the file) starts it from another file's.
    A missing or malformed file is a one-line error."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise RRMError(f"cannot read config file '{path}' ({err.strerror or err}); give a YAML file") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise RRMError(f"config file '{path}' is not valid YAML{line}; fix it or give another --config") from None
    data = data or {}
    if not isinstance(data, dict):
        raise RRMError(f"config file '{path}' must hold settings by section (a mapping), not {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    here = Path(path).resolve()
    if here in seen:
        raise RRMError(f"config file '{path}' is its own base (through 'base:'); break the cycle")
    return merge(load_yaml(Path(path).parent / base, (*seen, here)), data)


def merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`, section by section."""
    merged = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if both else value
    return merged


def parse(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """`cls`'s defaults, overridden by each `--config` file in turn, then by the flags given; validated."""
    config = cls()
    namespace = vars(build_parser(config, description).parse_args(argv))
    for path in namespace.pop("config"):
        config = settings.from_dict(cls, load_yaml(path), config, where=str(path))
    return apply(config, namespace).validate()


def apply(config: C, values: dict[str, Any]) -> C:
    """`config` with `values` (keys `section.field` or `field`) replaced."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        name, _, field = key.rpartition(".")
        if name:
            nested.setdefault(name, {})[field] = value
        else:
            nested[field] = value
    return settings.from_dict(type(config), nested, config, where="the command line")


def save(config: Any, folder: str | Path, script: str | None = None) -> Path:
    """Write `config` as `folder/run_config.yaml`, which `--config` reads back (`script`: the recipe, named in a
    comment with the command that reruns it)."""
    path = Path(folder) / CONFIG_FILE
    header = f"# python recipes/{Path(script).name} --config {path}\n" if script else ""
    data = settings.to_dict(config)
    if isinstance(data.get("training"), dict):
        # resuming or starting over is what one command did to its folder, not a setting to rerun
        data["training"].update(resume=None, overwrite_output_dir=False)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def to_flags(config: Any) -> list[str]:
    """The flags that give `config` from its class's defaults (settings at their default are left out)."""
    defaults = type(config)()
    changed: dict[str, Any] = {}
    for name, owner, field in fields_of(config):
        value, default = getattr(owner, field.name), getattr(getattr(defaults, name) if name else defaults, field.name)
        if value != default:
            (changed.setdefault(name, {}) if name else changed)[field.name] = value
    return flags_of(type(config), changed)


def flags_of(cls: type, data: dict) -> list[str]:
    """The flags of the settings `data` names (by section, as in a YAML file), with their values."""
    config = settings.from_dict(cls, data)  # refuses unknown names
    flags: list[str] = []
    for name, owner, field in fields_of(config):
        given = data.get(name, {}) if name else data
        if field.name not in given:
            continue
        value, option = getattr(owner, field.name), flag(owner, field)
        if isinstance(value, bool):
            flags += [option] if value else ([f"--no-{option[2:]}"] if field.default is None else [])
        elif isinstance(value, list) and field.metadata.get("action") == "append":
            flags += [part for item in value for part in (option, str(item))]
        elif isinstance(value, list):
            flags += [option, *(_flag_value(v) for v in value)]
        elif value is not None:
            flags += [option, _flag_value(value)]
    return flags


def _flag_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # every digit: the command reproduces the run


def command(script: str, config: Any) -> str:
    """The command that reproduces a run of `recipes/<script>` with `config`, for model cards (without --resume or
    --overwrite-output-dir: what one command did to its folder, as `save` leaves them out)."""
    training = getattr(config, "training", None)
    if training is not None:
        config = dataclasses.replace(config, training=dataclasses.replace(training, resume=None,
                                                                          overwrite_output_dir=False))
    return shlex.join(["python", f"recipes/{Path(script).name}", *to_flags(config)])


