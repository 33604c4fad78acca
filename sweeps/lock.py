"""One driver per sweep: a lock file in the runs dir naming its holder.

Two drivers on one sweep race on everything a sweep owns (its Tune experiment, its checkpoint
folders, its MLflow runs): the second re-runs trials in the first one's folders. The lock is
``<runs dir>/sweeps/<sweep>.lock``, created with ``O_EXCL`` (atomic on local and on the usual
shared filesystems, also across hosts) and holding the holder's host, PID, process start time and
command line. While it holds the lock, the driver touches the file every ``lease_s / 6`` seconds
(a heartbeat). A lock whose holder is gone is *stale* and is taken over:

* on the holder's own host when its PID is gone (or belongs to a newer process: PID reuse);
* from another host (a resubmitted RayJob's new head pod, say) when the file's modification time
  stays unchanged for ``lease_s`` seconds of watching. Only the change is compared, on this host's
  clock, so clocks that disagree between hosts do not matter.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeps.config import ConfigError


class SweepLocked(ConfigError):
    """Another driver holds the sweep's lock; the message names it."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = text[text.rindex(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    """Whether process ``pid`` on this host exists and is the one that started at ``ticks``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


def holder_text(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"PID {holder.get('pid')} on host {holder.get('host')} (since {started})"


@dataclass
class SweepLock:
    """The lock of sweep ``sweep_id`` in ``runs_dir``; use as a context manager or acquire/release.

    Attributes:
        path: The lock file.
        stale: After :meth:`acquire`: the holder of a stale lock this driver took over (a driver
            that died without releasing it), else ``None``.
    """

    runs_dir: Path
    sweep_id: str
    #: Heartbeat period x 6; how long a lock from another host must stay untouched to be stale.
    lease_s: float = field(default_factory=lambda: float(os.environ.get("ABLATION_LOCK_LEASE_S", "60")))
    stale: dict[str, Any] | None = None
    _held: bool = field(default=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.runs_dir) / "sweeps" / f"{self.sweep_id}.lock"

    def acquire(self) -> SweepLock:
        """Take the lock, or raise :class:`SweepLocked` naming the driver that holds it."""
        from tasks.store import file_lock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
              "started": time.time(), "argv": sys.argv}
        # Drivers on this host take over a stale lock one at a time (the O_EXCL create alone keeps
        # drivers on different hosts apart: a stale lock is only ever judged on its own host).
        with file_lock(self.path.with_name(self.path.name + ".guard")):
            for _ in range(2):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    holder = self._read()
                    if holder is not None and not self._is_stale(holder):
                        raise SweepLocked(self._message(holder)) from None
                    self.stale = holder or {"host": "?", "pid": "?", "note": "unreadable lock file"}
                    self.path.unlink(missing_ok=True)
                    continue
                with os.fdopen(fd, "w") as fh:
                    json.dump(me, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                self._held = True
                self._stop.clear()
                threading.Thread(target=self._heartbeat, name="sweep-lock-heartbeat", daemon=True).start()
                return self
        raise SweepLocked(f"could not take the lock {self.path} (another driver took it over at the same time)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 6):
            try:
                os.utime(self.path)
            except OSError:
                return  # removed by hand: nothing left to keep alive

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        self._stop.set()
        if self._held:
            holder = self._read()
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> SweepLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return self._untouched_for_a_lease()
        try:
            pid = int(holder["pid"])
        except (KeyError, TypeError, ValueError):
            return True
        return not _alive(pid, holder.get("start_ticks"))

    def _untouched_for_a_lease(self) -> bool:
        """Watch the lock of a holder on another host: stale if its heartbeat stops for a lease."""
        try:
            seen = self.path.stat().st_mtime_ns
        except OSError:
            return True
        print(f"the lock {self.path} is held from another host; watching its heartbeat for up to "
              f"{self.lease_s:.0f} s", file=sys.stderr, flush=True)
        deadline = time.monotonic() + self.lease_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.lease_s / 10))
            try:
                if self.path.stat().st_mtime_ns != seen:
                    return False  # its driver is alive
            except OSError:
                return True
        return True

    def _message(self, holder: dict[str, Any]) -> str:
        where = holder_text(holder)
        elsewhere = holder.get("host") != socket.gethostname()
        hint = ("Its heartbeat is alive: wait for it to finish or stop it there."
                if elsewhere else "Wait for it to finish or stop it (Ctrl-C), then rerun to resume.")
        return (f"sweep '{self.sweep_id}' in {self.runs_dir} is being run by another driver: {where}, "
                f"command: {' '.join(map(str, holder.get('argv', [])))[:300]}. {hint} "
                "To run another sweep at the same time, give it another --name.")
