"""scripts/run-qemu: the command line it prints, and that it really attaches vdev."""

from __future__ import annotations

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
