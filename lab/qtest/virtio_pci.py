"""A modern (virtio 1.x) virtio-pci driver over qtest: capabilities, the common
configuration, queues, notifications and INTx interrupts. The layout is declared in
:mod:`protocol.virtio_pci`.

Never await a qtest reply while holding up the vhost-user back-end: QEMU runs the vhost-user
start sequence inside the DRIVER_OK MMIO write (vdev runs as a separate process, or at least
as separate trio tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from guest_driver.virtio_pci import VirtioCap, VirtioPciDevice, parse_virtio_caps
from lab.qtest.client import Qtest
from lab.qtest.pci import Bar, BarAllocator, PciFunction, assign_bars, cfg_read, pci_scan
from protocol import virtio_pci as vp
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE
from protocol.virtio_pci import (
    PCI_SUBSYSTEM_ID,
    VIRTIO_VENDOR,
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
    contiguous = True  # guest-physical: any run of pages (Allocator.contiguous)

    def __post_init__(self) -> None:
        self.next = self.start

    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        addr = (self.next + align - 1) // align * align
        if addr + size > self.end:
            raise LocalError(f"guest allocator exhausted ({size} bytes wanted)")
        self.next = addr + size
        return addr


class VirtioPci(VirtioPciDevice):
    """A modern virtio-pci function driven over qtest: the device logic is
    :class:`guest_driver.virtio_pci.VirtioPciDevice`; this adds qtest discovery (BARs we
    assign, capabilities read through configuration cycles)."""

    def __init__(
        self,
        qt: Qtest,
        fn: PciFunction,
        bars: dict[int, Bar],
        caps: list[VirtioCap],
        device_id: int,
    ) -> None:
        super().__init__(qt, str(fn), {n: b.addr for n, b in bars.items()}, caps, device_id)
        self.qt = qt
        self.fn = fn
        self.bars = bars

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


async def read_virtio_caps(qt: Qtest, fn: PciFunction) -> list[VirtioCap]:
    """The virtio vendor capabilities of ``fn``, in list order: its 256-byte configuration
    space read through configuration cycles, parsed by
    :func:`guest_driver.virtio_pci.parse_virtio_caps`."""
    image = bytearray()
    for reg in range(0, 256, 4):
        image += (await cfg_read(qt, fn, reg, 4)).to_bytes(4, "little")
    return parse_virtio_caps(bytes(image))
