"""Reclaim planning: vectorised and merging, and many scattered runs reclaimed in a
worker thread."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import trio
from server_helpers import (
    MiB,
)

from vdev.memory import GuestMemory, RegionSpec


def test_plan_is_vectorised_and_merges(tmp_path) -> None:
    fd = os.memfd_create("plan")
    os.ftruncate(fd, 256 * MiB)
    mem = GuestMemory("t")
    try:
        mem.set_table(
            [RegionSpec(0, 32 * MiB, 0x7000_0000_0000, 0), RegionSpec(64 * MiB, 128 * MiB, 0x7000_1000_0000, 32 * MiB)],
            [fd, os.dup(fd)],
        )  # fmt: skip
        r0, _ = mem.regions
        starts = np.array([5, 3, 4, 8000, 8191, 16384, 2**60], np.uint64)
        counts = np.array([1, 1, 1, 2, 2, 3, 5], np.uint64)
        pieces = [
            (r, o, n)
            for r, offs, lens in mem._plan(starts, counts)
            for o, n in zip(offs.tolist(), lens.tolist(), strict=True)
        ]
        assert [(r is r0, o // 4096, n // 4096) for r, o, n in pieces] == [
            (True, 3, 3),
            (True, 8000, 2),
            (True, 8191, 1),
            (False, 0, 3),
        ]
        pfns = np.arange(0, 16384 + 32768, 2, dtype=np.uint64)  # scattered pages
        plan = mem._plan(pfns, np.ones_like(pfns))
        assert [len(offs) for _, offs, _ in plan] == [4096, 16384]
    finally:
        mem.close()


async def test_many_scattered_runs_reclaim_in_a_thread(monkeypatch) -> None:
    fd = os.memfd_create("scatter")
    os.ftruncate(fd, 64 * MiB)
    mem = GuestMemory("t")
    mem.set_table([RegionSpec(0, 64 * MiB, 0x7000_0000_0000, 0)], [fd])
    used: list[bool] = []
    planned_in: list[bool] = []  # planning thousands of runs is work too: in the thread
    real, real_plan = trio.to_thread.run_sync, GuestMemory._plan
    main = threading.get_ident()

    async def spy(fn: Any, *args: Any, **kw: Any) -> Any:
        used.append(True)
        return await real(fn, *args, **kw)

    def plan_spy(self: GuestMemory, *args: Any) -> Any:
        planned_in.append(threading.get_ident() == main)
        return real_plan(self, *args)

    monkeypatch.setattr(GuestMemory, "_plan", plan_spy)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    try:
        with trio.fail_after(10):
            pfns = np.arange(0, 8192, 2, dtype=np.uint64)  # 16 MiB in 4096 runs
            await mem.reclaim_async(pfns, np.ones_like(pfns))
            assert used == [True] and planned_in == [False]
            assert mem.reclaimed_bytes_total == 4096 * 4096
            await mem.reclaim_async(np.array([0], np.uint64), np.array([16], np.uint64))
            assert used == [True] and planned_in == [False, True]  # small: inline
    finally:
        mem.close()


# ------------------------------------------------------------------------------ fd leaks
