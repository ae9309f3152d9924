"""libvirt: the operator's domain template validates, and a libvirt-defined Linux guest whose
balloon is vdev inflates through vdev (Debian 13's libvirtd in the root scripts/setup builds,
QEMU 11.1 from that root, TCG)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import trio
from conftest import missing_prerequisite
from observability_series import missing_series

from lab import linux_image
from lab.libvirt import (
    TEMPLATE,
    LibvirtRoot,
    lab_domain_xml,
    stage_boot_files,
    template_device_arg,
)
from lab.linux_guest import CHARDEV_ID, balloon_device_arg
from lab.linux_image import PREFIX, ProvisionError
from lab.vdev_process import REPO_ROOT, open_vdev

pytestmark = [pytest.mark.qemu, pytest.mark.linux_guest]

PAGES_PER_MIB = 256


def libvirt_root() -> LibvirtRoot:
    root = LibvirtRoot()
    if os.geteuid() != 0:
        missing_prerequisite("libvirtd in its root needs root (mounts, chroot)")
    if not root.present():
        missing_prerequisite(f"no libvirt root at {root.root} (scripts/setup builds it)")
    return root


def test_template_matches_vdev() -> None:
    """The template's device is exactly what vdev's virtio-balloon personality serves (queue
    count, config size), as lab's own QEMU command line has it."""
    assert (
        template_device_arg()
        == balloon_device_arg(CHARDEV_ID).replace(f"chardev={CHARDEV_ID}", "chardev=vballoon0")
        + ",bus=pcie.0,addr=0x10"
    )
    text = TEMPLATE.read_text()
    assert "<memballoon model='none'/>" in text
    assert "<source type='memfd'/>" in text and "<access mode='shared'/>" in text


def test_template_validates() -> None:
    root = libvirt_root()
    with tempfile.TemporaryDirectory(dir=root.path("/tmp")) as d:
        xml = Path(d) / "template.xml"
        shutil.copyfile(TEMPLATE, xml)
        done = root.validate(xml)
        assert done.ok and "validates" in done.stdout + done.stderr, done.stdout + done.stderr
        # and a broken one does not (the validator really validates)
        xml.write_text(TEMPLATE.read_text().replace("<memballoon model='none'/>", "<memballoon/>"))
        assert not root.validate(xml).ok


def _inflated(serial: Path) -> int:
    """The guest's latest ``balloon_inflate - balloon_deflate`` (pages) from its reports."""
    best = -1
    try:
        text = serial.read_text(errors="replace")
    except OSError:
        return best
    for m in re.finditer(rf"^{PREFIX} vmstat (.*)$", text, re.M):
        kv = dict(p.split("=", 1) for p in m[1].split() if "=" in p)
        best = int(kv.get("balloon_inflate", 0)) - int(kv.get("balloon_deflate", 0))
    return best


async def test_libvirt_guest_inflates_through_vdev(tmp_path: Path) -> None:
    root = libvirt_root()
    try:
        image = linux_image.build()
    except ProvisionError as e:
        missing_prerequisite(f"the Linux guest image could not be provisioned here: {e}")
    name = f"vbt{os.getpid()}"
    scratch = Path(tempfile.mkdtemp(prefix="vbl-", dir=root.path("/tmp")))
    sock = scratch / f"{name}.sock"  # /run/vdev/DOMAIN.sock in production
    api_sock = tmp_path / "vdev.api"
    serial = scratch / f"{name}.serial"
    try:
        kernel, initrd = stage_boot_files(
            root, [image.kernel, image.initrd], f"/var/lib/libvirt/boot/{name}"
        )
        xml = scratch / f"{name}.xml"
        xml.write_text(
            lab_domain_xml(
                name=name, memory_mib=256, vdev_socket=root.inside(sock), kernel=kernel,
                initrd=initrd, cmdline="console=ttyS0 quiet panic=-1 vb.interval=1",
                serial_log=root.inside(serial),
            )
        )  # fmt: skip
        done = root.validate(xml)
        assert done.ok, done.stdout + done.stderr
        with trio.fail_after(240):
            async with open_vdev(
                sock, api_socket=api_sock, device="virtio-balloon", log_path=tmp_path / "vdev.log",
                extra=("--name-from-socket", "--host-memory", "64G", "--stats-interval", "1"),
            ) as vdev:  # fmt: skip
                with root.session(tmp_path / "libvirtd.log") as lv:
                    assert lv.define(xml) == name
                    lv.virsh("start", name)
                    async with httpx.AsyncClient(
                        transport=httpx.AsyncHTTPTransport(uds=str(api_sock)),
                        base_url="http://vdev",
                    ) as api:
                        # the guest's virtio_balloon driver bound to vdev, under the
                        # domain's name
                        while True:
                            vms = (await api.get("/vms")).json()["vms"]
                            assert [v["name"] for v in vms] == [name]
                            if vms[0]["driver_active"]:
                                break
                            await trio.sleep(0.2)
                        while f"{PREFIX} ready" not in serial.read_text(errors="replace"):
                            await trio.sleep(0.2)

                        # virsh setmem: no balloon device in the domain, so libvirt refuses
                        setmem = lv.virsh("setmem", name, "131072", check=False)
                        assert not setmem.ok
                        assert "without the balloon device" in setmem.stderr, setmem.stderr

                        # vdev is the balloon: vdev set-target inflates the libvirt guest
                        t0 = time.monotonic()
                        out = await trio.run_process(
                            [sys.executable, "-m", "vdev", "set-target", name, "64M",
                             "--api-socket", str(api_sock)],
                            capture_stdout=True, capture_stderr=True, cwd=REPO_ROOT,
                        )  # fmt: skip
                        assert out.returncode == 0
                        while _inflated(serial) < 64 * PAGES_PER_MIB:
                            await trio.sleep(0.2)
                        took = time.monotonic() - t0
                        vm = (await api.get(f"/vms/{name}")).json()
                        assert vm["size_pages"] == 64 * PAGES_PER_MIB
                        assert vm["reclaimed_bytes_total"] >= 64 << 20

                        # guest statistics arrive (stats queue), under the domain's name;
                        # every series the rules and the dashboard read exists now
                        while "stat-oom-kills" not in (await api.get(f"/vms/{name}")).json().get(
                            "guest_stats", {}
                        ):
                            await trio.sleep(0.2)
                        text = (await api.get("/metrics")).text
                        assert (
                            f'vballoon_vm_guest_events_total{{stat="stat-oom-kills",vm="{name}"}}'
                            in text
                        )
                        assert missing_series(text) == []

                        # deflate back through vdev
                        await api.put(f"/vms/{name}/target", json={"target_mib": 0})
                        while _inflated(serial) != 0:
                            await trio.sleep(0.2)
                    lv.virsh("destroy", name)
                    assert "Traceback" not in vdev.log()
                print(f"libvirt {root.version()}: inflated 64 MiB in {took:.1f}s; {setmem.stderr}")
        # everything the session mounted is gone
        assert not [
            m for m in Path("/proc/self/mounts").read_text().split("\n") if str(root.root) in m
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(root.path(f"/var/lib/libvirt/boot/{name}"), ignore_errors=True)
