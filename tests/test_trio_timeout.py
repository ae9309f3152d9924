"""pytest-timeout in a trio test (tests/conftest.py, ``TrioTimeout``): the test is cancelled,
its ``finally`` blocks run (the processes it started are stopped), it fails saying it timed
out, and the next trio test runs normally (no "run() from inside a run()")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO_ROOT = Path(__file__).resolve().parent.parent

HANGING = """
import subprocess
import sys

import pytest
import trio


@pytest.mark.timeout(2)
async def test_hangs(tmp_path_factory):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open("child.pid", "w") as f:
        f.write(str(child.pid))
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.sleep(0.05)  # a trio checkpoint works in the cleanup
        child.kill()
        child.wait()
        open("cleaned", "w").close()


async def test_next():
    await trio.sleep(0.01)
"""


def test_timeout_cancels_a_trio_test_and_spares_the_next(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makeconftest("from tests.conftest import *  # noqa: F403\n")
    pytester.makepyfile(test_hang=HANGING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=120)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Timeout: the test ran more than 2* s (pytest-timeout)*"])
    assert "run() from inside a run()" not in result.stdout.str()
    assert (pytester.path / "cleaned").exists(), "the test's finally did not run"
    pid = int((pytester.path / "child.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
