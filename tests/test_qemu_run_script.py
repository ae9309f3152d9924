"""scripts/run-qemu: the command line it prints, and that it really attaches vdev."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import trio
from conftest import missing_prerequisite

from lab import qemu
from lab.qemu import write_hlt_bios
from lab.transport_qtest import vdev_rig

pytestmark = pytest.mark.qemu

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "run-qemu"


def any_qemu() -> qemu.QemuBinary:
    q = qemu.best_qemu(need_test_device=False)
    if q is None:
        missing_prerequisite("no QEMU (run scripts/setup)")
    return q


@pytest.mark.parametrize("device", ["virtio-balloon", "vmw"])
def test_dry_run_command_line(device: str, tmp_path: Path) -> None:
    any_qemu()
    out = subprocess.run(
        [str(SCRIPT), "--dry-run", "--device", device, "--spawn-vdev", "--", "-kernel", "K"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    line = out.stdout.strip().splitlines()[-1]
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in line
    assert "-numa node,memdev=mem" in line and "-chardev socket,id=c0,path=" in line
    assert line.endswith("-kernel K")
    vb = qemu.best_qemu(need_test_device=True)
    if device == "virtio-balloon" and vb is not None:
        assert "vhost-user-test-device-pci,chardev=c0,virtio-id=5,num_vqs=3,config_size=8" in line
    else:
        assert "vhost-user-gpio-pci,chardev=c0" in line


@pytest.mark.parametrize("device", ["virtio-balloon", "vmw"])
async def test_run_qemu_attaches_to_vdev(device: str) -> None:
    q = qemu.best_qemu(need_test_device=device == "virtio-balloon") or any_qemu()
    with trio.fail_after(30):
        async with vdev_rig(device, q) as rig:
            bios = write_hlt_bios(rig.scratch / "hlt.bin")
            argv = [str(SCRIPT), "--device", device, "--qemu", q.name, "--ram", "256",
                    "--socket", str(rig.socket_path), "--", "-bios", q.host_path(bios)]  # fmt: skip
            async with trio.open_nursery() as n:
                proc: trio.Process = await n.start(
                    lambda task_status: trio.run_process(
                        argv, stdout=subprocess.PIPE, check=False, task_status=task_status
                    )
                )
                try:
                    while not rig.view().connected:  # QEMU's realize did the handshake
                        await trio.sleep(0.02)
                finally:
                    proc.terminate()  # run-qemu exec'd QEMU: this is QEMU's pid
            assert proc.returncode is not None


async def test_spawn_vdev_starts_and_stops_it(tmp_path: Path) -> None:
    """``--spawn-vdev``: vdev (through lab.vdev_process) listens before QEMU starts,
    QEMU attaches to it, and a SIGTERM to run-qemu stops QEMU, then vdev, and removes the
    scratch socket directory."""
    import re
    import signal

    from vdev.api.client import ApiClient

    q = next((x for x in qemu.find_qemus() if x.root is None), None)  # paths as they are
    if q is None:
        missing_prerequisite("no host QEMU")
    bios = write_hlt_bios(tmp_path / "hlt.bin")
    argv = [str(SCRIPT), "--device", "vmw", "--qemu", q.name, "--ram", "256", "--spawn-vdev",
            "--", "-bios", q.host_path(bios)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(30):
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            m = re.search(r"-chardev socket,id=c0,path=(\S+)", line)
            assert m, line
            sock = Path(m.group(1))
            api = f"{sock}.api"

            def connected() -> bool:
                try:
                    with ApiClient(api) as c:
                        return bool(c.vm("vm0")["connected"])
                except Exception:
                    return False

            while not await trio.to_thread.run_sync(connected):  # QEMU did the handshake
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                await trio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _out, err = await trio.to_thread.run_sync(proc.communicate)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "run-qemu: " in err and " serve --device vmw --socket-path " in err
    assert "Traceback" not in err
    assert not sock.parent.exists()  # vdev stopped (its sockets gone), scratch dir removed


FAKE_QEMU_RUNNER = """
import sys, types
from pathlib import Path
import lab.linux_image as li
import lab.linux_guest as lg
from lab.qemu import require_qemu

pidfile, kernel, initrd = sys.argv[1:4]
fake = [sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid()));"
        " time.sleep(120)", pidfile, "-serial", "stdio"]
li.guest_argv = lambda *a, **k: list(fake)  # a QEMU that starts at once and waits
image = types.SimpleNamespace(kernel=Path(kernel), initrd=Path(initrd))
sys.exit(lg.interactive(require_qemu(need_test_device=True), image, ram_mib=256, target="0",
                        append="", vdev_log=None, keep=False))
"""


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_linux_launcher_cleans_up_on_sigterm(tmp_path: Path) -> None:
    """``scripts/run-qemu --linux`` (lab.linux_guest.interactive), a fake QEMU standing in for
    the guest: SIGTERM stops QEMU, then vdev, and removes the scratch directory, as Ctrl-A x
    does (the default action left both running and the directory behind)."""
    import os
    import shutil
    import signal
    import sys
    import time

    if qemu.best_qemu(need_test_device=True) is None:
        missing_prerequisite("no QEMU with vhost-user-test-device-pci (run scripts/setup)")
    pidfile = tmp_path / "qemu.pid"
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_QEMU_RUNNER, str(pidfile), str(tmp_path / "vmlinuz"),
         str(tmp_path / "initrd")],
        cwd=SCRIPT.parent.parent, stderr=(tmp_path / "stderr").open("w"),
    )  # fmt: skip
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "fake QEMU never started"
            time.sleep(0.05)
        pids.append(int(pidfile.read_text()))
        err = (tmp_path / "stderr").read_text()  # vdev listened before QEMU was started
        m = re.search(r"vdev serve \(pid (\d+)\) on (\S+),", err)
        assert m, err
        pids.append(int(m[1]))
        scratch = Path(m[2]).parent
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        err = (tmp_path / "stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.returncode != 128 + signal.SIGTERM:
            shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert not any(_alive(pid) for pid in pids), "QEMU or vdev left running"
    assert not scratch.exists()


def test_linux_dry_run_leaves_nothing_and_checks_options() -> None:
    """``--linux`` anywhere before ``--`` (with --spawn-vdev, which it implies); --dry-run
    removes what it staged; bad --ram and --target are usage errors before anything runs."""
    if qemu.best_qemu(need_test_device=True) is None:
        missing_prerequisite("no QEMU with vhost-user-test-device-pci (run scripts/setup)")
    out = subprocess.run(
        [str(SCRIPT), "--spawn-vdev", "--dry-run", "--linux"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    qemu_line = out.stdout.splitlines()[1]
    assert "--linux" not in qemu_line and "-kernel" in qemu_line
    m = re.search(r"files staged in (\S+), removed", out.stdout)
    assert m, out.stdout
    assert not Path(m[1]).exists()
    for args, option in (
        (["--ram", "0", "--dry-run", "--spawn-vdev"], "'--ram'"),
        (["--target", "lots", "--dry-run", "--spawn-vdev"], "'--target'"),
        (["--linux", "--ram", "0", "--dry-run"], "'--ram'"),
        (["--dry-run", "--linux", "--target", "lots"], "'--target'"),
        (["--linux", "--interval", "0", "--dry-run"], "'--interval'"),
    ):
        bad = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and option in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr


def test_help_explains_every_option() -> None:
    out = subprocess.run([str(SCRIPT), "-h"], capture_output=True, text=True, timeout=60).stdout
    assert "--linux" in out
    for option in ("--device", "--socket", "--spawn-vdev", "--target", "--ram", "--qemu",
                   "--accel", "--dry-run"):  # fmt: skip
        line = next(x for x in out.splitlines() if x.strip().startswith(option))
        assert len(line.split(None, 2)) == 3 or option == "--spawn-vdev", line
