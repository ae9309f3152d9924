"""Free page reporting with a real Linux guest: memory the guest frees goes back to the host
without any balloon target.

The guest (Debian 6.12, QEMU under TCG) binds its virtio_balloon driver to vdev's
``virtio-balloon-reporting`` personality (REPORTING offered, four queues); it writes 200 MiB
into tmpfs and deletes it; Linux's page reporting hands the freed 2 MiB blocks to vdev,
which punches them out of the guest's RAM memfd. Proof on the host: the RAM file's allocated
bytes (st_blocks) and QEMU's RssShmem fall.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from lab.linux_guest import MIB, boot_guest, serve_vdev
from protocol import virtio_balloon as vb
from protocol.units import PAGES_PER_MIB
from vdev.devices.virtio_balloon import VirtioBalloonReportingDevice

FREED_MIB = 200
MUST_RETURN_MIB = 150


async def test_reported_free_pages_go_back_to_the_host(
    linux_env: tuple[Any, Any], tmp_path: Path
) -> None:
    q, image = linux_env
    cls = VirtioBalloonReportingDevice
    with trio.fail_after(240):
        async with (
            serve_vdev(q.scratch_dir("vbr-"), device_cls=cls) as vdev,
            boot_guest(
                q,
                image,
                vdev.socket_path,
                ram_mib=384,
                append="vb.interval=100000",
                num_queues=cls.num_queues,
            ) as guest,
        ):
            rep = await guest.report()
            balloon = rep.balloon
            assert balloon is not None and balloon.has_feature(5), balloon  # REPORTING
            assert vdev.view().capabilities & vb.Feature.PAGE_REPORTING
            await guest.workload(FREED_MIB)
            held = int(vdev.view().ram_allocated_bytes)
            await guest.workload(0)
            t0 = time.monotonic()
            with trio.fail_after(60):
                while held - int(vdev.view().ram_allocated_bytes) < MUST_RETURN_MIB * MIB:
                    await trio.sleep(0.2)
            took = time.monotonic() - t0
            view = vdev.view()
            returned = held - int(view.ram_allocated_bytes)
            print(
                f"freed {FREED_MIB} MiB in the guest: {returned / MIB:.0f} MiB back in {took:.1f}s"
            )
            assert view.target_pages == 0 and view.size_pages == 0  # no balloon involved
            assert view.counters["reported (4k)"] >= MUST_RETURN_MIB * PAGES_PER_MIB
            assert view.counters["report buffers"] > 0
            assert view.counters["report ignored: not RAM"] == 0
            # the guest still works and may use the memory again (zero pages on next touch)
            assert await guest.workload(FREED_MIB) == FREED_MIB
            assert (await guest.vmstat("oom_kill")).get("oom_kill", 0) == 0
