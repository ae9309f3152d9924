"""Our qtest guest and its virtio-balloon driver against QEMU's own virtio-balloon-pci."""

from __future__ import annotations

import pytest
import trio
from conftest import missing_prerequisite

from lab import qemu
from lab.qtest.launcher import qtest_vm
from lab.qtest.pci import pci_scan
from lab.qtest.virtio_pci import GuestAllocator, VirtioPci
from lab.virtio_balloon_driver import PagePool, VirtioBalloonDriver
from protocol import virtio_balloon as vb

pytestmark = pytest.mark.qemu

MIB = 1 << 20
POOL_GPA = 64 * MIB
POOL_PAGES = 64 * MIB // 4096


@pytest.fixture
def host_qemu() -> qemu.QemuBinary:
    q = qemu.best_qemu(need_test_device=False)
    if q is None:
        missing_prerequisite("no QEMU (run scripts/setup)")
    return q


async def test_pci_scan_and_virtio_init(host_qemu: qemu.QemuBinary) -> None:
    with trio.fail_after(30):
        async with qtest_vm(host_qemu, devices=["virtio-balloon-pci"], qmp=False) as vm:
            fns = await pci_scan(vm.qt)
            assert any(f.vendor == 0x1AF4 for f in fns)
            dev = await VirtioPci.find(vm.qt, vb.DEVICE_ID, functions=fns)
            assert await dev.num_queues() >= 3
            offered = await dev.device_features()
            assert offered & (1 << 32) and offered & vb.Feature.STATS_VQ
            feats = await dev.begin(int(vb.Feature.STATS_VQ))
            assert feats == (1 << 32) | vb.Feature.STATS_VQ
            mem = GuestAllocator()
            for i in range(3):
                await dev.setup_queue(i, 64, mem)
            await dev.driver_ok()
            assert await dev.status() == 0xF


async def test_builtin_inflate_deflate_reclaims(host_qemu: qemu.QemuBinary) -> None:
    with trio.fail_after(60):
        async with qtest_vm(
            host_qemu, devices=["virtio-balloon-pci,deflate-on-oom=on"], ram_mib=256
        ) as vm:
            assert vm.qmp is not None
            dev = await VirtioPci.find(vm.qt, vb.DEVICE_ID)
            drv = VirtioBalloonDriver(dev, GuestAllocator(), PagePool(POOL_GPA // 4096, POOL_PAGES))
            await drv.start()
            assert drv.features & vb.Feature.DEFLATE_ON_OOM
            await vm.qt.memset(POOL_GPA, 64 * MIB, 0x5A)
            before = vm.memfd_bytes()
            assert before >= 64 * MIB
            await vm.qmp.execute("balloon", {"value": 256 * MIB - 32 * MIB})
            await drv.service(10)
            assert drv.num_pages == 8192 == await drv.read_actual()
            assert (await vm.qmp.execute("query-balloon"))["actual"] == 224 * MIB
            assert before - vm.memfd_bytes() >= 32 * MIB - 64 * 1024
            assert await drv.oom() == 256
            assert await drv.read_actual() == 8192 - 256
            await vm.qmp.execute("balloon", {"value": 256 * MIB})
            await drv.service(10)
            assert drv.num_pages == 0
            assert await vm.qt.read(POOL_GPA + 16 * MIB, 4096) == bytes(4096)
            await vm.qt.memset(POOL_GPA, 64 * MIB, 0x5A)
            assert vm.memfd_bytes() >= before
