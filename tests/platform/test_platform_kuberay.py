"""platform/kuberay and platform/mlflow on Kubernetes: KubeRay RayCluster and RayJob for the pinned Ray
with a GPU worker group, the ablation entrypoint, an RWX volume on every pod at the same path, the
MLflow Deployment behind a ClusterIP Service, non-root pods."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from cluster_files import (
    CLUSTER_COMMAND,
    PLATFORM,
    RUNS_DIR,
    SHARED_MOUNT,
    load_yaml,
    load_yaml_all,
    ray_version,
    read_env_file,
    split_image,
    tool,
    yaml_files,
)

KUBERAY = PLATFORM / "kuberay"
MLFLOW = PLATFORM / "mlflow"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_yaml(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def job() -> dict:
    return load_yaml(KUBERAY / "rayjob.yaml")


def _pods(spec: dict) -> dict[str, dict]:
    """{group name: pod spec} of a RayCluster spec, the head as 'head'."""
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_kinds_and_api_versions(cluster, job):
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for doc in (cluster, job):
        assert doc["metadata"]["name"]


def test_ray_version_is_the_pinned_one(cluster, job):
    assert cluster["spec"]["rayVersion"] == ray_version()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_version()


def test_rayjob_brings_up_the_same_cluster_as_raycluster(cluster, job):
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_head_and_gpu_worker_group(cluster):
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs the driver, no trials"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        # The paper preset: 8 CPUs per trial worker, plus the trial's own driver.
        assert int(resources["limits"]["cpu"]) > 8


def test_every_pod_mounts_the_shared_claim_at_the_same_path(cluster):
    claim = load_yaml(KUBERAY / "shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for group, pod in _pods(cluster["spec"]).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get(SHARED_MOUNT), f"{group}: nothing mounted at {SHARED_MOUNT}"
        volume = volumes[mounts[SHARED_MOUNT]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], group
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{group}: /dev/shm"
        env = _env(container)
        assert env["ABLATION_RUNS_DIR"] == RUNS_DIR, group
        assert env["MLFLOW_TRACKING_URI"] == _mlflow_service_url(), group


def test_pods_run_as_non_root(cluster):
    for group, pod in _pods(cluster["spec"]).items():
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, group
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, group


def test_all_pods_use_one_image(cluster):
    images = {pod["containers"][0]["image"] for pod in _pods(cluster["spec"]).values()}
    assert len(images) == 1, images
    (image,) = images
    assert split_image(image)[1].split("-")[-1].startswith("cu"), f"GPU workers need the CUDA image: {image}"


def test_rayjob_entrypoint_is_the_cluster_command(job):
    spec = job["spec"]
    entrypoint = " ".join(spec["entrypoint"].split())
    assert entrypoint == CLUSTER_COMMAND or entrypoint.startswith(CLUSTER_COMMAND + " "), entrypoint
    # The paper preset's required paths point into the shared volume.
    extra = entrypoint[len(CLUSTER_COMMAND):].split()
    assert all("=" in arg for arg in extra), extra
    assert all(arg.split("=", 1)[1].startswith(SHARED_MOUNT + "/") for arg in extra), extra
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1, "a resubmitted sweep resumes; allow retries"


def test_rayjob_runtime_env_matches_the_runtime_env_file(job):
    in_job = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shared = load_yaml(PLATFORM / "runtime_env.yaml")
    # Submitted from a checkout, the working dir is the checkout; in the job, the image's copy.
    assert shared.pop("working_dir") == "."
    assert in_job.pop("working_dir") == "/home/ray/app"
    assert in_job == shared


def test_runtime_env_file(job):
    env = load_yaml(PLATFORM / "runtime_env.yaml")
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules", "config"}
    assert {".git/", ".venv/", "runs/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"
    # Cluster-specific settings belong to the nodes, not to the job.
    assert not {"ABLATION_RUNS_DIR", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"} & set(env["env_vars"])


def _mlflow_service_url() -> str:
    docs = load_yaml_all(MLFLOW / "kubernetes.yaml")
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    return f"http://{service['metadata']['name']}:{port['port']}"


def test_mlflow_deployment_and_service():
    docs = {d["kind"]: d for d in load_yaml_all(MLFLOW / "kubernetes.yaml")}
    assert set(docs) == {"Deployment", "Service"}
    service, deployment = docs["Service"], docs["Deployment"]
    assert service["spec"]["type"] == "ClusterIP"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False, "Service links would inject MLFLOW_PORT=tcp://..."
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    sources = [next(iter(s.values()))["name"] for s in container["envFrom"]]
    assert "mlflow-server" in sources
    env = _env(container)
    assert env == {"MLFLOW_HOST": "0.0.0.0"}, "only the listen address differs from server.env"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["ports"][0]["containerPort"] == int(read_env_file(MLFLOW / "server.env")["MLFLOW_PORT"])
    kustomization = load_yaml(MLFLOW / "kustomization.yaml")
    assert kustomization["configMapGenerator"] == [
        {"name": "mlflow-server", "envs": ["server.env"]},
        {"name": "mlflow-auth", "files": ["basic_auth.ini"]},
    ]
    assert kustomization["resources"] == ["kubernetes.yaml"]


def test_no_service_is_exposed_outside_the_cluster():
    for path in yaml_files():
        for doc in load_yaml_all(path):
            if isinstance(doc, dict) and doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
            if isinstance(doc, dict) and doc.get("kind") in ("RayCluster", "RayJob"):
                spec = doc["spec"].get("rayClusterSpec", doc["spec"])
                assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path


def test_kustomize_builds_the_mlflow_config_map():
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; `kubectl kustomize` renders offline")
    proc = subprocess.run([kubectl, "kustomize", str(MLFLOW)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    maps = {d["metadata"]["name"].rsplit("-", 1)[0]: d for d in docs if d["kind"] == "ConfigMap"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    config = maps["mlflow-server"]
    assert config["data"] == read_env_file(MLFLOW / "server.env")
    assert maps["mlflow-auth"]["data"] == {"basic_auth.ini": (MLFLOW / "basic_auth.ini").read_text()}
    # The Deployment refers to the generated (hashed) names.
    pod = deployment["spec"]["template"]["spec"]
    refs = [s["configMapRef"]["name"] for s in pod["containers"][0]["envFrom"] if "configMapRef" in s]
    assert refs == [config["metadata"]["name"]]
    volumes = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    assert volumes == [maps["mlflow-auth"]["metadata"]["name"]]
