"""Session-wide fixtures: a real Ray head (``ray start --head``) and one real smoke sweep.

Both are started once per test session and stopped at its end, even when tests fail: the Ray
head by SIGTERM to the ``ray start --block`` process that owns it (it drains and stops every Ray
process it started), then SIGKILL of its process group if it has not exited.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BIN, ROOT, start_ray_head, stop_process_group

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real single-node Ray cluster (2 CPUs) bound to 127.0.0.1, for the whole session."""
    head = start_ray_head(tmp_path_factory.mktemp("ray"))
    try:
        yield head
    finally:
        stop_process_group(head.proc)


@dataclass
class SmokeSweep:
    tracking_uri: str
    sweep_id: str
    experiment: str
    runs_dir: Path
    output: str

    def __iter__(self):  # `uri, sweep, experiment = smoke_sweep`
        return iter((self.tracking_uri, self.sweep_id, self.experiment))


@pytest.fixture(scope="session")
def smoke_sweep(ray_head, tmp_path_factory) -> SmokeSweep:
    """The smoke preset, submitted as a Ray job to the session's Ray head, exactly as documented:
    ``ray job submit --working-dir . -- python sweeps/ablation.py --preset smoke``."""
    runs = tmp_path_factory.mktemp("smoke-runs")
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={ray_head.dashboard_url}", "--working-dir", ".",
           "--", "python", "sweeps/ablation.py", "--preset", "smoke", "--runs-dir", str(runs)]
    env = ray_head.env()
    env.pop("RAY_ADDRESS")  # `ray job submit` takes the dashboard address
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        output = proc.stdout + proc.stderr
        # The dashboard answers before the node's job agent has registered: retry only that.
        if proc.returncode == 0 or "No available agent" not in output or time.time() > deadline:
            break
        time.sleep(3)
    (runs / "job-output.log").write_text(output)
    assert proc.returncode == 0, f"smoke sweep failed (exit {proc.returncode}):\n{output[-6000:]}"
    return SmokeSweep(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}", sweep_id="smoke-paper",
                      experiment="adaptive-ablation", runs_dir=runs, output=output)
