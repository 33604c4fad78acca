"""Grids and presets as data: axes (product / zip / fixed) expanded into validated trials.

A grid file (``sweeps/grids/*.yaml``) names *cells* (bundles of config overrides, e.g. one
attention variant) and *axes* over which trials are made; seeds are an axis like any other::

    name: paper
    cells:
      softmax: {set: {model.attention.name: softmax}}
      span:    {set: {model.attention.name: span}}
      grad_std: {pending: "needs the multi-task pretraining stage"}
    axes:
      - product: {cell: [softmax, span, grad_std], train.seed: [0, 1, 2]}

Axis groups combine by product, in order; inside a group ``product`` crosses its keys, ``zip``
pairs them (equal lengths) and ``fixed`` sets one value. A preset (``sweeps/presets/*.yaml``)
picks a grid, sets the base config and may replace axis values (``axes: {train.seed: [0]}``).

Precedence, lowest first: dataclass defaults, preset ``set``, grid ``fixed``, the cell's ``set``,
axis values, command-line ``key=value`` overrides. Every trial's config is built and validated
before the first trial starts (:func:`expand`), so a typo fails in seconds, naming the file and key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeps.config import ConfigError, ExperimentConfig, apply_overrides, flatten, load_yaml

SWEEPS_DIR = Path(__file__).resolve().parent
GRIDS_DIR = SWEEPS_DIR / "grids"
PRESETS_DIR = SWEEPS_DIR / "presets"

_CELL_KEYS = {"set", "label", "pending", "paper", "table", "description"}
_GRID_KEYS = {"name", "description", "cells", "axes", "fixed", "reference"}
_PRESET_KEYS = {"name", "description", "grid", "set", "axes", "time_budget_s", "required"}


@dataclass
class Cell:
    """One grid cell: a named variant (its config overrides and its paper reference)."""

    name: str
    overrides: dict[str, Any]
    label: str = ""
    table: int = 0
    paper: dict[str, float] = field(default_factory=dict)
    pending: str = ""
    description: str = ""


@dataclass
class Trial:
    """One run: a cell at one point of the axes, with its full, validated config."""

    key: str
    cell: Cell
    axis_values: dict[str, Any]
    config: ExperimentConfig

    @property
    def seed(self) -> int:
        return self.config.train.seed

    def flat(self) -> dict[str, Any]:
        return flatten(self.config)


@dataclass
class Grid:
    name: str
    path: Path
    cells: dict[str, Cell]
    axes: list[dict[str, Any]]
    fixed: dict[str, Any]
    description: str = ""
    reference: str = ""


@dataclass
class Preset:
    name: str
    path: Path
    grid: str
    overrides: dict[str, Any]
    axes: dict[str, list[Any]]
    description: str = ""
    time_budget_s: float = 0.0
    #: Keys the user must set (``key: what to give``), e.g. the paper preset's data folder.
    required: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """The expanded sweep: runnable trials, the cells not run (and why), and a fingerprint."""

    grid: Grid
    preset: Preset
    trials: list[Trial]
    pending: dict[str, str]
    #: Hash of every trial's key and config as declared (before the driver fills in data paths
    #: and sizes): a restored sweep must match it.
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            blob = json.dumps([[t.key, t.flat()] for t in self.trials], sort_keys=True, default=str)
            self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    data = load_yaml(path, what)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _number(value: Any, kind: type, where: str, what: str) -> Any:
    """``value`` as ``kind`` (int or float), or a ConfigError naming ``where`` and the value."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and value != int(value)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {what}, got {value!r}") from None


def _resolve(name_or_path: str, folder: Path, what: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path.resolve()
    candidate = folder / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"unknown {what} '{name_or_path}'; known: {', '.join(known)} (or a path)")
    return candidate


def _unknown(data: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def load_grid(name_or_path: str) -> Grid:
    """Read and structurally check a grid file (by name in sweeps/grids/ or by path)."""
    path = _resolve(name_or_path, GRIDS_DIR, "grid")
    data = _read_yaml(path, "grid")
    _unknown(data, _GRID_KEYS, str(path))
    cells: dict[str, Cell] = {}
    for name, spec in (data.get("cells") or {}).items():
        where = f"{path}: cells.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
            raise ConfigError(f"{where}: cell names use letters, digits and '_' only")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping")
        _unknown(spec, _CELL_KEYS, where)
        overrides = spec.get("set") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}.set: expected a mapping of key: value")
        paper = spec.get("paper") or {}
        if not isinstance(paper, dict):
            raise ConfigError(f"{where}.paper: expected a mapping of number name: value, got {paper!r}")
        cells[str(name)] = Cell(
            name=str(name),
            overrides=overrides,
            label=str(spec.get("label", name)),
            table=_number(spec.get("table", 0), int, f"{where}.table", "a table number (1, 2, 3; 0 = none)"),
            paper={k: _number(v, float, f"{where}.paper.{k}", "a number (the paper's accuracy in %)")
                   for k, v in paper.items()},
            pending=str(spec.get("pending", "") or ""),
            description=str(spec.get("description", "") or ""),
        )
    if not cells:
        raise ConfigError(f"{path}: no cells")
    axes = data.get("axes") or []
    if not isinstance(axes, list):
        raise ConfigError(f"{path}: axes must be a list of groups (product / zip / fixed)")
    for i, group in enumerate(axes):
        where = f"{path}: axes[{i}]"
        if not isinstance(group, dict) or len(group) != 1 or next(iter(group)) not in ("product", "zip", "fixed"):
            raise ConfigError(f"{where}: each group is exactly one of product / zip / fixed")
        kind, body = next(iter(group.items()))
        if not isinstance(body, dict) or not body:
            raise ConfigError(f"{where}.{kind}: expected a non-empty mapping of key: values")
        if kind in ("product", "zip"):
            for key, values in body.items():
                if not isinstance(values, list) or not values:
                    raise ConfigError(f"{where}.{kind}.{key}: expected a non-empty list of values")
            if kind == "zip" and len({len(v) for v in body.values()}) != 1:
                lengths = ", ".join(f"{k}: {len(v)}" for k, v in body.items())
                raise ConfigError(f"{where}.zip: lists must have equal lengths ({lengths})")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: fixed must be a mapping of key: value")
    return Grid(
        name=str(data.get("name", path.stem)),
        path=path,
        cells=cells,
        axes=axes,
        fixed=fixed,
        description=str(data.get("description", "") or ""),
        reference=str(data.get("reference", "") or ""),
    )


def load_preset(name_or_path: str) -> Preset:
    """Read a preset file (by name in sweeps/presets/ or by path)."""
    path = _resolve(name_or_path, PRESETS_DIR, "preset")
    data = _read_yaml(path, "preset")
    _unknown(data, _PRESET_KEYS, str(path))
    axes = data.get("axes") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise ConfigError(f"{path}: axes must map a key to a non-empty list of values")
    overrides = data.get("set") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: set must be a mapping of key: value")
    return Preset(
        name=str(data.get("name", path.stem)),
        path=path,
        grid=str(data.get("grid", "paper")),
        overrides=overrides,
        axes=axes,
        description=str(data.get("description", "") or ""),
        time_budget_s=_number(data.get("time_budget_s", 0) or 0, float, f"{path}: time_budget_s", "seconds"),
        required={str(k): str(v) for k, v in (data.get("required") or {}).items()},
    )


def _points(groups: list[dict[str, Any]], replace: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Expand axis groups into a list of ``{key: value}`` points (product across groups)."""
    per_group: list[list[dict[str, Any]]] = []
    for group in groups:
        kind, body = next(iter(group.items()))
        body = {k: replace.get(k, v) for k, v in body.items()}
        if kind == "fixed":
            per_group.append([dict(body)])
        elif kind == "zip":
            n = {len(v) for v in body.values()}
            if len(n) != 1:
                raise ConfigError(f"zip axes {list(body)} have unequal lengths after overrides")
            per_group.append([dict(zip(body, vals)) for vals in zip(*body.values())])
        else:
            names = list(body)
            per_group.append([dict(zip(names, vals)) for vals in itertools.product(*body.values())])
    points = [{}]
    for options in per_group:
        points = [{**p, **o} for p in points for o in options]
    return points


def trial_key(cell: str, axis_values: dict[str, Any]) -> str:
    """Deterministic, filesystem-safe trial name: ``softmax-s0``, ``span-s1-lr0.001``."""
    parts = [cell]
    for key, value in axis_values.items():
        if key == "cell":
            continue
        short = "s" if key == "train.seed" else key.rsplit(".", 1)[-1]
        parts.append(f"{short}{value}")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts))


def expand(
    grid: Grid,
    preset: Preset,
    cli_overrides: dict[str, Any] | None = None,
    axis_replace: dict[str, list[Any]] | None = None,
    cells: list[str] | None = None,
) -> Plan:
    """Build and validate every trial of ``grid`` under ``preset``.

    Args:
        grid: the grid (cells and axes).
        preset: base config and axis replacements.
        cli_overrides: ``key=value`` pairs from the command line (applied last).
        axis_replace: axis values to replace (e.g. ``{"train.seed": [0, 1]}``), after the preset's.
        cells: run only these cells (default: all the axes name).

    Raises:
        ConfigError: naming the grid / preset file, cell and key at fault.
    """
    # Cells asked for by name run even where the preset's own `cell` axis leaves them out; and a
    # preset's `cell` axis names cells of its own grid, so another grid (--grid weighting) keeps its own.
    own_grid = preset.grid in (grid.name, grid.path.stem, str(grid.path))
    replace = {**{k: v for k, v in preset.axes.items() if not (k == "cell" and (cells or not own_grid))},
               **(axis_replace or {})}
    try:
        base = apply_overrides(ExperimentConfig(), preset.overrides, source=f"{preset.path}: set")
        base = apply_overrides(base, grid.fixed, source=f"{grid.path}: fixed")
    except ConfigError:
        raise
    points = _points(grid.axes, replace) if grid.axes else [{"cell": name} for name in grid.cells]
    axis_keys = {k for group in grid.axes for k in next(iter(group.values()))}
    for key in axis_replace or {}:
        # A preset's axis values apply where its grid has that axis; the command line's must match.
        if key not in axis_keys:
            raise ConfigError(
                f"axis '{key}' given on the command line is not an axis of grid {grid.path.name} "
                f"(axes: {', '.join(sorted(axis_keys)) or 'none'})"
            )
    missing = [k for k in preset.required if not (cli_overrides or {}).get(k) and not preset.overrides.get(k)]
    if missing:
        lines = "; ".join(f"{k}=... ({preset.required[k]})" for k in missing)
        raise ConfigError(f"preset '{preset.name}' needs: {lines}")
    if cells:
        unknown = [c for c in cells if c not in grid.cells]
        if unknown:
            raise ConfigError(f"--cells: unknown cell(s) {', '.join(unknown)}; grid {grid.name} has {', '.join(grid.cells)}")
    trials: list[Trial] = []
    pending: dict[str, str] = {}
    seen: dict[str, int] = {}
    problems: dict[str, dict[str, Any]] = {}  # message -> the cells and trials it applies to
    for point in points:
        name = point.get("cell")
        if name is None:
            raise ConfigError(f"{grid.path}: the axes must include 'cell'")
        if name not in grid.cells:
            raise ConfigError(f"{grid.path}: axes name cell '{name}', which is not defined under cells")
        cell = grid.cells[name]
        if cells and name not in cells:
            continue
        if cell.pending:
            pending[name] = cell.pending
            continue
        values = {k: v for k, v in point.items() if k != "cell"}
        key = trial_key(name, values)
        errors: list[str] = []
        cfg = apply_overrides(base, cell.overrides, source=f"{grid.path}: cells.{name}.set", errors=errors)
        cfg = apply_overrides(cfg, values, source=f"{grid.path}: axes", errors=errors)
        cfg = apply_overrides(cfg, cli_overrides or {}, source="command line", errors=errors)
        invalid: list[str] = []
        try:
            cfg.validate()  # also with a bad override left out: its other problems are listed too
        except ConfigError as err:
            invalid = str(err).split("; ")  # one per bad key
        for text in errors + invalid:
            found = problems.setdefault(text, {"cells": [], "trials": [], "validation": text in invalid})
            found["trials"].append(key)
            if name not in found["cells"]:
                found["cells"].append(name)
        if errors or invalid:
            continue
        if key in seen:
            raise ConfigError(f"{grid.path}: two trials share the name '{key}' (duplicate axis values?)")
        seen[key] = 1
        trials.append(Trial(key=key, cell=cell, axis_values=values, config=cfg))
    if problems:
        # Every problem once (however many trials share it), all of them at once.
        lines = []
        for text, found in problems.items():
            keys = found["trials"]
            where = ", ".join(f"'{c}'" for c in found["cells"])
            text = f"{grid.path}: cell {where}: {text}" if found["validation"] else text
            lines.append(f"{text} [{len(keys)} trial(s): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}]")
        raise ConfigError(lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines))
    if not trials:
        raise ConfigError(f"{grid.path}: no runnable trials (pending: {', '.join(pending) or 'none'})")
    absent = [c for c in cells or [] if c not in pending and all(t.cell.name != c for t in trials)]
    if absent:
        raise ConfigError(f"--cells: {', '.join(absent)} not on the axes of grid {grid.name} (axes list the cells to run)")
    return Plan(grid=grid, preset=preset, trials=trials, pending=pending)
