"""Device resets over the real vhost-user path (vdev in the test's loop, our front-end).

QEMU stops the rings the same way for a pause and for a guest reset or reboot; what differs
is where the rings restart: at the bases vdev reported (a pause: the balloon stays) or at 0
(the driver re-initialised them: vdev forgets the balloon, as a real device does). Both
personalities; and the operator reset of virtio-balloon is refused, saying why.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from server_helpers import started_vmw

from guest_driver.frontend import VhostUserFrontend, connect_frontend
from guest_driver.virtq import Buffer
from lab.vdev_process import vdev_serve
from protocol import virtio_balloon as vb
from protocol.errors import ConfigError
from protocol.vmw import ALL_CAPABILITIES, Command, Status
from vdev.api.client import ApiError

MiB = 1 << 20
FIRST = 0x1000  # PFN 0x1000 = 16 MiB: ordinary RAM, far above the rings
N = 256
PFN_GPA = 0x300000  # where the inflate buffer (le32 PFNs) is written


async def tell_host(fe: VhostUserFrontend, queue: int, pfns: np.ndarray) -> None:
    """virtio-balloon's tell_host: one buffer of le32 PFNs, wait until it is used."""
    data = pfns.astype(vb.PFN_DTYPE).tobytes()
    fe.ram.write(PFN_GPA, data)
    q = fe.queues[queue]
    head = await q.driver.add([Buffer(PFN_GPA, len(data))])
    await q.kick()
    while not any(e.id == head for e in await q.driver.poll_used()):
        await q.wait_call()


async def pause(fe: VhostUserFrontend) -> None:
    """QMP stop/cont: the rings stop and restart where vdev said they stopped."""
    await fe.stop()
    await fe.start()


async def test_virtio_balloon_pause_keeps_reboot_forgets(vdev_inproc: Any, guest_ram: Any) -> None:
    server, registry = await vdev_inproc(device="virtio-balloon")
    ram = guest_ram(64 * MiB)
    pfns = np.arange(FIRST, FIRST + N, dtype=np.uint64)
    with trio.fail_after(20):
        async with connect_frontend(server.socket_paths[0], ram) as fe:
            ram.fill(PFN_GPA, 4096, 0xFF)  # the buffer page: allocated from the start
            ram.fill(FIRST * 4096, N * 4096, 0x5A)  # the guest used those pages
            before = ram.allocated_bytes()
            await tell_host(fe, 0, pfns)
            view = registry.view("vm0")
            assert view.size_pages == N and before - ram.allocated_bytes() == N * 4096

            await pause(fe)
            view = registry.view("vm0")
            assert view.size_pages == N and view.counters["resets"] == 0

            with pytest.raises(ConfigError, match="set the target to 0"):
                registry.demand_reset("vm0")  # the guest still holds its pages: refused
            assert registry.view("vm0").size_pages == N

            await fe.reboot()
            view = registry.view("vm0")
            assert view.size_pages == 0 and view.counters["resets"] == 1
            assert view.counters["forgotten (4k)"] == N and view.counters["actual"] == 0
            assert view.driver_active

            # the rebooted guest uses those pages, then balloons them: punched again
            ram.fill(FIRST * 4096, N * 4096, 0x3C)
            before = ram.allocated_bytes()
            await tell_host(fe, 0, pfns)
            view = registry.view("vm0")
            assert view.size_pages == N and before - ram.allocated_bytes() == N * 4096
            assert view.counters["inflate ignored: already in balloon"] == 0
            assert ram.read(FIRST * 4096, 4096) == bytes(4096)


async def test_vmw_pause_keeps_reboot_demands_a_reset(vdev_inproc: Any, guest_ram: Any) -> None:
    with trio.fail_after(20):
        async with started_vmw(vdev_inproc, guest_ram, N) as (fe, ch, registry):
            assert (await ch.call(Command.LOCK, FIRST)).status == Status.SUCCESS
            assert registry.view("vm0").size_pages == 1

            await pause(fe)
            assert (await ch.call(Command.GET_TARGET)).status == Status.SUCCESS
            assert registry.view("vm0").size_pages == 1

            await fe.reboot()
            assert registry.view("vm0").size_pages == 0
            assert (await ch.call(Command.GET_TARGET)).status == Status.ERROR_RESET
            start = await ch.call(Command.START, int(ALL_CAPABILITIES))
            assert start.status == Status.SUCCESS_WITH_CAPABILITIES
            assert (await ch.call(Command.LOCK, FIRST)).status == Status.SUCCESS  # anew
            assert registry.view("vm0").size_pages == 1


async def test_vdev_reset_of_a_virtio_balloon_guest_is_refused_saying_why(
    tmp_path: Path, guest_ram: Any
) -> None:
    """``vdev reset`` / ``POST /vms/vm0/reset`` through a real ``vdev serve``: 409 and a
    message that says what to do instead; the CLI fails with it; the balloon is untouched."""
    ram = guest_ram(64 * MiB)
    with trio.fail_after(30):
        async with (
            vdev_serve(tmp_path, device="virtio-balloon") as vdev,
            connect_frontend(str(vdev.socket_path), ram) as fe,
        ):
            await tell_host(fe, 0, np.arange(FIRST, FIRST + N, dtype=np.uint64))
            with pytest.raises(ApiError, match="set the target to 0") as refused:
                await vdev.reset()
            assert refused.value.status == 409
            argv = [sys.executable, "-m", "vdev", "reset", "vm0"]
            done = await trio.run_process(
                [*argv, "--api-socket", str(vdev.api_socket)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert done.returncode != 0
            assert b"set the target to 0" in done.stderr
            assert (await vdev.vm())["size_pages"] == N
