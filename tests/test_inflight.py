"""Several vmmemctl commands in flight on the cmdq: vdev answers each LOCK only after its
pages are gone, and plans the reclaims of the batches one kick finds as one punch (runs
adjacent across batches merge); a punch running in the worker thread holds back its own
answers and every later one (PROTOCOL.md section 2)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import vdev.connection
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
    real = GuestMemory._plan

    def spy(self: GuestMemory, starts: Any, counts: Any, regions: Any = None) -> Any:
        plans = real(self, starts, counts, regions)
        pieces = [lens.tolist() for _, _, lens in plans]  # the kernel calls
        calls.append((np.asarray(starts).tolist(), np.asarray(counts).tolist(), pieces))
        return plans

    monkeypatch.setattr(GuestMemory, "_plan", spy)
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


async def test_pipelined_punch_holds_back_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LOCK whose punch runs in the worker thread (held there by the test) is not answered,
    nor is a GET_TARGET queued after it, until the punch returns; then both, in ring order."""
    monkeypatch.setattr(vdev.connection, "PIPELINE_MIN_PAGES", 1)
    entered, release = threading.Event(), threading.Event()
    threads: list[str] = []
    real = GuestMemory._punch

    def held(plans: Any) -> int:
        threads.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(10)
        return real(plans)

    monkeypatch.setattr(GuestMemory, "_punch", staticmethod(held))
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
                first, n, bp = FREE_START_PFN, 256, 0x100
                touch(g.fe.ram, first, n)
                before = g.fe.ram.allocated_bytes()
                await g.fe.mem.write(bp * PAGE, vmw.build_batch(list(range(first, first + n))))
                lock_req, target_req = slot_gpa(0, 0), slot_gpa(0, 1)
                await g.fe.mem.write(lock_req, vmw.Request(C.BATCHED_LOCK, bp, n).build())
                await g.fe.mem.write(target_req, vmw.Request(C.GET_TARGET, 8192).build())
                lock_head = await g.cmdq.ring.add(
                    [
                        Buffer(lock_req, vmw.REQUEST_SIZE),
                        Buffer(lock_req + 32, vmw.RESPONSE_SIZE, write=True),
                    ]
                )
                g.cmdq.kick_now()
                assert await trio.to_thread.run_sync(entered.wait, 10)  # the punch is held
                target_head = await g.cmdq.ring.add(
                    [
                        Buffer(target_req, vmw.REQUEST_SIZE),
                        Buffer(target_req + 32, vmw.RESPONSE_SIZE, write=True),
                    ]
                )
                assert await g.fe.settle(g.cmdq, 0.3) == []  # nothing answered meanwhile
                assert g.fe.ram.allocated_bytes() == before  # and the pages are still there
                release.set()
                used = await g.fe.wait_used(g.cmdq, count=2)
                assert [u.id for u in used] == [lock_head, target_head]  # ring order
                assert before - g.fe.ram.allocated_bytes() >= n * PAGE
                lock = vmw.Response.parse(await g.fe.mem.read(lock_req + 32, vmw.RESPONSE_SIZE))
                assert lock.status == S.SUCCESS
                target = vmw.Response.parse(
                    await g.fe.mem.read(target_req + 32, vmw.RESPONSE_SIZE)
                )
                assert target.status == S.SUCCESS and target.result == 4096
                assert threads and threads[0] != threading.main_thread().name
            finally:
                release.set()
                g.close()
                nursery.cancel_scope.cancel()
