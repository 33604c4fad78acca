"""Session-wide fixtures: a real Ray head (``ray start --head``) and one real smoke sweep.

Both are started once per test session and stopped at its end, even when tests fail: the Ray
head by SIGTERM to the ``ray start --block`` process that owns it (it drains and stops every Ray
process it started), then SIGKILL of its process group if it has not exited.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 45.0) -> None:
    """SIGTERM ``proc`` (the leader of its own session), wait, then SIGKILL its whole group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def auth_env(tmp: Path) -> dict[str, str]:
    """Token authentication with a token of the session's own (Ray 2.60 turns token auth on for a
    new cluster whenever ~/.ray/auth_token exists, but its job CLI does not then send it): the
    head, ``ray job submit`` and every driver get the same explicit settings, and ~/.ray is untouched."""
    token = tmp / "ray-auth-token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    temp_dir: Path
    proc: subprocess.Popen
    auth: dict[str, str]

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver that should use this cluster."""
        env = dict(os.environ, RAY_ADDRESS=self.gcs_address, PYTHONUNBUFFERED="1", **self.auth, **extra)
        env.pop("MLFLOW_TRACKING_URI", None)
        return env


def start_ray_head(tmp: Path, num_cpus: int = 2, extra_args: tuple[str, ...] = ()) -> RayHead:
    port, dash = free_port(), free_port()
    auth = auth_env(tmp)
    temp_dir = Path(f"/tmp/ray-test-{os.getpid()}-{port}")  # short: Ray's socket paths have a length limit
    log = open(tmp / f"ray-head-{port}.log", "w")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *extra_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
                            env=dict(os.environ, **auth))
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # it answers: 401 when token authentication is on (after any local ray.init())
        except OSError:
            time.sleep(1)
    else:
        stop_process_group(proc)
        raise RuntimeError(f"the Ray head did not come up in 120 s; see {log.name}")
    return RayHead(gcs_address=f"127.0.0.1:{port}", dashboard_url=url, temp_dir=temp_dir, proc=proc, auth=auth)


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
