"""The local Ray a sweep starts for itself (``connect_ray`` without a cluster) listens on 127.0.0.1
only, as docs/cluster.md states, and authenticates with a token file only its user can read.

Each test starts Ray the way ``python sweeps/ablation.py`` does (``sweeps.tune`` imported first,
then ``connect_ray``) in a child process with its own HOME, reads the socket table of that process
and every process under it (``psutil.net_connections``: TCP listeners and unconnected UDP sockets),
then stops Ray. psutil is the copy Ray ships (``ray/thirdparty_files``, on ``sys.path`` once ray
is imported).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, stop_process_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Ray's own processes that must be seen listening: the check would pass vacuously otherwise.
RAY_SERVERS = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}

#: Runs in the child: start Ray as the driver does, report its sockets (JSON on the last line).
CHILD = r"""
import json, sys, time, urllib.request, urllib.error
import sweeps.tune  # noqa: F401  (the driver has imported Ray before it connects, as main() does)
from sweeps.ablation import connect_ray
where = connect_ray()
import psutil, ray

me = psutil.Process()
wanted = set(json.loads(sys.argv[1]))

def sockets():
    procs = {p.pid: p for p in me.children(recursive=True)}
    procs[me.pid] = me
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid in procs and (c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)):
            try:
                name = procs[c.pid].name()
            except psutil.Error:
                name = "?"
            found.append({"ip": c.laddr.ip, "port": c.laddr.port, "tcp": c.type == 1, "pid": c.pid, "name": name})
    return found

# The agents start after ray.init returns: wait until every Ray server is listening, then a little.
deadline = time.time() + 90
while not wanted <= {s["name"] for s in sockets()} and time.time() < deadline:
    time.sleep(0.5)
time.sleep(2)
found = sockets()
# What answers plain HTTP without a token (gRPC ports do not speak it).
for s in found:
    if s["tcp"]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s['port']}/", timeout=3) as r:
                s["http"] = r.status
        except urllib.error.HTTPError as e:
            s["http"] = e.code
        except Exception:
            s["http"] = None
metrics = [n["MetricsExportPort"] for n in ray.nodes()]
ray.shutdown()
print(json.dumps({"where": where, "sockets": found, "metrics_ports": metrics}))
"""


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def _start_local_ray(home: Path, **env: str) -> dict:
    """connect_ray() in a child process with HOME=home; its report."""
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("RAY_", "ABLATION_RAY_")) and k != "RAY_JOB_CONFIG_JSON_ENV_VAR"}
    child_env.update(HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
                     **env)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(sorted(RAY_SERVERS))], cwd=ROOT,
                            env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        stop_process_group(proc, grace_s=10)
    assert proc.returncode == 0, err[-4000:]
    report = json.loads(out.strip().splitlines()[-1])
    report["stderr"] = err
    seen = {s["name"] for s in report["sockets"]}
    assert RAY_SERVERS <= seen, f"Ray servers not seen listening: {RAY_SERVERS - seen}\n{err[-3000:]}"
    return report


def _documented_local_address() -> str:
    """What docs/cluster.md's network-exposure table says a local sweep's Ray listens on."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| Ray, local sweep")]
    return re.match(r"`([^`]+)`", row.split("|")[2].strip()).group(1)


def test_local_ray_listens_on_loopback_only_and_its_new_token_is_private(tmp_path):
    report = _start_local_ray(tmp_path)
    exposed = [s for s in report["sockets"] if not _is_loopback(s["ip"])]
    assert not exposed, f"listening beyond the loopback interface: {exposed}"
    assert _documented_local_address() == "127.0.0.1"
    assert "listening on 127.0.0.1 only" in report["where"], report["where"]
    # The only endpoint that answers without the token is Ray's metrics exporter, on loopback.
    open_http = {s["port"] for s in report["sockets"] if s.get("http") == 200}
    assert open_http <= set(report["metrics_ports"]), report["sockets"]
    assert any(s.get("http") == 401 for s in report["sockets"]), "no endpoint asked for the token"
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert str(token) in report["where"]


def test_all_interfaces_on_request_and_a_readable_token_is_made_private(tmp_path):
    """ABLATION_RAY_LISTEN=all gives Ray's default back: the same socket check then sees ports on
    other interfaces (so the check above can fail). A token file others can read is set to 0600."""
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("f" * 64)
    token.chmod(0o644)
    report = _start_local_ray(tmp_path, ABLATION_RAY_LISTEN="all")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text() == "f" * 64, "the user's token was replaced"
    assert "readable by other users (mode 644); set it to 600" in report["stderr"]
    assert "listening on all interfaces" in report["where"], report["where"]
    routable = re.search(r"all interfaces \(([^)]+)\)", report["where"]).group(1)
    if _is_loopback(routable):
        pytest.skip("this host has no routable address: Ray's default is loopback here too")
    exposed = {s["name"] for s in report["sockets"] if not _is_loopback(s["ip"])}
    assert {"gcs_server", "raylet"} <= exposed, report["sockets"]


def test_a_bad_listen_setting_is_refused_naming_the_variable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from sweeps.ablation import connect_ray; connect_ray()"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                               "HOME": str(tmp_path), "ABLATION_RAY_LISTEN": "everywhere", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "error: ABLATION_RAY_LISTEN='everywhere': expected one of loopback, all" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".ray").exists(), "nothing is started or written for a refused setting"
