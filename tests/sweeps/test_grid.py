"""Grids and presets: expansion, precedence, and validation that names the key at fault."""

import textwrap

import pytest

from sweeps.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    flatten,
    parse_cli_overrides,
    unflatten,
)
from sweeps.grid import GRIDS_DIR, PRESETS_DIR, expand, load_grid, load_preset


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def preset(tmp_path):
    return load_preset(str(write(tmp_path, "p.yaml", """
        name: p
        grid: paper
        set: {model.hidden_size: 32, model.num_heads: 2, model.intermediate_size: 64, train.epochs: 1}
    """)))


def test_flatten_round_trip_and_cli_strings():
    cfg = apply_overrides(ExperimentConfig(), parse_cli_overrides(
        ["model.attention.name=span", "train.lr=3e-4", "model.l_layers=2", "train.log_best_checkpoint=false"]))
    assert cfg.model.attention.name == "span" and cfg.train.lr == 3e-4 and cfg.model.l_layers == 2
    assert cfg.train.log_best_checkpoint is False
    flat = flatten(cfg)
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert unflatten(ExperimentConfig, flat) == cfg
    # MLflow hands params back as strings: they must round-trip too.
    assert unflatten(ExperimentConfig, {k: str(v) for k, v in flat.items()}) == cfg


def test_trials_start_longest_first(preset):
    """Pretraining trials, then 10-6-6, then the rest in the grid's order (seeds kept); LayerDrop
    runs one layer fewer per stack in training: 10-6-6 with it costs what 9-5-5 does, 9-5-5 least."""
    from sweeps.tune import longest_first

    plan = expand(load_grid("paper"), preset)
    keys = [t.key for t in longest_first(plan.trials)]
    assert {k.rsplit("-", 1)[0] for k in keys[:6]} == {"pretrain_equal", "grad_std"}
    assert keys[6:12] == ["base_1066-s0", "base_1066-s1", "base_1066-s2", "softmax-s0", "softmax-s1", "softmax-s2"]
    assert [k.rsplit("-", 1)[0] for k in keys[-3:]] == ["layerdrop_955"] * 3 and len(keys) == len(plan.trials)


def test_cells_named_on_the_command_line_run_even_where_the_preset_leaves_them_out(tmp_path):
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text("name: narrow\ngrid: paper\naxes:\n  cell: [softmax, span]\n  train.seed: [0, 1, 2]\n"
                      "set: {data.name: easyvqa}\n")
    default = load_preset(str(narrow))
    grid = load_grid("paper")
    assert "pretrain_equal" not in {t.cell.name for t in expand(grid, default).trials}
    plan = expand(grid, default, cells=["pretrain_equal", "grad_std"])
    assert [t.key for t in plan.trials] == [f"{c}-s{s}" for c in ("pretrain_equal", "grad_std") for s in (0, 1, 2)]


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'.*train.lr"):
        apply_overrides(ExperimentConfig(), {"train.lrr": 1})
    with pytest.raises(ConfigError, match=r"'train.epochs' expects int, got 'three'"):
        apply_overrides(ExperimentConfig(), {"train.epochs": "three"})
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_cli_overrides(["train.lr"])


def test_paper_grid_expands_cells_times_seeds(preset):
    grid = load_grid("paper")
    plan = expand(grid, preset)
    cells = {t.cell.name for t in plan.trials}
    assert cells == {"softmax", "span", "entmax", "span_entmax", "layerdrop_955", "layerdrop_1066", "base_1066",
                     "pretrain_equal", "grad_std"}  # fmt: skip
    assert len(plan.trials) == 9 * 3 and plan.pending == {}
    keys = [t.key for t in plan.trials]
    assert len(set(keys)) == len(keys) and "span-s2" in keys
    by_key = {t.key: t.config for t in plan.trials}
    assert by_key["layerdrop_1066-s0"].model.l_layers == 10
    assert by_key["layerdrop_1066-s0"].model.layerdrop.mode == "fixed"
    assert by_key["layerdrop_955-s1"].model.l_layers == 9 and by_key["layerdrop_955-s1"].train.seed == 1
    # preset values reach every trial; cells override them only where they say so
    assert all(t.config.model.hidden_size == 32 for t in plan.trials)
    # the pretraining cells: same fine-tuning as softmax, pretraining sized by the preset
    pre = {c: by_key[f"{c}-s0"] for c in ("pretrain_equal", "grad_std")}
    assert {c: (p.pretrain.enabled, p.pretrain.weighting) for c, p in pre.items()} == {
        "pretrain_equal": (True, "equal"), "grad_std": (True, "grad_std")}
    assert all(p.pretrain.corpus_images == 2000 and p.train == by_key["softmax-s0"].train for p in pre.values())
    smoke = expand(grid, load_preset("smoke"), cells=["grad_std"]).trials[0].config.pretrain
    assert (smoke.enabled, smoke.epochs, smoke.corpus_images) == (True, 1, 256)
    assert not by_key["softmax-s0"].pretrain.enabled and grid.cells["grad_std"].table == 3


def test_a_presets_cell_axis_applies_to_its_own_grid_only():
    """The default preset lists the paper grid's cells; `--grid weighting` runs the weighting cells."""
    default = load_preset("default")
    assert default.axes.get("cell")  # the precondition: the shipped default preset narrows its grid's cells
    plan = expand(load_grid("weighting"), default)
    assert sorted({t.cell.name for t in plan.trials}) == ["equal", "grad_std", "gradnorm", "softmax", "uncertainty"]
    assert len(plan.trials) == 15  # x the preset's 3 seeds
    assert {t.cell.name for t in expand(load_grid("paper"), default).trials} == set(default.axes["cell"])


def test_weighting_grid_runs_the_four_strategies_and_a_from_scratch_reference(preset):
    plan = expand(load_grid("weighting"), preset)
    cells = {t.key: t.config for t in plan.trials}
    assert sorted({k.rsplit("-", 1)[0] for k in cells}) == ["equal", "grad_std", "gradnorm", "softmax", "uncertainty"]
    assert len(cells) == 15 and plan.pending == {}
    assert {k: c.pretrain.weighting for k, c in cells.items() if c.pretrain.enabled and k.endswith("s0")} == {
        "equal-s0": "equal", "grad_std-s0": "grad_std", "uncertainty-s0": "uncertainty", "gradnorm-s0": "gradnorm"}
    assert not cells["softmax-s0"].pretrain.enabled
    assert all(c.model.attention.name == "softmax" for c in cells.values())


def test_precedence_cli_over_cell_over_preset(preset):
    grid = load_grid("paper")
    plan = expand(grid, preset, cli_overrides={"train.lr": "0.5"}, axis_replace={"train.seed": [7]},
                  cells=["span"])
    assert [t.key for t in plan.trials] == ["span-s7"]
    assert plan.trials[0].config.train.lr == 0.5
    assert plan.trials[0].config.model.attention.name == "span"


def test_fingerprint_changes_with_config(preset):
    grid = load_grid("paper")
    a = expand(grid, preset).fingerprint
    assert a == expand(grid, preset).fingerprint
    assert a != expand(grid, preset, cli_overrides={"train.lr": "0.1"}).fingerprint


@pytest.mark.parametrize("body, message", [
    ("""
        cells: {a: {set: {model.attention.name: nope}}}
        axes: [{product: {cell: [a]}}]
     """, r"cell 'a'.*attention.name"),
    ("""
        cells: {a: {set: {model.l_layers: 2, model.layerdrop.mode: fixed, model.layerdrop.n_drop: 2}}}
        axes: [{product: {cell: [a]}}]
     """, r"cell 'a'.*n_drop"),
    ("""
        cells: {a: {set: {model.hidden_sise: 8}}}
        axes: [{product: {cell: [a]}}]
     """, r"cells.a.set: unknown key 'model.hidden_sise'.*model.hidden_size"),
    ("""
        cells: {a: {set: {}}}
        axes: [{product: {cell: [a, b]}}]
     """, r"cell 'b', which is not defined"),
    ("""
        cells: {a: {sett: {}}}
        axes: [{product: {cell: [a]}}]
     """, r"cells.a: unknown key\(s\) sett"),
    ("""
        cells: {a: {}}
        axes: [{zip: {cell: [a, a], train.seed: [1]}}]
     """, r"equal lengths"),
    ("""
        cells: {a: {set: {model.l_layers: -1}}}
        axes: [{product: {cell: [a]}}]
     """, r"l_layers"),
    ("""
        cells: {a: {}}
        axes: [{product: {cell: [a], train.seed: [1, 1]}}]
     """, r"share the name"),
])
def test_bad_grids_fail_before_any_trial_naming_the_key(tmp_path, preset, body, message):
    path = write(tmp_path, "bad.yaml", "name: bad\n" + textwrap.dedent(body))
    with pytest.raises(ConfigError, match=message) as err:
        expand(load_grid(str(path)), preset)
    assert "bad.yaml" in str(err.value)


def test_zip_and_fixed_axes(tmp_path, preset):
    path = write(tmp_path, "g.yaml", """
        name: g
        cells: {a: {}, b: {set: {model.attention.name: span}}}
        axes:
          - zip: {cell: [a, b], train.lr: [0.1, 0.2]}
          - fixed: {train.epochs: 2}
          - product: {train.seed: [0, 1]}
    """)
    plan = expand(load_grid(str(path)), preset)
    assert [(t.key, t.config.train.lr, t.config.train.epochs) for t in plan.trials] == [
        ("a-lr0.1-epochs2-s0", 0.1, 2), ("a-lr0.1-epochs2-s1", 0.1, 2),
        ("b-lr0.2-epochs2-s0", 0.2, 2), ("b-lr0.2-epochs2-s1", 0.2, 2)]


def test_replacing_a_missing_axis_is_an_error(tmp_path, preset):
    path = write(tmp_path, "g.yaml", "name: g\ncells: {a: {}}\naxes: [{product: {cell: [a]}}]\n")
    with pytest.raises(ConfigError, match="'train.seed'.*not an axis"):
        expand(load_grid(str(path)), preset, axis_replace={"train.seed": [0]})


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_shipped_preset_expands_with_its_grid(name):
    preset = load_preset(name)
    required = {key: "/somewhere" for key in preset.required}
    plan = expand(load_grid(preset.grid), preset, cli_overrides=required)
    assert plan.trials
    assert "Run:" in preset.path.read_text().split("\n\n")[0], "presets carry their command in the header"


@pytest.mark.parametrize("name", sorted(p.stem for p in GRIDS_DIR.glob("*.yaml")))
def test_every_shipped_grid_has_its_command_in_the_header(name):
    text = (GRIDS_DIR / f"{name}.yaml").read_text()
    assert "Run:" in text.split("\n\n")[0]
    load_grid(name)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; known: .*default"):
        load_preset("nope")


def test_preset_required_keys_are_named():
    preset = load_preset("paper")
    with pytest.raises(ConfigError, match=r"preset 'paper' needs: data.root=.*train.init_checkpoint="):
        expand(load_grid("paper"), preset)
