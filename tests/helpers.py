"""Real processes for the integration tests: Ray heads and nodes (``ray start``), and the small
utilities around them. Importable from every test folder (``tests/`` is on ``sys.path``).

Every process is started as the leader of its own session, so that stopping it by its PID (and
then its process group) stops everything it started, and nothing else.
"""

from __future__ import annotations

import json
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

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent

#: Environment of every test Ray node (not of production clusters):
#: * SIGTERM stops a node at once (Ray 2.60 drains a node for up to 30 s first, for Serve);
#: * RAY_ADDRESS is set per node (below): with more than one Ray cluster on a host, processes that
#:   look their cluster up without an address (Ray Train's placement-group cleaner) fail with
#:   "Found multiple active Ray instances" and leak the placement groups of a killed driver.
NODE_ENV = {
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    # A job's entrypoint (`ray job submit -- python sweeps/ablation.py`) runs with the node's
    # PATH: put this interpreter's bin first, so `python` is the one with torch and Ray, also
    # when the tests were started as `.venv/bin/python -m pytest` without an activated venv.
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}


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

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's state API over HTTP (``/api/v0/<resource>``, e.g. ``nodes``, ``actors``), filtered
        by equality, with this cluster's token; no ``ray.init`` in the test process."""
        query = "detail=1&limit=1000" + "".join(
            f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        token = Path(self.auth["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/{resource}?{query}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["data"]["result"]["result"]


def own_agent_ports() -> list[str]:
    """Ports Ray would otherwise take at fixed defaults (the dashboard agent's 52365, the client
    server's 10001): with two nodes, or another cluster, on this host the second node's agent
    could not bind, and job submission then fails with "No available agent to submit job"."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]


def start_ray_head(tmp: Path, num_cpus: int = 2, extra_args: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> RayHead:
    """``ray start --head --block`` on 127.0.0.1 with token auth; ``env`` goes to every process of
    the node (Ray workers inherit it: e.g. settings the trials read)."""
    port, dash = free_port(), free_port()
    auth = auth_env(tmp)
    temp_dir = Path(f"/tmp/ray-test-{os.getpid()}-{port}")  # short: Ray's socket paths have a length limit
    log = open(tmp / f"ray-head-{port}.log", "w")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *own_agent_ports(), *extra_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
                            env=dict(os.environ, **auth, **NODE_ENV, RAY_ADDRESS=f"127.0.0.1:{port}", **(env or {})))
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


def start_ray_node(head: RayHead, tmp: Path, num_cpus: int = 1,
                   env: dict[str, str] | None = None, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """A second Ray node on this machine joining ``head`` (``ray start --address=... --block``),
    with the head's token. Returns the ``ray start`` process (stop it with
    :func:`stop_process_group`) and the new node's id, once the head lists it as alive."""
    before = {n["node_id"] for n in head.state("nodes")}
    port = head.gcs_address.rsplit(":", 1)[1]
    temp_dir = Path(f"/tmp/ray-test-{os.getpid()}-{port}-n{len(before)}")
    log = open(tmp / f"ray-node-{port}-{len(before)}.log", "w")
    cmd = [str(BIN / "ray"), "start", f"--address={head.gcs_address}", "--block", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *own_agent_ports()]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
                            env=dict(os.environ, **head.auth, **NODE_ENV, RAY_ADDRESS=head.gcs_address,
                                     **(env or {})))
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start --address exited with {proc.returncode}; see {log.name}")
            new = [n["node_id"] for n in head.state("nodes", state="ALIVE")
                   if n["node_id"] not in before and not n["is_head_node"]]
            if new:
                return proc, new[0]
            time.sleep(0.5)
        raise RuntimeError(f"the second Ray node did not join in {timeout_s:.0f} s; see {log.name}")
    except BaseException:
        stop_process_group(proc)
        raise


def one_thread():
    """Fixture body: torch on one thread for the test, then as it was (tiny models run fastest on
    one thread, and far better than on two when the CPU is shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
