"""The one configuration system of every package: one error type, one coercion rule, typed lists.

Every configuration (``models.ModelConfig``, ``tasks.DataConfig``, ``tasks.pretrain.PretrainConfig``,
``sweeps.config.ExperimentConfig``) is a tree of standard-library dataclasses whose leaves are
``str``, ``int``, ``float``, ``bool`` or a typed list ``tuple[str, ...]``. This module flattens such
a tree to dotted keys (MLflow params, ``--list-keys``), applies ``key=value`` overrides from the
command line, YAML presets and grids, and coerces every value by one rule::

    cfg = apply_overrides(ExperimentConfig(), {"model.attention.stacks": "lang,cross", "train.lr": "3e-4"})
    flatten(cfg)["model.attention.stacks"]   # "lang,cross"   (a typed list flattens to one string)
    cfg.model.attention.stacks               # ("lang", "cross")

Why a small module and not pydantic or OmegaConf: the configs are plain dataclasses that models/
builds from without any dependency, their validation messages name the key and where it came from
(file, grid cell, command line) and are collected all at once, and their flat form must stay the
MLflow param names logged so far. pydantic would wrap every class and word the errors its own way;
OmegaConf's structured configs coerce by their own rules and add a runtime dependency to models/.
What was missing was not a library's features but a single rule, which is this file.

The coercion rule (the same for every key, whatever its package):

* ``bool``: a bool, 0/1, or the strings ``1 true yes on`` / ``0 false no off`` (any case).
* ``int``: an int, an integral float (YAML's ``3.0``), or a string holding an integer literal
  (``"3"``; ``"3.0"`` and ``"3.5"`` are refused: a command-line int is written as one). Never a bool.
* ``float``: any int or float or numeric string, but finite (NaN passes every ``<= 0`` check and
  inf overflows the first step: no key wants either). Never a bool.
* ``str``: a string or a number; never a list, mapping, bool or null.
* ``tuple[str, ...]`` (typed list): a YAML list, or one comma-separated string; items are stripped
  and empty items dropped. It flattens back to the comma-separated string.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from typing import Any

Scalar = typing.Union[str, int, float, bool]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and where it came from.

    The one error type of every package's configuration (``models``, ``tasks``, ``sweeps`` re-export it).
    """


def split_list(value: str | tuple[str, ...] | list[str]) -> list[str]:
    """A typed list's items: a tuple/list as is, a comma-separated string split (items stripped, empty dropped)."""
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


def flatten(obj: Any, prefix: str = "") -> dict[str, Scalar]:
    """Nested dataclass -> ``{"a.b.c": scalar}`` in field order; a typed list becomes ``"x,y"``."""
    out: dict[str, Scalar] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif isinstance(value, (tuple, list)):
            out[key] = ",".join(str(v) for v in value)
        else:
            out[key] = value
    return out


def keys(cls: type) -> list[str]:
    """All dotted keys of a dataclass type (its defaults flattened)."""
    return list(flatten(cls()).keys())


def apply_overrides(obj: Any, overrides: dict[str, Any], source: str = "overrides",
                    errors: list[str] | None = None) -> Any:  # fmt: skip
    """Return a copy of the dataclass ``obj`` with dotted-key ``overrides`` applied.

    Values may be typed (from YAML) or strings (from the command line, MLflow params); each is
    coerced to its field's type. The copy is not re-validated here (the caller validates the whole
    tree once, so cross-field checks see every override). Every unknown key or bad value is
    reported, not the first only, with the closest valid keys for a typo.

    Args:
        obj: The dataclass tree to start from (left unchanged).
        overrides: ``{"a.b": value}``.
        source: Where the overrides came from, for the messages (a file, a grid cell, ``command line``).
        errors: If given, messages are appended here and the good keys still applied (so a caller can
            go on to find every other problem too); otherwise the first call with problems raises.

    Raises:
        ConfigError: naming every bad key and ``source`` (only when ``errors`` is None).
    """
    obj = copy.deepcopy(obj)  # not dataclasses.replace: that would validate half-applied overrides
    problems: list[str] = []
    for key, raw in overrides.items():
        try:
            _apply_one(obj, key, raw, source)
        except ConfigError as err:
            problems.append(str(err))
    if problems and errors is None:
        raise ConfigError("; ".join(problems))
    if errors is not None:
        errors.extend(problems)
    return obj


def unflatten(cls: type, flat: dict[str, Any], source: str = "config") -> Any:
    """``{"a.b": v}`` -> a ``cls`` instance; unknown keys raise, missing keys keep their defaults."""
    return apply_overrides(cls(), flat, source=source)


def parse_cli_overrides(items: list[str], source: str = "command line") -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``; raises on an item without ``=``."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{source}: override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _apply_one(obj: Any, key: str, raw: Any, source: str) -> None:
    """Set one dotted ``key`` of ``obj`` (in place) to ``raw`` coerced to the field's type."""
    parts = key.split(".")
    target = obj
    try:
        for part in parts[:-1]:
            child = getattr(target, part)
            if not dataclasses.is_dataclass(child):
                raise AttributeError(part)
            target = child
        f = {fl.name: fl for fl in dataclasses.fields(target)}[parts[-1]]
        if dataclasses.is_dataclass(getattr(target, parts[-1])):
            raise ConfigError(f"{source}: '{key}' is a section; set {key}.<field>")
    except (AttributeError, KeyError):
        near = difflib.get_close_matches(key, keys(type(obj)), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise ConfigError(f"{source}: unknown key '{key}'.{hint}") from None
    setattr(target, f.name, coerce(key, raw, field_type(type(target), f.name), source))


def is_list_type(typ: Any) -> bool:
    """Whether ``typ`` is a typed list (``tuple[str, ...]``)."""
    return typing.get_origin(typ) is tuple


def coerce(key: str, raw: Any, typ: Any, source: str = "overrides") -> Any:
    """Convert ``raw`` (typed, or a string from the command line or MLflow) to ``typ`` by the module's rule.

    Raises:
        ConfigError: naming ``key``, ``source``, the expected type and the value.
    """
    finite = False
    try:
        if is_list_type(typ):
            if isinstance(raw, str):
                return tuple(split_list(raw))
            if isinstance(raw, (list, tuple)) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                                      for x in raw):  # fmt: skip
                return tuple(split_list([str(x) for x in raw]))
            raise ValueError
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            raise ValueError
        if typ is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float):
                if raw != int(raw):
                    raise ValueError
                return int(raw)
            return int(str(raw).strip())
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
            if math.isfinite(value):
                return value
            finite = True
        if typ is str:
            if isinstance(raw, (list, tuple, dict, bool)) or raw is None:
                raise ValueError
            return str(raw)
    except (TypeError, ValueError):
        what = "a list of strings (a YAML list or 'a,b')" if is_list_type(typ) else getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{source}: '{key}' expects {what}, got {raw!r}") from None
    if finite:
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {raw!r}")
    raise ConfigError(f"{source}: '{key}' has unsupported type {typ}")


def field_type(cls: type, name: str) -> Any:
    """The declared type of field ``name`` of dataclass ``cls`` (``X | None`` -> ``X``)."""
    typ = typing.get_type_hints(cls)[name]
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        typ = [a for a in typing.get_args(typ) if a is not type(None)][0]
    return typ


def validate_tree(obj: Any) -> None:
    """Call ``validate()`` on every dataclass in the tree, innermost first (after overrides were
    applied in place, so each section's own checks and then the cross-section ones run)."""
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            validate_tree(child)
    if callable(getattr(obj, "validate", None)):
        obj.validate()


def normalise_lists(obj: Any, section: str = "") -> None:
    """Turn every typed-list field of ``obj`` given as a string or list into its tuple (in place), so
    ``AttentionConfig(stacks="lang,cross")`` and ``AttentionConfig(stacks=["lang", "cross"])`` hold the
    same value. Call it first in a section's ``__post_init__``."""
    for f in dataclasses.fields(obj):
        typ = field_type(type(obj), f.name)
        value = getattr(obj, f.name)
        if is_list_type(typ) and not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
            setattr(obj, f.name, coerce(f"{section}{f.name}", value, typ, source=type(obj).__name__))


def check_types(obj: Any, section: str = "") -> None:
    """Raise :class:`ConfigError` for the first field of ``obj`` whose value is not of its declared
    type (a section built directly in Python, e.g. ``DataConfig(grid="3")``, skips the coercion)."""
    for f in dataclasses.fields(obj):
        typ, value = field_type(type(obj), f.name), getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue
        if is_list_type(typ):
            ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        elif typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif typ is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, typ)
        if not ok:
            what = "a list of strings" if is_list_type(typ) else getattr(typ, "__name__", str(typ))
            raise ConfigError(f"{section}{f.name} must be {what}, got {value!r}")
