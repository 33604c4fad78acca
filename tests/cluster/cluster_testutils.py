"""Processes and checks for the cluster tests: a sweep driver whose output lines carry the time they
arrived, a real MLflow tracking server that can disappear and come back, and MLflow read-backs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import BIN, ROOT, stop_process_group

from sweeps.loop import STATE_FILE, load_state

ABLATION = [sys.executable, str(ROOT / "sweeps" / "ablation.py")]

#: MLflow's HTTP client retries a refused connection itself (7 times with backoff, about two
#: minutes, by default), under our `_retry`: off, so that MLFLOW_RETRY_SECONDS alone sets how
#: long a trial waits for the server.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def sweep_args(name: str, runs: Path, cache: Path, *extra: str) -> list[str]:
    """Arguments of a smoke sweep named ``name``: options first, then every ``key=value``
    (argparse takes the overrides as one run of positionals)."""
    options = [a for a in extra if "=" not in a or a.startswith("--")]
    overrides = [a for a in extra if a not in options]
    # The fault tests time their kills against epochs of this length: pinned, whatever smoke says.
    return ["--preset", "smoke", "--name", name, "--runs-dir", str(runs), "--no-report", *options,
            f"data.cache_dir={cache}", "data.train_limit=2048", "data.eval_limit=512", *overrides]


class Driver:
    """``python sweeps/ablation.py ...`` in a session of its own; every output line is kept with the
    time it arrived (and written to ``log`` with it), so tests can wait for lines and time them."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self._file = open(log, "w")
        self.proc = subprocess.Popen([*ABLATION, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            self.lines.append((now, line.rstrip("\n")))
            self._file.write(f"{now:.3f} {line}")
            self._file.flush()

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 6000) -> str:
        return f"--- {self.log} ---\n{self.output[-n:]}"

    def wait_for(self, pattern: str, timeout_s: float, start: int = 0) -> tuple[float, re.Match, int]:
        """The first line from index ``start`` on matching ``pattern``: (arrival time, match, index)."""
        regex = re.compile(pattern)
        deadline = time.time() + timeout_s
        i = start
        while True:
            while i < len(self.lines):
                t, line = self.lines[i]
                m = regex.search(line)
                if m:
                    return t, m, i
                i += 1
            if self.proc.poll() is not None and not self._reader.is_alive() and i >= len(self.lines):
                raise AssertionError(f"the driver exited ({self.proc.returncode}) without printing "
                                     f"/{pattern}/\n{self.tail()}")
            if time.time() > deadline:
                raise AssertionError(f"no line /{pattern}/ in {timeout_s:.0f} s\n{self.tail()}")
            time.sleep(0.1)

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the sweep did not finish in {timeout_s:.0f} s\n{self.tail()}") from None
        self._reader.join(timeout=30)
        return code

    def stop(self) -> None:
        """Kill the driver and everything in its session (a no-op once it has exited)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        self._file.close()


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store and proxied artifacts, as
    ``platform/mlflow/server.env`` runs it (one worker, no job runner), that can be killed
    (SIGKILL: it disappears mid-request, as a crashed or preempted server does) and started again
    on the same port and store."""

    def __init__(self, folder: Path, port: int):
        self.folder = folder
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout_s: float = 120) -> float:
        """Start the server and wait until ``/health`` answers; returns the seconds that took."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        t0 = time.time()
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts"), "--serve-artifacts"]
        log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.folder, env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.time() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s; see {log.name}")

    def kill(self) -> None:
        """SIGKILL the server and its workers (its whole process group)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace_s=10)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (Linux: /proc/net/tcp{,6})."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state = fields[1], fields[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            if width == 8:
                found.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("::" if set(addr) == {"0"} else addr)
    return found


#: Both executors, for the tests that must hold for each (``resources.executor=``).
EXECUTORS = ("in_process", "train")

#: The Ray process that runs a trial's loop, per executor, as Ray names it in a log line's prefix
#: (``(run_trial pid=123)``) and in its state API (``class_name``).
TRIAL_PROCESS = {"in_process": ("run_trial", "ImplicitFunc"), "train": ("RayTrainWorker", "RayTrainWorker")}


def checkpoint_states(runs: Path, sweep_id: str, trial_key: str) -> list[dict]:
    """The training states of a trial's checkpoints in the runs dir, oldest first: Ray Train's
    (``ray/<sweep>/train/<key>``) or, for an in-process trial, Tune's (``ray/<sweep>/<key>``) and
    the one a rerun sweep resumed from (``ray/<sweep>/train/<key>/resumed_checkpoint``), read as a
    resuming trial reads them: ``weights_only=True``."""
    sweep = runs / "ray" / sweep_id
    files = [*(sweep / "train" / trial_key).glob(f"checkpoint_*/{STATE_FILE}"),
             *(sweep / trial_key).glob(f"checkpoint_*/{STATE_FILE}"),
             *(sweep / "train" / trial_key).glob(f"resumed_checkpoint/{STATE_FILE}")]
    return [load_state(f) for f in sorted(files, key=lambda p: p.stat().st_mtime)]


def sweep_runs(uri: str, sweep_id: str, experiment: str = "adaptive-ablation"):
    """(client, parent runs, trial runs) of a sweep."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, [], []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`sweep.id` = '{sweep_id}'",
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    return client, parents, children


def steps(client, run_id: str, metric: str) -> list[int]:
    """Every logged step of ``metric``, duplicates included, sorted."""
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def assert_every_epoch_once(client, children, epochs: int) -> None:
    """Each trial's per-epoch metrics hold steps 1..epochs, each exactly once."""
    for run in children:
        key = run.data.tags["trial.key"]
        for metric in ("epoch", "train/loss", "eval/acc", "time/elapsed_s"):
            assert steps(client, run.info.run_id, metric) == list(range(1, epochs + 1)), (key, metric)
