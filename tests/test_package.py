"""A real package: ``python -m build`` on a clean copy of the tree (git's files only) makes an
sdist and, from it, a wheel; the wheel installs into a fresh venv (no editable install, no
repository on the path) and works there: versions, capabilities, help, vdev's native reclaim
loop (compiled into the platform wheel) loaded from the venv, and one end-to-end inflate
between the installed ``vdev serve`` and the installed ``guest-driver run``. Without a C
compiler the wheel still builds, says so, and the installed vdev falls back to its Python
loop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from conftest import missing_prerequisite

from protocol.version import package_version

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def finished(
    argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def run(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    return finished(argv, cwd=cwd, env=env, timeout=timeout).stdout


def run_both(argv: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    """:func:`run`, returning stdout and stderr together."""
    done = finished(argv, cwd=cwd, env=env)
    return done.stdout + done.stderr


def clean_env() -> dict[str, str]:
    """No PYTHONPATH, no venv of ours, no library override: what a shell on a fresh machine
    has."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV")) and k not in ("CC", "VBALLOON_PUNCH_LIB")
    }
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def clean_copy(dest: Path) -> Path:
    """The files git tracks (as in the working tree): what a clean clone has."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout (already an sdist?)")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, files):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))
    return dest


NATIVE = "vdev/native/libvbpunch.so"
NATIVE_LOADED = "import vdev.memory as m; print(m.NATIVE_PUNCH); print(m.NATIVE_PUNCH_INFO)"


def the_wheel(dist: Path, version: str) -> Path:
    """The one wheel in ``dist``: any Python 3, this platform (it carries a C library)."""
    wheels = list(dist.glob(f"vballoon-{version}-py3-none-*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    assert not wheels[0].name.endswith("-any.whl"), wheels[0].name
    return wheels[0]


def test_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        missing_prerequisite("no C compiler for vdev's native loop (scripts/setup installs gcc)")
    env = clean_env()
    src = clean_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    # sdist, then the wheel built from the unpacked sdist (proves the sdist is complete)
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], cwd=tmp_path, env=env)
    version = package_version()
    wheel = the_wheel(dist, version)
    sdist = dist / f"vballoon-{version}.tar.gz"
    assert sdist.is_file(), sorted(p.name for p in dist.iterdir())
    with tarfile.open(sdist) as tar:
        in_sdist = set(tar.getnames())
    for name in ("setup.py", "vdev/native/punch.c"):
        assert f"vballoon-{version}/{name}" in in_sdist, name
    assert not any(n.endswith(".so") for n in in_sdist)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"protocol", "vdev", "guest_driver"} <= tops
    assert not tops & {"lab", "conformance", "tests", "scripts"}, tops
    assert [n for n in names if n.startswith("vdev/native/")] == [NATIVE], names

    # a fresh venv from the base interpreter, without system site-packages
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", str(venv)], cwd=tmp_path, env=env)
    py, bindir = venv / "bin" / "python", venv / "bin"
    run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel)],
        cwd=tmp_path, env=env)  # fmt: skip

    work = tmp_path / "elsewhere"  # not the repository, not its copy
    work.mkdir()
    where = run(
        [str(py), "-c", "import vdev, guest_driver, protocol, sys;"
         "print(vdev.__file__); print(guest_driver.__file__); print(sys.path)"],
        cwd=work, env=env,
    )  # fmt: skip
    for line in where.splitlines()[:2]:
        assert line.startswith(str(venv)), where
    assert str(REPO) not in where and str(src) not in where
    # vdev's native reclaim loop, from the installed package
    native = run([str(py), "-c", NATIVE_LOADED], cwd=work, env=env).splitlines()
    assert native[0] == "True", native
    assert Path(native[1]).is_relative_to(venv) and native[1].endswith(NATIVE), native
    # lab and conformance stay in the checkout
    done = subprocess.run([str(py), "-c", "import lab"], cwd=work, env=env, capture_output=True)
    assert done.returncode != 0

    assert run([str(bindir / "vdev"), "--version"], cwd=work, env=env).split() == ["vdev", version]
    assert run([str(bindir / "guest-driver"), "--version"], cwd=work, env=env).split() == [
        "guest-driver",
        version,
    ]
    caps = json.loads(
        run([str(bindir / "vdev"), "serve", "--print-capabilities"], cwd=work, env=env)
    )
    assert set(caps) == {"type"} and caps["type"], caps
    assert "run" in run([str(bindir / "guest-driver"), "--help"], cwd=work, env=env)
    for data in (
        "prometheus/vballoon.rules.yml",
        "grafana/vballoon-dashboard.json",
        "libvirt/vballoon-domain.xml",
    ):
        assert (venv / "share" / "vballoon" / data).is_file(), data

    # end to end: the installed vdev serve and guest-driver run, a 16 MiB target
    sock = work / "vm0.sock"
    api = work / "vdev.api"
    vdev = subprocess.Popen(
        [str(bindir / "vdev"), "serve", "--socket-path", str(sock), "--api-socket", str(api),
         "--target", "16M"],
        cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(work / "vdev.log", "wb"),  # noqa: SIM115 (the child owns it)
    )  # fmt: skip
    guest = None
    try:
        deadline = time.monotonic() + 60
        while not (sock.exists() and api.exists()):
            assert vdev.poll() is None, (work / "vdev.log").read_text()
            assert time.monotonic() < deadline, "vdev serve did not listen"
            time.sleep(0.05)
        guest = subprocess.Popen(
            [str(bindir / "guest-driver"), "run", "--socket", str(sock), "--memory", "64M",
             "--poll", "0.1"],
            cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(work / "guest.log", "wb"),  # noqa: SIM115 (the child owns it)
        )  # fmt: skip
        while True:
            assert guest.poll() is None, (work / "guest.log").read_text()
            # its control socket appears once it runs; until then stat fails
            out = subprocess.run(
                [str(bindir / "guest-driver"), "stat", "--socket", str(sock)],
                cwd=work, env=env, capture_output=True, text=True, timeout=60,
            ).stdout  # fmt: skip
            if out.strip() == "16 MB":
                break
            assert time.monotonic() < deadline, f"no inflate: {out!r}"
            time.sleep(0.2)
        stat = run([str(bindir / "vdev"), "stat", "--api-socket", str(api)], cwd=work, env=env)
        assert "vm0" in stat and "16" in stat, stat
    finally:
        for proc in (guest, vdev):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert vdev.returncode == 0, (work / "vdev.log").read_text()
    assert "Traceback" not in (work / "vdev.log").read_text()
    assert "native punch library not loaded" not in (work / "vdev.log").read_text()

    # no C compiler: the wheel (from the same sdist) still builds, saying the Python loop
    # will be used; installed over the first, vdev falls back to it, saying why
    unpacked = tmp_path / "unpacked"
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    nocc = tmp_path / "dist-nocc"
    out = run_both(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(nocc),
         str(unpacked / f"vballoon-{version}")],
        cwd=tmp_path, env={**env, "CC": str(tmp_path / "no-such-cc")},
    )  # fmt: skip
    assert f"could not build {NATIVE}" in out and "slower Python loop" in out, out
    plain = the_wheel(nocc, version)
    assert not [n for n in zipfile.ZipFile(plain).namelist() if n.startswith("vdev/native/")]
    run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
         "--force-reinstall", str(plain)], cwd=tmp_path, env=env)  # fmt: skip
    native = run([str(py), "-c", NATIVE_LOADED], cwd=work, env=env).splitlines()
    assert native[0] == "False" and "reclaim loops in Python" in native[1], native
