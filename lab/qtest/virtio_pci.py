"""A modern (virtio 1.x) virtio-pci driver over qtest: capabilities, the common
configuration, queues, notifications and INTx interrupts. The layout is declared in
:mod:`protocol.virtio_pci`.

Never await a qtest reply while holding up the vhost-user back-end: QEMU runs the vhost-user
start sequence inside the DRIVER_OK MMIO write (vdev runs as a separate process, or at least
as separate trio tasks).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from guest_driver.virtq import DriverQueue, RingLayout, UsedElem
from lab.qtest.client import Qtest
from lab.qtest.pci import Bar, BarAllocator, PciFunction, assign_bars, cfg_read, pci_scan
from protocol import virtio_pci as vp
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE
from protocol.virtio_pci import (
    CC_CFG_GENERATION,
    CC_DF,
    CC_DFSELECT,
    CC_GF,
    CC_GFSELECT,
    CC_MSIX_CONFIG,
    CC_NUM_QUEUES,
    CC_Q_DESC,
    CC_Q_DEVICE,
    CC_Q_DRIVER,
    CC_Q_ENABLE,
    CC_Q_MSIX,
    CC_Q_NOTIFY_OFF,
    CC_Q_SELECT,
    CC_Q_SIZE,
    CC_STATUS,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_ID,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_VENDOR,
    DeviceStatus,
)


def virtio_device_id(fn: PciFunction, subsystem_id: int | None = None) -> int | None:
    """The virtio device id of a virtio PCI function (modern 0x1040+id, or transitional)."""
    return vp.virtio_device_id(fn.vendor, fn.device, subsystem_id)


@dataclass
class GuestAllocator:
    """A bump allocator for guest-physical memory the qtest guest uses for rings and buffers."""

    start: int = 0x10_0000
    end: int = 0x40_0000
    next: int = field(init=False)

    def __post_init__(self) -> None:
        self.next = self.start

    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        addr = (self.next + align - 1) // align * align
        if addr + size > self.end:
            raise LocalError(f"guest allocator exhausted ({size} bytes wanted)")
        self.next = addr + size
        return addr


@dataclass(frozen=True)
class VirtioCap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    multiplier: int = 0


class VirtioPci:
    """A modern (virtio 1.x) PCI device driven over qtest. INTx interrupts (MSI-X off)."""

    def __init__(
        self,
        qt: Qtest,
        fn: PciFunction,
        bars: dict[int, Bar],
        caps: list[VirtioCap],
        device_id: int,
    ) -> None:
        self.qt = qt
        self.fn = fn
        self.bars = bars
        self.caps = caps
        self.device_id = device_id
        by_type = {c.cfg_type: c for c in reversed(caps)}  # first of each type wins
        try:
            common = by_type[VIRTIO_PCI_CAP_COMMON_CFG]
            notify = by_type[VIRTIO_PCI_CAP_NOTIFY_CFG]
            isr = by_type[VIRTIO_PCI_CAP_ISR_CFG]
        except KeyError as e:
            raise LocalError(f"{fn}: not a modern virtio device (no capability {e})") from None
        self.common = bars[common.bar].addr + common.offset
        self.notify_base = bars[notify.bar].addr + notify.offset
        self.notify_mult = notify.multiplier
        self.isr = bars[isr.bar].addr + isr.offset
        dev = by_type.get(VIRTIO_PCI_CAP_DEVICE_CFG)
        self.device_cfg = None if dev is None else bars[dev.bar].addr + dev.offset
        self.device_cfg_len = 0 if dev is None else dev.length
        self.features = 0  # negotiated
        self.queues: dict[int, DriverQueue] = {}
        self._notify_addr: dict[int, int] = {}
        #: ISR bits read but not yet consumed (ISR is read-to-clear; several waiters share it)
        self.isr_pending = 0
        self.interrupts = 0

    # -- discovery ---------------------------------------------------------------------

    @classmethod
    async def open(cls, qt: Qtest, fn: PciFunction, alloc: BarAllocator | None = None) -> VirtioPci:
        """Assign BARs, walk the capability list, and return the device (not yet reset)."""
        subsys = await cfg_read(qt, fn, PCI_SUBSYSTEM_ID, 2)
        device_id = virtio_device_id(fn, subsys)
        if device_id is None:
            raise LocalError(f"{fn} is not a virtio device")
        bars = await assign_bars(qt, fn, alloc or BarAllocator())
        caps = await read_virtio_caps(qt, fn)
        return cls(qt, fn, bars, caps, device_id)

    @classmethod
    async def find(
        cls,
        qt: Qtest,
        device_id: int | None = None,
        *,
        alloc: BarAllocator | None = None,
        functions: Sequence[PciFunction] | None = None,
    ) -> VirtioPci:
        """The first virtio function on bus 0 (with ``device_id`` if given)."""
        fns = await pci_scan(qt) if functions is None else functions
        for fn in fns:
            if fn.vendor != VIRTIO_VENDOR:
                continue
            subsys = await cfg_read(qt, fn, PCI_SUBSYSTEM_ID, 2)
            did = virtio_device_id(fn, subsys)
            if did is not None and (device_id is None or did == device_id):
                return await cls.open(qt, fn, alloc)
        raise LocalError(f"no virtio device {device_id} on bus 0 ({', '.join(map(str, fns))})")

    # -- common configuration ----------------------------------------------------------

    async def status(self) -> int:
        return await self.qt.readb(self.common + CC_STATUS)

    async def set_status(self, status: int) -> None:
        await self.qt.writeb(self.common + CC_STATUS, status)

    async def add_status(self, bits: int) -> int:
        status = await self.status() | bits
        await self.set_status(status)
        return status

    async def device_features(self) -> int:
        await self.qt.writel(self.common + CC_DFSELECT, 0)
        lo = await self.qt.readl(self.common + CC_DF)
        await self.qt.writel(self.common + CC_DFSELECT, 1)
        hi = await self.qt.readl(self.common + CC_DF)
        return hi << 32 | lo

    async def write_driver_features(self, features: int) -> None:
        await self.qt.writel(self.common + CC_GFSELECT, 0)
        await self.qt.writel(self.common + CC_GF, features & 0xFFFF_FFFF)
        await self.qt.writel(self.common + CC_GFSELECT, 1)
        await self.qt.writel(self.common + CC_GF, features >> 32)

    async def num_queues(self) -> int:
        return await self.qt.readw(self.common + CC_NUM_QUEUES)

    async def config_generation(self) -> int:
        return await self.qt.readb(self.common + CC_CFG_GENERATION)

    async def reset(self, *, timeout: float = 5.0) -> None:
        """Write status 0 and wait until the device reads back 0 (the spec's reset)."""
        await self.set_status(0)
        with trio.fail_after(timeout):
            while await self.status() != 0:
                await trio.sleep(0.001)
        self.features = 0
        self.queues.clear()
        self._notify_addr.clear()
        self.isr_pending = 0

    async def begin(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, negotiate ``wanted`` & offered (VERSION_1 required),
        FEATURES_OK. Returns the negotiated features."""
        await self.reset()
        await self.set_status(DeviceStatus.ACKNOWLEDGE)
        await self.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        offered = await self.device_features()
        if not offered & VIRTIO_F_VERSION_1:
            raise LocalError(f"{self.fn}: device does not offer VERSION_1")
        features = offered & (wanted | VIRTIO_F_VERSION_1)
        if offered & VIRTIO_F_ACCESS_PLATFORM:
            features |= VIRTIO_F_ACCESS_PLATFORM  # identity-mapped: we are the "IOMMU"
        await self.write_driver_features(features)
        status = await self.add_status(DeviceStatus.FEATURES_OK)
        if not await self.status() & DeviceStatus.FEATURES_OK:
            await self.set_status(status | DeviceStatus.FAILED)
            raise LocalError(f"{self.fn}: device refused FEATURES_OK for {features:#x}")
        self.features = features
        return features

    async def queue_max_size(self, index: int) -> int:
        await self.qt.writew(self.common + CC_Q_SELECT, index)
        return await self.qt.readw(self.common + CC_Q_SIZE)

    async def setup_queue(
        self,
        index: int,
        size: int,
        mem: GuestAllocator,
        *,
        event_idx: bool | None = None,
        layout: RingLayout | None = None,
    ) -> DriverQueue:
        """Allocate, zero and program queue ``index`` (size clamped to the device maximum);
        enable it. Returns the driver-side ring."""
        c = self.common
        await self.qt.writew(c + CC_Q_SELECT, index)
        max_size = await self.qt.readw(c + CC_Q_SIZE)
        if max_size == 0:
            raise LocalError(f"{self.fn}: queue {index} does not exist")
        size = min(size, max_size)
        if layout is None:
            layout = RingLayout.contiguous(mem.alloc(RingLayout.footprint(size)), size)
        if event_idx is None:
            event_idx = bool(self.features & VIRTIO_F_EVENT_IDX)
        q = DriverQueue(self.qt, layout, event_idx=event_idx)
        await q.init()
        await self.qt.writew(c + CC_Q_SIZE, layout.size)
        await self.qt.writew(c + CC_Q_MSIX, VIRTIO_MSI_NO_VECTOR)
        for off, addr in ((CC_Q_DESC, layout.desc), (CC_Q_DRIVER, layout.avail),
                          (CC_Q_DEVICE, layout.used)):  # fmt: skip
            await self.qt.writel(c + off, addr & 0xFFFF_FFFF)
            await self.qt.writel(c + off + 4, addr >> 32)
        notify_off = await self.qt.readw(c + CC_Q_NOTIFY_OFF)
        await self.qt.writew(c + CC_Q_ENABLE, 1)
        self._notify_addr[index] = self.notify_base + notify_off * self.notify_mult
        self.queues[index] = q
        return q

    async def driver_ok(self) -> None:
        """Set DRIVER_OK. With a vhost-user device QEMU starts the back-end inside this write."""
        await self.qt.writew(self.common + CC_MSIX_CONFIG, VIRTIO_MSI_NO_VECTOR)
        await self.add_status(DeviceStatus.DRIVER_OK)

    # -- notifications and interrupts --------------------------------------------------

    async def notify(self, index: int) -> None:
        await self.qt.writew(self._notify_addr[index], index)

    async def kick(self, index: int) -> None:
        """Notify the device if the ring asks for it."""
        if await self.queues[index].needs_kick():
            await self.notify(index)

    async def read_isr(self) -> int:
        """Read (and thereby clear) the ISR; bits accumulate in :attr:`isr_pending`."""
        isr = await self.qt.readb(self.isr)
        if isr:
            self.interrupts += 1
            self.isr_pending |= isr
        return isr

    def take_isr(self, mask: int) -> int:
        got = self.isr_pending & mask
        self.isr_pending &= ~mask
        return got

    async def wait_isr(self, mask: int, timeout: float, *, poll: float = 0.05) -> int:
        """Wait for an interrupt with one of ``mask``'s ISR bits; consume and return them.

        Uses the intercepted IRQ line when there is one, and polls every ``poll`` s as a
        fallback. Raises ``trio.TooSlowError`` after ``timeout``.
        """
        with trio.fail_after(timeout):
            while True:
                seen = self.qt.irq_raises
                if got := self.take_isr(mask):
                    return got
                await self.read_isr()
                if got := self.take_isr(mask):
                    return got
                await self.qt.wait_irq(seen, poll)

    async def wait_used(self, index: int, timeout: float, *, poll: float = 0.05) -> list[UsedElem]:
        """Collect used elements of queue ``index``, waiting for at least one."""
        q = self.queues[index]
        with trio.fail_after(timeout):
            while True:
                seen = self.qt.irq_raises
                if elems := await q.poll_used():
                    return elems
                await self.read_isr()  # lower the line; the bit stays for other waiters
                if elems := await q.poll_used():
                    return elems
                await self.qt.wait_irq(seen, poll)

    # -- device configuration space ----------------------------------------------------

    def _cfg(self, offset: int, size: int) -> int:
        if self.device_cfg is None:
            raise LocalError(f"{self.fn}: no device configuration space")
        if offset + size > self.device_cfg_len:
            raise LocalError(f"config access {offset}+{size} beyond {self.device_cfg_len}")
        return self.device_cfg + offset

    async def config_read(self, offset: int, size: int) -> int:
        addr = self._cfg(offset, size)
        if size == 1:
            return await self.qt.readb(addr)
        if size == 2:
            return await self.qt.readw(addr)
        if size == 4:
            return await self.qt.readl(addr)
        raise LocalError(f"config read of {size} bytes")

    async def config_write(self, offset: int, size: int, value: int) -> None:
        addr = self._cfg(offset, size)
        if size == 1:
            await self.qt.writeb(addr, value)
        elif size == 2:
            await self.qt.writew(addr, value)
        elif size == 4:
            await self.qt.writel(addr, value)
        else:
            raise LocalError(f"config write of {size} bytes")

    async def config_bytes(self, offset: int, length: int) -> bytes:
        """A consistent snapshot of ``length`` bytes (config_generation retry loop)."""
        while True:
            gen = await self.config_generation()
            out = bytearray()
            for off in range(offset, offset + length, 4):
                out += struct.pack("<I", await self.config_read(off, 4))
            if await self.config_generation() == gen:
                return bytes(out[:length])


async def read_virtio_caps(qt: Qtest, fn: PciFunction) -> list[VirtioCap]:
    """The virtio vendor capabilities of ``fn``, in list order."""
    if not await cfg_read(qt, fn, PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return []
    caps: list[VirtioCap] = []
    ptr = await cfg_read(qt, fn, PCI_CAPABILITY_LIST, 1) & 0xFC
    seen: set[int] = set()
    while ptr and ptr not in seen:
        seen.add(ptr)
        head = await cfg_read(qt, fn, ptr, 4)
        cap_id, nxt = head & 0xFF, (head >> 8) & 0xFC
        if cap_id == PCI_CAP_ID_VNDR:
            cfg_type = head >> 24
            at = {k: ptr + off for k, off in vp.CAP_OFFSET.items()}
            bar = await cfg_read(qt, fn, at["bar"], 1)
            offset = await cfg_read(qt, fn, at["offset"], 4)
            length = await cfg_read(qt, fn, at["length"], 4)
            mult = (
                await cfg_read(qt, fn, at["notify_off_multiplier"], 4)
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG
                else 0
            )
            caps.append(VirtioCap(cfg_type, bar, offset, length, mult))
        ptr = nxt
    return caps

