"""A qtest client and a modern virtio-pci driver on top of it (the guest is us).

QEMU runs with ``-qtest unix:PATH`` (QEMU is the *client*: listen first, see
:func:`listen_unix`) and a HLT BIOS, so the vCPU halts at the reset vector and qtest is the
only thing touching the hardware. Every guest action is one qtest line (``outl``,
``readw``, ``b64read``, ...) answered by ``OK [value]`` or ``FAIL ...``. Lines
``IRQ raise N`` / ``IRQ lower N`` arrive asynchronously once ``irq_intercept_in ioapic`` is
on; a reader task separates them from the replies.

Never await a qtest reply while holding up the vhost-user back-end: QEMU runs the vhost-user
start sequence inside the DRIVER_OK MMIO write (vdev runs as a separate process, or at least
as separate trio tasks).

Usage::

    listener = await listen_unix(path)           # before exec'ing QEMU
    async with Qtest.accept(listener) as qt:     # QEMU connected; reader task running
        fns = await pci_scan(qt)
        dev = await VirtioPci.open(qt, fn, BarAllocator())
        await dev.begin(features)                # reset, ACK, DRIVER, features, FEATURES_OK
        q = await dev.setup_queue(0, 64, mem)    # a guest_driver.virtq.DriverQueue
        await dev.driver_ok()

:class:`Qtest` also serves as the ``MemoryPort`` of :mod:`guest_driver.virtq`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import socket as pysocket
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from guest_driver.virtq import DriverQueue, RingLayout, UsedElem
from lab.qemu import QemuBinary, Qmp, build_argv, qemu_process, write_hlt_bios
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE

log = logging.getLogger(__name__)



class QtestError(LocalError):
    """qtest answered FAIL, or spoke nonsense."""


class QtestClosed(QtestError):
    """QEMU closed the qtest connection (it quit or was killed)."""


async def listen_unix(path: str | os.PathLike[str], backlog: int = 1) -> trio.SocketListener:
    """A listening unix socket at ``path`` (an existing file there is replaced)."""
    p = os.fspath(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)
    sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        await sock.bind(p)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class Qtest:
    """One qtest connection. Commands are serialised; IRQ lines are tracked in the background.

    Create with :meth:`accept` (or :meth:`open` on an already accepted stream).
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._lock = trio.Lock()
        self._replies_send, self._replies = trio.open_memory_channel[str](16)
        self._irq_event = trio.Event()
        #: number of ``IRQ raise`` lines seen so far (see :meth:`wait_irq`)
        self.irq_raises = 0
        #: current level of every intercepted line that has moved
        self.irq_level: dict[int, bool] = {}
        self.commands = 0
        self.closed = False

    # -- life cycle --------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def accept(
        cls,
        listener: trio.SocketListener,
        *,
        timeout: float = 10.0,
        intercept: str | None = "ioapic",
    ) -> AsyncIterator[Qtest]:
        """Wait (at most ``timeout`` s) for QEMU to connect; yield a running client."""
        with trio.fail_after(timeout):
            stream = await listener.accept()
        async with cls.open(stream, intercept=intercept) as qt:
            yield qt

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, stream: trio.abc.Stream, *, intercept: str | None = "ioapic"
    ) -> AsyncIterator[Qtest]:
        qt = cls(stream)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(qt._reader)
                try:
                    if intercept:
                        await qt.command(f"irq_intercept_in {intercept}")
                    yield qt
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
        except BaseExceptionGroup as eg:
            # the reader never raises: give the caller its own exception back, not a group
            if len(eg.exceptions) == 1:
                raise eg.exceptions[0] from eg.exceptions[0].__cause__
            raise

    async def _reader(self) -> None:
        buf = bytearray()
        try:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = buf[:nl].decode("ascii", "replace").rstrip("\r")
                    del buf[: nl + 1]
                    if line.startswith("IRQ "):
                        self._irq_line(line)
                    else:
                        await self._replies_send.send(line)
        finally:
            self.closed = True
            self._replies_send.close()
            self._irq_event.set()  # wake waiters; they see ``closed``

    def _irq_line(self, line: str) -> None:
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ("raise", "lower"):
            log.warning("qtest: odd IRQ line %r", line)
            return
        raised = parts[1] == "raise"
        self.irq_level[int(parts[2])] = raised
        if raised:
            self.irq_raises += 1
            self._irq_event.set()
            self._irq_event = trio.Event()

    async def wait_irq(self, after: int, timeout: float | None = None) -> bool:
        """Wait until :attr:`irq_raises` exceeds ``after``; False on timeout.

        Take ``after`` *before* checking the condition you wait for, so a raise in between
        is not missed.
        """
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            while self.irq_raises <= after:
                if self.closed:
                    raise QtestClosed("qtest connection closed")
                await self._irq_event.wait()
            return True
        return False

    # -- commands ----------------------------------------------------------------------

    async def command(self, line: str) -> str:
        """Send one command line; return what follows ``OK`` (stripped)."""
        async with self._lock:
            if self.closed:
                raise QtestClosed("qtest connection closed")
            try:
                await self.stream.send_all(line.encode("ascii") + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise QtestClosed(f"qtest connection closed: {e}") from e
            try:
                reply = await self._replies.receive()
            except trio.EndOfChannel:
                raise QtestClosed(f"qtest connection closed during {line.split()[0]}") from None
            self.commands += 1
        if reply == "OK":
            return ""
        if reply.startswith("OK "):
            return reply[3:].strip()
        raise QtestError(f"qtest {line[:60]!r}: {reply}")

    async def _value(self, line: str) -> int:
        return int(await self.command(line), 0)

    async def outb(self, port: int, v: int) -> None:
        await self.command(f"outb {port:#x} {v:#x}")

    async def outw(self, port: int, v: int) -> None:
        await self.command(f"outw {port:#x} {v:#x}")

    async def outl(self, port: int, v: int) -> None:
        await self.command(f"outl {port:#x} {v:#x}")

    async def inb(self, port: int) -> int:
        return await self._value(f"inb {port:#x}")

    async def inw(self, port: int) -> int:
        return await self._value(f"inw {port:#x}")

    async def inl(self, port: int) -> int:
        return await self._value(f"inl {port:#x}")

    async def readb(self, addr: int) -> int:
        return await self._value(f"readb {addr:#x}")

    async def readw(self, addr: int) -> int:
        return await self._value(f"readw {addr:#x}")

    async def readl(self, addr: int) -> int:
        return await self._value(f"readl {addr:#x}")

    async def readq(self, addr: int) -> int:
        return await self._value(f"readq {addr:#x}")

    async def writeb(self, addr: int, v: int) -> None:
        await self.command(f"writeb {addr:#x} {v:#x}")

    async def writew(self, addr: int, v: int) -> None:
        await self.command(f"writew {addr:#x} {v:#x}")

    async def writel(self, addr: int, v: int) -> None:
        await self.command(f"writel {addr:#x} {v:#x}")

    async def writeq(self, addr: int, v: int) -> None:
        await self.command(f"writeq {addr:#x} {v:#x}")

    async def read(self, gpa: int, n: int) -> bytes:
        """Guest-physical memory (``b64read``)."""
        if n <= 0:
            return b""
        data = base64.b64decode(await self.command(f"b64read {gpa:#x} {n:#x}"))
        if len(data) != n:
            raise QtestError(f"b64read {gpa:#x} {n}: got {len(data)} bytes")
        return data

    async def write(self, gpa: int, data: bytes) -> None:
        """Write guest-physical memory (``b64write``)."""
        if not data:
            return
        b64 = base64.b64encode(data).decode("ascii")
        await self.command(f"b64write {gpa:#x} {len(data):#x} {b64}")

    async def memset(self, gpa: int, n: int, byte: int) -> None:
        await self.command(f"memset {gpa:#x} {n:#x} {byte:#x}")


# --------------------------------------------------------------------------- PCI

CF8 = 0xCF8
CFC = 0xCFC
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_HEADER_TYPE = 0x0E
PCI_BAR0 = 0x10
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_STATUS_CAP_LIST = 0x10
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_CAP_ID_VNDR = 0x09
VIRTIO_VENDOR = 0x1AF4


@dataclass(frozen=True)
class PciFunction:
    bus: int
    dev: int
    fn: int
    vendor: int
    device: int

    def cfg_addr(self, reg: int) -> int:
        return 0x8000_0000 | self.bus << 16 | self.dev << 11 | self.fn << 8 | (reg & 0xFC)

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.dev:02x}.{self.fn} {self.vendor:04x}:{self.device:04x}"


async def cfg_read(qt: Qtest, f: PciFunction | tuple[int, int, int], reg: int, size: int) -> int:
    bus, dev, fn = (f.bus, f.dev, f.fn) if isinstance(f, PciFunction) else f
    await qt.outl(CF8, 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC))
    port = CFC + (reg & 3)
    if size == 1:
        return await qt.inb(port)
    if size == 2:
        return await qt.inw(port)
    return await qt.inl(port)


async def cfg_write(qt: Qtest, f: PciFunction, reg: int, size: int, value: int) -> None:
    await qt.outl(CF8, f.cfg_addr(reg))
    port = CFC + (reg & 3)
    if size == 1:
        await qt.outb(port, value)
    elif size == 2:
        await qt.outw(port, value)
    else:
        await qt.outl(port, value)


async def pci_scan(qt: Qtest, bus: int = 0) -> list[PciFunction]:
    """Every function present on ``bus``."""
    out: list[PciFunction] = []
    for dev in range(32):
        for fn in range(8):
            ids = await cfg_read(qt, (bus, dev, fn), PCI_VENDOR_ID, 4)
            if ids & 0xFFFF in (0xFFFF, 0):
                if fn == 0:
                    break
                continue
            out.append(PciFunction(bus, dev, fn, ids & 0xFFFF, ids >> 16))
            if fn == 0 and not await cfg_read(qt, (bus, dev, 0), PCI_HEADER_TYPE, 1) & 0x80:
                break
    return out


@dataclass
class BarAllocator:
    """Hands out MMIO / I/O windows for BARs (what firmware would do)."""

    mmio: int = 0xC000_0000
    mmio_end: int = 0xFE00_0000
    io: int = 0xC000
    io_end: int = 0x10000

    def take_mmio(self, size: int) -> int:
        addr = (self.mmio + size - 1) // size * size
        if addr + size > self.mmio_end:
            raise LocalError("out of PCI MMIO space")
        self.mmio = addr + size
        return addr

    def take_io(self, size: int) -> int:
        addr = (self.io + size - 1) // size * size
        if addr + size > self.io_end:
            raise LocalError("out of PCI I/O space")
        self.io = addr + size
        return addr


@dataclass(frozen=True)
class Bar:
    index: int
    addr: int
    size: int
    io: bool


async def assign_bars(qt: Qtest, f: PciFunction, alloc: BarAllocator) -> dict[int, Bar]:
    """Size and assign every BAR of a type-0 function; enable I/O, memory and bus mastering."""
    bars: dict[int, Bar] = {}
    cmd = await cfg_read(qt, f, PCI_COMMAND, 2)
    await cfg_write(qt, f, PCI_COMMAND, 2, cmd & ~0x7)  # decode off while sizing
    i = 0
    while i < 6:
        reg = PCI_BAR0 + 4 * i
        orig = await cfg_read(qt, f, reg, 4)
        await cfg_write(qt, f, reg, 4, 0xFFFF_FFFF)
        probe = await cfg_read(qt, f, reg, 4)
        if probe == 0:
            i += 1
            continue
        if orig & 1:  # I/O
            size = (~(probe & ~0x3) & 0xFFFF) + 1
            addr = alloc.take_io(size)
            await cfg_write(qt, f, reg, 4, addr)
            bars[i] = Bar(i, addr, size, io=True)
            i += 1
            continue
        is64 = (orig >> 1) & 3 == 2
        low = probe & ~0xF
        if is64:
            await cfg_write(qt, f, reg + 4, 4, 0xFFFF_FFFF)
            high = await cfg_read(qt, f, reg + 4, 4)
            mask = high << 32 | low
            size = (~mask & 0xFFFF_FFFF_FFFF_FFFF) + 1
        else:
            size = (~low & 0xFFFF_FFFF) + 1
        addr = alloc.take_mmio(size)
        await cfg_write(qt, f, reg, 4, addr & 0xFFFF_FFFF)
        if is64:
            await cfg_write(qt, f, reg + 4, 4, addr >> 32)
        bars[i] = Bar(i, addr, size, io=False)
        i += 2 if is64 else 1
    await cfg_write(
        qt, f, PCI_COMMAND, 2, cmd | PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    )
    return bars


# --------------------------------------------------------------------------- virtio-pci

VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# common configuration structure (virtio 1.x, 4.1.4.3)
CC_DFSELECT = 0x00
CC_DF = 0x04
CC_GFSELECT = 0x08
CC_GF = 0x0C
CC_MSIX_CONFIG = 0x10
CC_NUM_QUEUES = 0x12
CC_STATUS = 0x14
CC_CFG_GENERATION = 0x15
CC_Q_SELECT = 0x16
CC_Q_SIZE = 0x18
CC_Q_MSIX = 0x1A
CC_Q_ENABLE = 0x1C
CC_Q_NOTIFY_OFF = 0x1E
CC_Q_DESC = 0x20
CC_Q_DRIVER = 0x28
CC_Q_DEVICE = 0x30

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_MSI_NO_VECTOR = 0xFFFF


def virtio_device_id(fn: PciFunction, subsystem_id: int | None = None) -> int | None:
    """The virtio device id of a virtio PCI function (modern 0x1040+id, or transitional)."""
    if fn.vendor != VIRTIO_VENDOR:
        return None
    if 0x1040 <= fn.device <= 0x107F:
        return fn.device - 0x1040
    if 0x1000 <= fn.device <= 0x103F:
        return subsystem_id
    return None


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
        await self.set_status(STATUS_ACKNOWLEDGE)
        await self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = await self.device_features()
        if not offered & VIRTIO_F_VERSION_1:
            raise LocalError(f"{self.fn}: device does not offer VERSION_1")
        features = offered & (wanted | VIRTIO_F_VERSION_1)
        if offered & VIRTIO_F_ACCESS_PLATFORM:
            features |= VIRTIO_F_ACCESS_PLATFORM  # identity-mapped: we are the "IOMMU"
        await self.write_driver_features(features)
        status = await self.add_status(STATUS_FEATURES_OK)
        if not await self.status() & STATUS_FEATURES_OK:
            await self.set_status(status | STATUS_FAILED)
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
            event_idx = bool(self.features & (1 << 29))
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
        await self.add_status(STATUS_DRIVER_OK)

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
            bar = await cfg_read(qt, fn, ptr + 4, 1)
            offset = await cfg_read(qt, fn, ptr + 8, 4)
            length = await cfg_read(qt, fn, ptr + 12, 4)
            mult = (
                await cfg_read(qt, fn, ptr + 16, 4) if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG else 0
            )
            caps.append(VirtioCap(cfg_type, bar, offset, length, mult))
        ptr = nxt
    return caps


def socket_path_ok(path: Path) -> bool:
    """Unix socket paths are limited to 107 bytes."""
    return len(os.fsencode(path)) < 108


# --------------------------------------------------------------------------- a qtest VM


def rss_shmem_kib(pid: int) -> int:
    """``RssShmem`` of a process (kB): the shared guest RAM it has mapped and touched."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise LocalError(f"no RssShmem in /proc/{pid}/status")


def memfd_allocated_bytes(pid: int, name: str = "memory-backend-memfd") -> int:
    """Allocated bytes (``st_blocks``) of the memfds named ``name`` that process ``pid`` holds
    open (QEMU names every ``memory-backend-memfd``'s memfd so)."""
    seen: set[int] = set()
    total = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
            if not target.startswith(f"/memfd:{name} "):
                continue
            st = entry.stat()
        except OSError:
            continue
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


@dataclass
class QtestVm:
    """A QEMU whose only "CPU" is us: HLT BIOS, qtest connected, QMP optional."""

    qemu: QemuBinary
    argv: list[str]
    proc: trio.Process
    qt: Qtest
    qmp: Qmp | None
    dir: Path
    started: float  # trio.current_time() at exec

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_shmem_kib(self) -> int:
        return rss_shmem_kib(self.pid)

    def memfd_bytes(self) -> int:
        return memfd_allocated_bytes(self.pid)


@contextlib.asynccontextmanager
async def qtest_vm(
    qemu: QemuBinary,
    *,
    devices: Sequence[str] = (),
    chardevs: Mapping[str, Path] | None = None,
    ram_mib: int = 256,
    qmp: bool = True,
    extra: Sequence[str] = (),
    scratch: Path | None = None,
    stderr: int | None = None,
    timeout: float = 15.0,
) -> AsyncIterator[QtestVm]:
    """Start QEMU (TCG, HLT BIOS, memfd RAM share=on, ``-qtest``) and connect to it.

    ``scratch`` is a :meth:`QemuBinary.scratch_dir` (made and removed here when None);
    chardev sockets must already be listening. QEMU is stopped (SIGTERM) on exit.
    """
    own = scratch is None
    d = qemu.scratch_dir("vbq-") if scratch is None else scratch
    try:
        bios = d / "hlt.bin"
        if not bios.exists():
            write_hlt_bios(bios)
        qsock = d / "qtest.sock"
        listener = await listen_unix(qsock)
        qmp_sock = d / "qmp.sock" if qmp else None
        argv = build_argv(
            qemu,
            ram_mib=ram_mib,
            bios=bios,
            qtest_socket=qsock,
            qmp_socket=qmp_sock,
            chardevs=chardevs,
            devices=devices,
            extra=extra,
        )
        log.info("qtest VM: %s", " ".join(argv))
        t0 = trio.current_time()
        try:
            async with qemu_process(argv, stderr=stderr) as proc:
                stream: trio.SocketStream | None = None
                with trio.fail_after(timeout):
                    while stream is None:
                        # QEMU exiting before it connects (bad argv) must not hang us
                        if proc.poll() is not None:
                            raise LocalError(
                                f"QEMU exited {proc.returncode} before qtest connected"
                            )
                        with trio.move_on_after(0.05):
                            stream = await listener.accept()
                async with Qtest.open(stream) as qt:
                    client = await Qmp.connect(qmp_sock) if qmp_sock is not None else None
                    try:
                        yield QtestVm(qemu, argv, proc, qt, client, d, t0)
                    finally:
                        if client is not None:
                            with trio.CancelScope(shield=True):
                                await client.aclose()
        finally:
            await listener.aclose()
    finally:
        if own:
            shutil.rmtree(d, ignore_errors=True)
