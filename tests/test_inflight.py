"""Several vmmemctl commands in flight on the cmdq: vdev answers each LOCK only after its
pages are gone, and plans the reclaims of the batches one kick finds as one punch (runs
adjacent across batches merge)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from conformance.rawfrontend import FREE_START_PFN, PAGE, Buffer, VmwGuest, slot_gpa, touch
from protocol import vmw
from vdev.memory import GuestMemory
from vdev.registry import GuestRegistry
from vdev.server import Server

C, S = vmw.Command, vmw.Status


async def test_two_lock_batches_in_one_kick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[int], list[int], list[list[int]]]] = []
    real = GuestMemory.reclaim_async

    async def spy(self: GuestMemory, starts: Any, counts: Any) -> int:
        pieces = [lens.tolist() for _, _, lens in self._plan(starts, counts)]  # kernel calls
        calls.append((np.asarray(starts).tolist(), np.asarray(counts).tolist(), pieces))
        return await real(self, starts, counts)

    monkeypatch.setattr(GuestMemory, "reclaim_async", spy)
    from vdev.devices.vmw import VmwDevice

    registry = GuestRegistry(VmwDevice.name, target=4096)
    path = tmp_path / "vmw.sock"
    server = Server(registry, VmwDevice, socket_paths=[str(path)])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            g = await VmwGuest.attach(str(path))
            try:
                assert (await g.start()).status == S.SUCCESS_WITH_CAPABILITIES
                first, n = FREE_START_PFN, 256
                touch(g.fe.ram, first, 2 * n)
                before = g.fe.ram.allocated_bytes()
                batch_pages = [0x100, 0x101]  # two batch pages, one per command
                heads, resp_gpas = [], []
                for k, bp in enumerate(batch_pages):
                    pfns = range(first + k * n, first + (k + 1) * n)
                    await g.fe.mem.write(bp * PAGE, vmw.build_batch(list(pfns)))
                    req_gpa = slot_gpa(0, k)
                    resp_gpa = req_gpa + 32
                    await g.fe.mem.write(req_gpa, vmw.Request(C.BATCHED_LOCK, bp, n).build())
                    bufs = [
                        Buffer(req_gpa, vmw.REQUEST_SIZE),
                        Buffer(resp_gpa, vmw.RESPONSE_SIZE, write=True),
                    ]
                    heads.append(await g.cmdq.ring.add(bufs))
                    resp_gpas.append(resp_gpa)
                used = await g.fe.wait_used(g.cmdq, count=2)  # one kick for both
                assert sorted(u.id for u in used) == sorted(heads)
                for resp_gpa in resp_gpas:
                    resp = vmw.Response.parse(await g.fe.mem.read(resp_gpa, vmw.RESPONSE_SIZE))
                    assert resp.status == S.SUCCESS
                # both answered, both batches punched, in one reclaim whose two runs
                # (one per batch, adjacent) went to the kernel as one 2 MiB punch
                assert before - g.fe.ram.allocated_bytes() >= 2 * n * PAGE
                assert calls == [([first, first + n], [n, n], [[2 * n * PAGE]])]
            finally:
                g.close()
                nursery.cancel_scope.cancel()
