"""`vdev serve` as a separate process, driven by our front-end over a real unix socket."""

from __future__ import annotations

import numpy as np
import trio

from guest_driver.frontend import VmwChannel, connect_frontend
from protocol.units import PAGE_SIZE
from protocol.vhost_user import FrontendRequest
from protocol.vmw import (
    ALL_CAPABILITIES,
    Command,
    EventKind,
    GuestType,
    Request,
    Status,
    batch_entries,
    build_batch,
    entry_statuses,
)

MiB = 1 << 20
BATCH_PFN = 0x300  # gpa 3 MiB: the batch page
DATA_PFN = 0x400  # gpa 4 MiB: pages we lock


async def start_balloon(ch: VmwChannel) -> None:
    r = await ch.call(Command.START, int(ALL_CAPABILITIES))
    assert r.status == Status.SUCCESS_WITH_CAPABILITIES
    assert r.capabilities == int(ALL_CAPABILITIES)
    assert (await ch.call(Command.GUEST_ID, GuestType.LINUX)).status == Status.SUCCESS


async def test_end_to_end(vdev_process, guest_ram) -> None:
    srv = vdev_process(target="4M")
    ram = guest_ram(64 * MiB)
    with trio.fail_after(20):
        async with connect_frontend(srv.paths[0], ram) as fe:
            ch = VmwChannel(fe)
            # a new connection demands a reset
            assert (await ch.call(Command.GET_TARGET)).status == Status.ERROR_RESET
            await start_balloon(ch)
            r = await ch.call(Command.GET_TARGET, ram.total_pages)
            assert (r.status, r.result) == (Status.SUCCESS, 4 * MiB // PAGE_SIZE)

            # fill RAM where we will lock, then lock 512 4 KiB pages in one batch
            ram.fill(DATA_PFN * PAGE_SIZE, 4 * MiB, 0x5A)
            ram.fill(BATCH_PFN * PAGE_SIZE, PAGE_SIZE, 0)  # allocate the batch page now
            before = ram.allocated_bytes()
            pfns = np.arange(DATA_PFN, DATA_PFN + 512, dtype=np.uint64)
            resp, batch = await ch.command(
                Request(Command.BATCHED_LOCK, BATCH_PFN, 512), build_batch(pfns)
            )
            assert resp.status == Status.SUCCESS
            assert batch is not None
            assert (entry_statuses(batch_entries(batch, 512)) == 0).all()
            assert before - ram.allocated_bytes() == 512 * PAGE_SIZE  # reclaim is real

            # one 2 MiB page (pfn 0x600, 512-aligned)
            ram.fill(0x600 * PAGE_SIZE, 2 * MiB, 0x33)
            before = ram.allocated_bytes()
            resp, batch = await ch.command(
                Request(Command.BATCHED_2M_LOCK, BATCH_PFN, 1), build_batch([0x600])
            )
            assert resp.status == Status.SUCCESS
            assert entry_statuses(batch_entries(batch, 1)).tolist() == [0]
            assert before - ram.allocated_bytes() == 2 * MiB
            # over the target now: the next lock is not needed
            resp, batch = await ch.command(
                Request(Command.BATCHED_LOCK, BATCH_PFN, 2), build_batch([0x900, 0x901])
            )
            assert entry_statuses(batch_entries(batch, 2))[-1] == Status.ERROR_PPN_NOTNEEDED

            # unlock everything; the guest reads zeros there
            resp, batch = await ch.command(
                Request(Command.BATCHED_UNLOCK, BATCH_PFN, 512), build_batch(pfns)
            )
            assert resp.status == Status.SUCCESS
            assert (entry_statuses(batch_entries(batch, 512)) == 0).all()
            resp, batch = await ch.command(
                Request(Command.BATCHED_2M_UNLOCK, BATCH_PFN, 1), build_batch([0x600])
            )
            assert entry_statuses(batch_entries(batch, 1)).tolist() == [0]
            assert ram.read(DATA_PFN * PAGE_SIZE, 4 * MiB) == bytes(4 * MiB)
            assert ram.read(0x600 * PAGE_SIZE, 2 * MiB) == bytes(2 * MiB)

            # the rings are pinned
            resp, batch = await ch.command(
                Request(Command.BATCHED_LOCK, BATCH_PFN, 1), build_batch([0x100])
            )
            assert entry_statuses(batch_entries(batch, 1)).tolist() == [Status.ERROR_PPN_PINNED]

            # config space mirrors target / size
            cfg = await fe.get_config(0, 8)
            assert int.from_bytes(cfg[:4], "little") == 4 * MiB // PAGE_SIZE

            # doorbell: register, post buffers; a stop/restart keeps the balloon going
            r = await ch.call(Command.VMCI_DOORBELL_SET, 1, 2)
            assert r.status == Status.SUCCESS
            await ch.post_event_buffers(2)
            bases = await fe.stop()
            assert bases[0] == fe.queues[0].driver.avail_idx
            await fe.start()
            r = await ch.call(Command.GET_TARGET, ram.total_pages)
            assert r.status == Status.SUCCESS

            # RESET_DEVICE: forget, doorbell rings RESET once eventq is back, START needed
            await fe.request(FrontendRequest.RESET_DEVICE)
            for q in fe.queues:
                q.started = False
            await fe.start()
            assert await ch.next_event() == EventKind.RESET
            assert (await ch.call(Command.GET_TARGET)).status == Status.ERROR_RESET
            await start_balloon(ch)
        # disconnect and reconnect: a fresh guest, reset demanded again
        async with connect_frontend(srv.paths[0], ram) as fe:
            ch = VmwChannel(fe)
            assert (await ch.call(Command.GET_TARGET)).status == Status.ERROR_RESET
            await start_balloon(ch)
            resp = await ch.call(Command.LOCK, DATA_PFN)
            assert resp.status == Status.SUCCESS
            resp = await ch.call(Command.UNLOCK, DATA_PFN)
            assert resp.status == Status.SUCCESS
    assert srv.alive()
    assert srv.stop() == 0
    log = srv.log()
    assert "front-end disconnected" in log
    assert "Traceback" not in log


async def test_capabilities_and_usage(tmp_path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "vdev", "serve", "--print-capabilities"],
        capture_output=True,
        check=True,
        timeout=20,
    )
    assert out.stdout.strip() == b'{"type": "balloon"}'
    bad = subprocess.run([sys.executable, "-m", "vdev", "serve"], capture_output=True, timeout=20)
    assert bad.returncode == 2  # a usage error, named
    assert b"give exactly one of --socket-path and --fd" in bad.stderr, bad.stderr
