"""Every documented way to run the sweep on a cluster is the README's cluster command
(`CLUSTER_COMMAND`), followed only by optional arguments: in the RayJob, the launcher, the
runtime_env and compose headers, the guide and the README."""

from __future__ import annotations

import re

from cluster_files import CLUSTER_COMMAND, DOCKER, GUIDE, PLATFORM, ROOT, load_yaml

#: Where the cluster command is documented (the README once it links the guide).
DOCUMENTED = [
    PLATFORM / "kuberay" / "rayjob.yaml",
    PLATFORM / "kuberay" / "raycluster.yaml",
    PLATFORM / "ray" / "cluster-gpu.yaml",
    PLATFORM / "runtime_env.yaml",
    GUIDE,
]
OPTIONAL_ARG = re.compile(r"^(--[a-z][a-z-]*(=\S+)?|[a-z_]+(\.[a-z_]+)+=\S+|\.\.\.)$")  # option, key=value, or "..."


def _commands(text: str) -> list[str]:
    """Each `... sweeps/ablation.py ...` invocation, with comment markers and line continuations
    removed and whitespace normalised."""
    text = re.sub(r"\\\n\s*#?", " ", text)  # join continued lines (also inside # comments)
    found = []
    for line in text.splitlines():
        start = line.find("python sweeps/ablation.py")
        if start < 0 and "sweeps/ablation.py" in line:
            found.append(line.strip())  # a mention without `python `: reported by the test
            continue
        if start >= 0:
            found.append(" ".join(line[start:].split("`")[0].split()))  # ends at inline code's end
    return found


def _check(command: str, where: str) -> None:
    assert command == CLUSTER_COMMAND or command.startswith(CLUSTER_COMMAND + " "), (
        f"{where}: {command!r} is not {CLUSTER_COMMAND!r} followed by optional arguments"
    )
    for arg in command[len(CLUSTER_COMMAND):].split():
        assert OPTIONAL_ARG.match(arg), f"{where}: odd argument {arg!r} in {command!r}"


def test_the_rayjob_entrypoint_is_the_cluster_command():
    entrypoint = " ".join(load_yaml(PLATFORM / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"].split())
    _check(entrypoint, "rayjob.yaml entrypoint")


def test_documented_cluster_commands_are_the_cluster_command():
    for path in DOCUMENTED:
        commands = [c for c in _commands(path.read_text()) if "--preset paper" in c or "python" not in c]
        assert commands, f"{path.relative_to(ROOT)} does not document the cluster command"
        for command in commands:
            _check(command, str(path.relative_to(ROOT)))


def test_readme_cluster_command_if_any():
    """The README links docs/cluster.md; whatever cluster command it shows must be the same one."""
    readme = (ROOT / "README.md").read_text()
    for command in _commands(readme):
        if "--preset paper" in command:
            _check(command, "README.md")


def test_compose_header_submits_the_same_script():
    # The local cluster runs a smaller preset, but the same script and submission path.
    commands = _commands((DOCKER / "compose.yaml").read_text())
    assert any(c.startswith("python sweeps/ablation.py --preset ") for c in commands), commands
