"""`platform/` is configuration only: the standard library's `platform` must win from the repo root."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_platform_is_stdlib_from_repo_root():
    # Run from the repository root with it first on sys.path, as pytest, `python -m` and Ray do.
    code = (
        "import sys, platform; sys.path.insert(0, '.');"
        "import importlib; p = importlib.reload(platform);"
        "assert hasattr(p, 'system') and callable(p.system), p;"
        "print(p.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert "site-packages" not in out
    assert not Path(out).resolve().is_relative_to(ROOT), f"platform resolved to the repo: {out}"


def test_platform_folder_has_no_python():
    folder = ROOT / "platform"
    if folder.exists():
        assert not list(folder.rglob("*.py")), "platform/ must hold configuration only"
        assert not (folder / "__init__.py").exists()
