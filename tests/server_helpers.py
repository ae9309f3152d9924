"""Shared by the server tests: vdev in-process on fresh sockets, a vmw channel to it that
has STARTed, waiting on a condition, posting a virtio-balloon stats buffer and waiting for
it to come back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from guest_driver.frontend import VhostUserFrontend, VmwChannel, connect_frontend
from guest_driver.virtq import Buffer
from lab.vdev_inprocess import start_inprocess_vdev
from protocol import virtio_balloon as vb
from protocol.vmw import ALL_CAPABILITIES, Command, Status
from vdev.devices.virtio_balloon import STATSQ
from vdev.registry import GuestRegistry
from vdev.server import Server

MiB = 1 << 20
BALLOON_FEATURES = int(vb.Feature.STATS_VQ | vb.Feature.DEFLATE_ON_OOM)
STATS_GPA = 0x200000


async def start_server(
    nursery: trio.Nursery,
    tmp_path: Path,
    device: str | type = "virtio-balloon",
    *,
    sockets: int = 1,
    stats_interval: float = 0.0,
) -> tuple[Server, GuestRegistry, list[str]]:
    vdev = await start_inprocess_vdev(
        nursery, [tmp_path / f"r{i}.sock" for i in range(sockets)], device=device,
        stats_interval=stats_interval,
    )  # fmt: skip
    return vdev.server, vdev.registry, [str(p) for p in vdev.socket_paths]


@contextlib.asynccontextmanager
async def started_vmw(
    vdev_inproc: Any, guest_ram: Any, target_pages: int
) -> AsyncIterator[tuple[VhostUserFrontend, VmwChannel, GuestRegistry]]:
    """An in-process vmw vdev (the ``vdev_inproc`` fixture) and a front-end on 64 MiB of
    guest RAM whose driver has STARTed with every capability."""
    server, registry = await vdev_inproc(device="vmw", target_pages=target_pages)
    async with connect_frontend(server.socket_paths[0], guest_ram(64 * MiB)) as fe:
        ch = VmwChannel(fe)
        start = await ch.call(Command.START, int(ALL_CAPABILITIES))
        assert start.status == Status.SUCCESS_WITH_CAPABILITIES
        yield fe, ch, registry


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


async def post_stats(fe: Any, free: int) -> int:
    fe.ram.write(STATS_GPA, vb.pack_stats([(vb.StatTag.MEMFREE, free)]))
    q = fe.queues[STATSQ]
    head = await q.driver.add([Buffer(STATS_GPA, 10)])
    await q.kick()
    return int(head)


async def returned(fe: Any, head: int) -> None:
    """The device used the stats buffer ``head`` (gave it back)."""
    q = fe.queues[STATSQ]
    with trio.fail_after(5):
        while True:
            if any(u.id == head for u in await q.driver.poll_used()):
                return
            with trio.move_on_after(0.05):
                await q.wait_call()
