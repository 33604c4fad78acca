"""platform/mlflow/server.env: the MLflow server's settings are ones MLflow reads, keep it small and on
127.0.0.1 by default, name a PostgreSQL backend and an S3 artifact store, hold no secret, and the
host-header check admits the names clients use and nothing else."""

from __future__ import annotations

import pytest
from cluster_files import PLATFORM, read_env_file

SERVER_ENV = PLATFORM / "mlflow" / "server.env"


@pytest.fixture(scope="module")
def settings() -> dict[str, str]:
    return read_env_file(SERVER_ENV)


def _server_envvars() -> set[str]:
    """Every environment variable `mlflow server` reads as an option, plus MLflow's own settings."""
    import mlflow.environment_variables as mlflow_env
    from mlflow.cli import server

    names = {p.envvar for p in server.params if isinstance(p.envvar, str)}
    names |= {getattr(mlflow_env, n).name for n in dir(mlflow_env) if n.startswith("MLFLOW_")}
    return names


def test_every_mlflow_setting_is_one_mlflow_reads(settings):
    known = _server_envvars()
    unknown = {k for k in settings if k.startswith("MLFLOW_")} - known
    assert not unknown, f"MLflow does not read {sorted(unknown)}"
    # The rest are for boto3 (the artifact store client).
    assert {k for k in settings if not k.startswith("MLFLOW_")} <= {"AWS_DEFAULT_REGION"}


def test_small_and_local_by_default(settings):
    assert settings["MLFLOW_HOST"] == "127.0.0.1"
    assert settings["MLFLOW_PORT"] == "5000"
    assert settings["MLFLOW_WORKERS"] == "1"
    assert settings["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_backend_store_and_artifact_store(settings):
    assert settings["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert settings["MLFLOW_SERVE_ARTIFACTS"] == "true", "clients upload through the server"
    assert settings["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


def test_no_secrets(settings):
    for key in settings:
        assert not any(word in key for word in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")), key
    uri = settings["MLFLOW_BACKEND_STORE_URI"]
    userinfo = uri.split("://", 1)[1].split("@", 1)[0]
    assert ":" not in userinfo, "the store URI carries a password; libpq reads PGPASSWORD instead"


def test_allowed_hosts_admit_the_clients_names_only(settings):
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = settings["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "*" not in allowed
    for host in ("localhost:5000", "127.0.0.1:5000", "mlflow:5000", "mlflow.ml.svc.cluster.local:5000"):
        assert is_allowed_host_header(allowed, host), host
    for host in ("attacker.example.com", "attacker.example.com:5000", "mlflow.attacker.example.com:5000"):
        assert not is_allowed_host_header(allowed, host), host
