"""The layering contracts (pyproject.toml's ``[tool.importlinter]``, the ``imports`` step of
``scripts/test``): the tree keeps them, and the check fails when a forbidden import comes
back (run on a copy of the tree with one bad import added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "vdev", "guest_driver", "conformance", "lab")
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's packages, not the installed ones
    return subprocess.run(
        [str(LINT), "--no-cache", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_tree_keeps_the_contracts() -> None:
    done = lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("module", "bad_import", "broken"),
    [
        ("guest_driver/virtq.py", "import vdev.virtq", "guest_driver imports only protocol"),
        ("guest_driver/driver.py", "from lab import procfs", "guest_driver imports only protocol"),
        # indirect: lab.vdev_process imports vdev
        ("conformance/runner.py", "import lab.vdev_process", "conformance never imports vdev"),
        ("protocol/vmw.py", "from guest_driver import virtq", "protocol imports nothing of ours"),
        ("vdev/balloon.py", "import conformance.cases", "vdev never imports the guest"),
    ],
)
def test_a_forbidden_import_breaks_the_check(
    tree_copy: Path, module: str, bad_import: str, broken: str
) -> None:
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{bad_import}  # a violation\n")
    done = lint(tree_copy)
    assert done.returncode != 0, done.stdout
    assert "0 broken" not in done.stdout, done.stdout
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith(broken))
    assert line.endswith("BROKEN"), done.stdout
