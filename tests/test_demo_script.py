"""``scripts/demo --help`` works before scripts/setup has made ``.venv`` (and runs no set-up)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo"


def test_help_without_a_venv(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "demo")
    setup = tmp_path / "scripts" / "setup"
    setup.write_text('#!/bin/sh\ntouch "$(dirname "$0")/../setup-ran"\n')
    setup.chmod(0o755)
    for flag in ("--help", "-h"):
        done = subprocess.run(
            [str(tmp_path / "scripts" / "demo"), "--quick", flag],
            capture_output=True, text=True, timeout=30, cwd="/",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "scripts/demo [--act N]... [--quick] [--out DIR] [--qtest]" in done.stdout
        assert "scripts/setup has not run yet" in done.stdout
        assert not (tmp_path / "setup-ran").exists()


def test_help_with_the_venv() -> None:
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: scripts/demo")
