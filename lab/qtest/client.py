"""The qtest wire protocol: one connection to QEMU's ``-qtest`` chardev.

QEMU runs with ``-qtest unix:PATH`` (QEMU is the *client*: listen first, see
:func:`listen_unix`) and a HLT BIOS, so the vCPU halts at the reset vector and qtest is the
only thing touching the hardware. Every guest action is one qtest line (``outl``,
``readw``, ``b64read``, ...) answered by ``OK [value]`` or ``FAIL ...``. Lines
``IRQ raise N`` / ``IRQ lower N`` arrive asynchronously once ``irq_intercept_in ioapic`` is
on; a reader task separates them from the replies.

:class:`Qtest` also serves as the ``MemoryPort`` of :mod:`guest_driver.virtq`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import socket as pysocket
from collections.abc import AsyncIterator

import trio

from guest_driver.virtio_pci import PortError

log = logging.getLogger(__name__)


class QtestError(PortError):
    """qtest answered FAIL, or spoke nonsense.

    Raised by :class:`Qtest`; caught by the qtest transport (``lab.transport_qtest``), which
    turns it into :class:`~protocol.errors.DeviceGone`."""


class QtestClosed(QtestError):
    """QEMU closed the qtest connection (it quit or was killed).

    Raised by :class:`Qtest`'s reader; caught as a :class:`QtestError`."""


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
