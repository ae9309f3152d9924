"""vdev run in-process: the real :class:`vdev.server.Server` as trio tasks, controlled
through its :class:`vdev.registry.GuestRegistry` (the object the management API talks to).
The one in-process rig: the qtest rigs (:func:`lab.transport_qtest.vdev_rig`), the Linux
guest rig (:func:`lab.linux_guest.serve_vdev`) and the tests' ``vdev_inproc`` fixture all
start vdev through it. :mod:`lab.vdev_process` runs it as a child process instead.

* :func:`start_inprocess_vdev` starts it in a caller-owned nursery (cancelled with it);
* :func:`open_inprocess_vdev` runs it in a nursery of its own and, on exit, shuts it down
  (queued requests answered BUSY, connections closed; bounded, shielded), then cancels it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from protocol.units import PAGES_PER_MIB
from vdev.connection import Connection
from vdev.devices.base import Device, get_personality
from vdev.registry import GuestRegistry, GuestView
from vdev.server import Server

#: How long the shutdown on exit may take before the tasks are cancelled anyway.
SHUTDOWN_TIMEOUT = 5.0


@dataclass
class InProcessVdev:
    """A running in-process vdev: ``socket_paths`` serve guests ``names`` (in order); the
    methods act on the first guest unless given another ``name``."""

    server: Server
    registry: GuestRegistry
    socket_paths: list[Path]
    names: list[str]
    personality: str
    #: A scratch directory the rig made for it (QEMU's, for the qtest rigs), else None.
    scratch: Path | None = field(default=None)

    @property
    def socket_path(self) -> Path:
        """The first guest's vhost-user socket."""
        return self.socket_paths[0]

    @property
    def name(self) -> str:
        return self.names[0]

    def view(self, name: str | None = None) -> GuestView:
        """The guest's :class:`~vdev.registry.GuestView`."""
        return self.registry.view(name or self.name)

    async def size_pages(self) -> int:
        return int(self.view().size_pages)

    async def snapshot(self) -> GuestView:
        return self.view()

    def set_target(self, pages: int, name: str | None = None) -> None:
        self.registry.set_target(name or self.name, pages)

    def set_target_mib(self, mib: int) -> None:
        self.set_target(mib * PAGES_PER_MIB)

    def connection(self, name: str | None = None) -> Connection | None:
        """The guest's live connection, if any."""
        for conn in self.server.connections:
            if conn.guest == (name or self.name) and not conn.closed:
                return conn
        return None

    async def request_stats(self, name: str | None = None) -> bool:
        """virtio-balloon: give the held stats buffer back so the guest sends fresh stats
        (what ``--stats-interval`` and QEMU's ``guest-stats-polling-interval`` do). True when
        a held buffer went back (``Connection.refresh_stats``, the awaited form of
        ``GuestRegistry.request_stats``); False when nothing is connected or held."""
        conn = self.connection(name)
        return conn is not None and await conn.refresh_stats()

    async def fresh_stats(self, *, poll: float = 0.05) -> dict[str, int]:
        """Request stats and wait until the guest sent a new buffer; its stats."""
        from lab.linux_guest import fresh_stats

        return await fresh_stats(self, self.request_stats, poll=poll)


def _server(
    socket_paths: Sequence[str | Path],
    device: str | type[Device],
    target_pages: int,
    names: Sequence[str] | None,
    stats_interval: float,
) -> tuple[Server, list[Path], list[str], str]:
    cls = get_personality(device) if isinstance(device, str) else device
    registry = GuestRegistry(cls.name, target=target_pages)
    paths = [Path(p) for p in socket_paths]
    server = Server(
        registry, cls, socket_paths=[str(p) for p in paths], names=names,
        stats_interval=stats_interval,
    )  # fmt: skip
    return server, paths, list(names or [f"vm{i}" for i in range(len(paths))]), cls.name


async def start_inprocess_vdev(
    nursery: trio.Nursery,
    socket_paths: Sequence[str | Path],
    *,
    device: str | type[Device] = "vmw",
    target_pages: int = 0,
    names: Sequence[str] | None = None,
    stats_interval: float = 0.0,
    scratch: Path | None = None,
) -> InProcessVdev:
    """Serve ``device`` (a personality name or a device class) on ``socket_paths`` in
    ``nursery``; returns once every socket listens."""
    server, paths, names_, personality = _server(
        socket_paths, device, target_pages, names, stats_interval
    )
    await nursery.start(server.run)
    return InProcessVdev(server, server.registry, paths, names_, personality, scratch)


@contextlib.asynccontextmanager
async def open_inprocess_vdev(
    socket_paths: Sequence[str | Path], **kw: Any
) -> AsyncIterator[InProcessVdev]:
    """:func:`start_inprocess_vdev` in a nursery of its own; shut down and cancelled on
    exit."""
    async with trio.open_nursery() as nursery:
        vdev = await start_inprocess_vdev(nursery, socket_paths, **kw)
        try:
            yield vdev
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_TIMEOUT):
                await vdev.server.shutdown()
            nursery.cancel_scope.cancel()
