"""Reading configs from TOML or YAML files, ``--set key=value`` overrides, and clear errors.

Any command that takes a pydantic config (``peace pretrain``, ...) reads it the same way::

    config = load_config(PretrainConfig, "configs/stage1_tiny.toml", ["optim.lr=1e-3"])

* Files: ``.toml`` (stdlib ``tomllib``; ``tomli`` on Python 3.10) or ``.yaml``/``.yml``; the top
  level must be a table/mapping.
* Overrides: ``dotted.key=value``; the value is read as a YAML scalar or flow list/mapping
  (``3``, ``1e-3``, ``true``, ``null``, ``[vision, text]``, ``"a string"``); an empty value is
  ``null``. A numeric key part indexes a list (``data.datasets.0.weight=2``).
* Errors: :class:`ConfigError` with one line per problem, naming the dotted field; an unknown
  field lists the valid fields at that place and the closest one.

YAML here reads ``1e-3`` as a number (PyYAML's YAML 1.1 rules would read it as a string), so a
value means the same in TOML, YAML and ``--set``.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from peace_registry.errors import PeaceError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

ConfigT = TypeVar("ConfigT", bound=BaseModel)
TOML_SUFFIXES = (".toml",)
YAML_SUFFIXES = (".yaml", ".yml")
JSON_SUFFIXES = (".json",)


class ConfigError(PeaceError, ValueError):
    """A config file, override or value that cannot be used; the message says where and why."""


# --------------------------------------------------------------------------------------------
# YAML with numbers as people write them


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-3``, ``5E4``) as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, *, source: str = "<string>") -> Any:
    """Parse YAML text safely (no arbitrary objects); errors name ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {source} as YAML: {_one_line(err)}") from err


# --------------------------------------------------------------------------------------------
# Files


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping in a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in TOML_SUFFIXES:
        if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
            raise ConfigError("reading TOML on Python 3.10 needs 'tomli' (pip install tomli)")
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"cannot parse {str(path)!r} as TOML: {err}") from err
    elif suffix in YAML_SUFFIXES:
        data = parse_yaml(text, source=repr(str(path)))
    elif suffix in JSON_SUFFIXES:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"cannot parse {str(path)!r} as JSON: {err}") from err
    else:
        raise ConfigError(
            f"config file {str(path)!r}: unknown suffix {path.suffix!r}; expected one of "
            + ", ".join(TOML_SUFFIXES + YAML_SUFFIXES + JSON_SUFFIXES)
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a table/mapping at the top level, got "
            f"{type(data).__name__}"
        )
    return data


def save_config(config: BaseModel | Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a config as ``.yaml``/``.yml`` or ``.json`` (atomically); readable back with
    :func:`load_config`. TOML cannot express ``null``, so it is not offered for writing."""
    path = Path(path)
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
    elif suffix in JSON_SUFFIXES:
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise ConfigError(
            f"cannot write a config as {path.suffix!r}; use .yaml, .yml or .json ({str(path)!r})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------------------------
# --set overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> ``(["optim", "lr"], 0.001)`` (see the module docstring)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not part.strip() for part in parts):
        raise ConfigError(
            f"override {text!r}: the key must be dotted field names, e.g. optim.lr=1e-3"
        )
    value = parse_yaml(raw_value, source=f"the value of override {text!r}")
    return [part.strip() for part in parts], value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with every ``KEY=VALUE`` override set, in order."""
    result = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        _set_dotted(result, parts, value, text)
    return result


def _set_dotted(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _list_index(part, len(node), where, text)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            parent = ".".join(parts[:depth])
            raise ConfigError(
                f"override {text!r}: {parent} is a {type(node).__name__}, not a table, so it "
                f"has no field {part!r}"
            )
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def _list_index(part: str, length: int, where: str, text: str) -> int:
    if not re.fullmatch(r"-?\d+", part):
        raise ConfigError(f"override {text!r}: {where} indexes a list; expected a number")
    index = int(part)
    if not -length <= index < length:
        raise ConfigError(
            f"override {text!r}: index {index} is out of range for a list of {length} items"
        )
    return index


# --------------------------------------------------------------------------------------------
# Validation with readable errors


def load_config(
    model: type[ConfigT],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> ConfigT:
    """Read ``path`` (or start from ``base``), apply ``overrides`` and validate as ``model``."""
    if path is not None and base is not None:
        raise ValueError("load_config: give a path or a base mapping, not both")
    data = read_config_file(path) if path is not None else dict(base or {})
    data = apply_overrides(data, overrides)
    source = repr(str(path)) if path is not None else "config"
    return validate_config(model, data, source=source)


def validate_config(model: type[ConfigT], data: Any, *, source: str = "config") -> ConfigT:
    """``model.model_validate(data)``, with a :class:`ConfigError` listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source=source)) from err


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: the dotted field, what is wrong, and for unknown fields the valid
    ones (with the closest)."""
    lines = []
    for problem in err.errors():
        loc = tuple(problem.get("loc", ()))
        field = ".".join(str(part) for part in loc) or "(top level)"
        if problem.get("type") == "extra_forbidden":
            lines.append(_unknown_field_message(model, loc, field))
            continue
        message = problem.get("msg", "invalid value")
        given = problem.get("input")
        shown = "" if isinstance(given, (dict, list)) else f" (got {given!r:.60})"
        lines.append(f"{field}: {message}{shown}")
    count = len(lines)
    header = f"invalid {source}: {count} problem{'s' if count != 1 else ''}"
    return header + "\n  " + "\n  ".join(lines)


def _unknown_field_message(model: type[BaseModel], loc: tuple[Any, ...], field: str) -> str:
    name = str(loc[-1]) if loc else field
    owner = model_at(model, loc[:-1])
    if owner is None:
        return f"{field}: unknown field"
    valid = sorted(owner.model_fields)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    place = ".".join(str(part) for part in loc[:-1]) or "the top level"
    return f"{field}: unknown field{hint}; valid fields of {place}: {', '.join(valid)}"


def model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model class found at ``loc`` inside ``model`` (None when not a model)."""
    current: Any = model
    for part in loc:
        if _is_model(current):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
            continue
        current = _step_into(current, part)
        if current is None:
            return None
    current = _unwrap_model(current)
    return current if _is_model(current) else None


def _step_into(annotation: Any, part: Any) -> Any:
    """Follow one loc part through a container or union annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple, Sequence) and args and isinstance(part, int):
        return args[0]
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1]
    if origin in (typing.Union, types.UnionType):
        # pydantic puts the chosen union member's name in loc; else try the one model member.
        for arg in args:
            if getattr(arg, "__name__", None) == part:
                return arg
        inner = _unwrap_model(annotation)
        if _is_model(inner):
            return _step_into_model(inner, part)
    return None


def _step_into_model(model: type[BaseModel], part: Any) -> Any:
    field = model.model_fields.get(str(part))
    return None if field is None else field.annotation


def _unwrap_model(annotation: Any) -> Any:
    """``Model | None`` -> ``Model`` (the single model member of a union)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [arg for arg in typing.get_args(annotation) if _is_model(arg)]
        if len(models) == 1:
            return models[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
