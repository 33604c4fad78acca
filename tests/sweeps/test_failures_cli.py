"""Bad input is refused before Ray starts, as the user meets it: ``sweeps/ablation.py`` and
``python -m reports`` in a subprocess, one ``error:`` message naming the file, line, key or value,
every problem at once, no traceback (issue 13, items 5, 7, 8). No Ray is started by these tests:
each command must end before it would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ABLATION = [sys.executable, str(ROOT / "sweeps" / "ablation.py")]

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, timeout: int = 300) -> tuple[int, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_grid_that_repeats_a_cell_or_a_key_is_refused_naming_file_lines_and_keys(tmp_path):
    grid = tmp_path / "dup.yaml"
    grid.write_text(
        "name: dup\n"
        "cells:\n"
        "  softmax: {set: {model.attention.name: softmax}}\n"
        "  span:\n"
        "    set:\n"
        "      model.attention.name: span\n"
        "      model.attention.name: softmax\n"
        "  softmax: {set: {model.attention.name: span}}\n"
        "axes:\n"
        "  - product: {cell: [softmax, span]}\n"
    )
    code, out = run([*ABLATION, "--preset", "smoke", "--grid", str(grid), "--dry-run"], tmp_path)
    assert code == 2, out
    assert f"{grid}:8: duplicate key 'softmax' (first at line 3)" in out
    assert f"{grid}:7: duplicate key 'model.attention.name' (first at line 6)" in out
    assert "Traceback" not in out


def test_every_config_problem_is_listed_at_once_before_anything_starts(tmp_path):
    grid = tmp_path / "table.yaml"
    grid.write_text("name: t\ncells:\n  a: {set: {model.attention.name: softmax}, table: one}\n"
                    "axes:\n  - product: {cell: [a]}\n")
    code, out = run([*ABLATION, "--preset", "smoke", "--grid", str(grid), "--dry-run"], tmp_path)
    assert code == 2 and f"{grid}: cells.a.table: expected a table number" in out and "'one'" in out, out

    code, out = run([*ABLATION, "--preset", "smoke", "--cells", "softmax,span", "--seeds=-1", "train.lr=nan",
                     "train.weight_decay=-0.1", "train.grad_clip=inf", "--runs-dir", str(tmp_path / "runs")],
                    tmp_path)
    assert code == 2, out
    assert "4 problems" in out
    for text in ("'train.lr' must be a finite number, got 'nan'", "'train.grad_clip' must be a finite number",
                 "train.seed must be >= 0, got -1", "train.weight_decay must be >= 0, got -0.1"):
        assert out.count(text) == 1, (text, out)  # once, however many trials share it
    assert "softmax-s-1, span-s-1" in out
    assert "Traceback" not in out and not (tmp_path / "runs").exists()


def test_corrupt_init_checkpoints_fail_before_ray_starts_all_named_at_once(tmp_path):
    files = {"empty": tmp_path / "empty.pth", "text": tmp_path / "text.pth", "truncated": tmp_path / "trunc.pth",
             "safetensors": tmp_path / "bad.safetensors"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("not weights\n")
    torch.save({"w": torch.zeros(64, 64)}, tmp_path / "whole.pth")
    files["truncated"].write_bytes((tmp_path / "whole.pth").read_bytes()[:300])
    files["safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    cells = "\n".join(f"  {name}: {{set: {{model.attention.name: softmax, train.init_checkpoint: '{path}'}}}}"
                      for name, path in files.items())
    grid = tmp_path / "ckpt.yaml"
    grid.write_text(f"name: ckpt\ncells:\n{cells}\naxes:\n  - product: {{cell: [{', '.join(files)}]}}\n")
    code, out = run([*ABLATION, "--preset", "smoke", "--grid", str(grid), "--runs-dir", str(tmp_path / "runs"),
                     "--no-report"], tmp_path)
    assert code == 2, out
    assert "4 problems found before starting" in out
    for path in files.values():
        assert f"train.init_checkpoint={path}" in out and f"checkpoint {path}" in out, (path, out)
    assert "is empty" in out and "Traceback" not in out and "running on" not in out
    assert not (tmp_path / "runs" / "ray").exists()


def test_a_checkpoint_that_does_not_fit_the_model_fails_before_ray_starts(tmp_path):
    import models
    from models import ModelConfig

    # Readable weights, but of another model (hidden 48, not the smoke preset's 32).
    other = models.build_model(ModelConfig(hidden_size=48, num_heads=2, intermediate_size=64, l_layers=1,
                                           x_layers=1, r_layers=1, num_answers=13, visual_feat_dim=40))
    ckpt = tmp_path / "other.pt"
    torch.save(other.state_dict(), ckpt)
    code, out = run([*ABLATION, "--preset", "smoke", "--cells", "softmax", "--runs-dir", str(tmp_path / "runs"),
                     "--no-report", f"train.init_checkpoint={ckpt}", "data.train_limit=256"], tmp_path)
    assert code == 2, out
    assert f"train.init_checkpoint={ckpt} does not load into the model of trial softmax-s0" in out
    assert "shape mismatch" in out and "Traceback" not in out and "running on" not in out


def test_a_sweep_name_with_quotes_in_the_report_command_is_a_clean_error(tmp_path, capsys):
    from mlflow import MlflowClient

    from reports.__main__ import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("adaptive-ablation")
    code, out = run([sys.executable, "-m", "reports", "--tracking-uri", uri, "--sweep", "it's"], ROOT)
    assert code == 2 and "no sweep 'it's'" in out and "Traceback" not in out, out
    for name, expected in (('say "hi"', "no sweep 'say \"hi\"'"), ("it's \"both\"", "cannot hold both")):
        assert main(["--tracking-uri", uri, "--sweep", name]) == 2  # the same command, in this process
        assert expected in capsys.readouterr().err
