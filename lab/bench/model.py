"""Protocol overhead without I/O: the device model alone (``BalloonModel.handle``).

A ``BytearrayRam`` guest (sparse; only the batch page is ever written) and a model that has
granted every capability. Each measured call is one BATCHED_*LOCK of 512 entries written by
the "guest" into the batch page just before (the write is not timed); fresh PFNs every
time, so every entry succeeds and the model really sets bits and coalesces runs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from lab.bench.system import GIB
from protocol.units import PAGE_SHIFT
from protocol.vmw import (
    ALL_CAPABILITIES,
    BATCH_MAX_ENTRIES,
    PAGES_PER_2M,
    Command,
    Request,
    Status,
    build_batch,
)
from vdev.balloon import BalloonModel, Reclaim
from vdev.ram import BytearrayRam

BATCH_PFN = 1


def _fresh(ram_bytes: int) -> tuple[BalloonModel, BytearrayRam]:
    ram = BytearrayRam([(0, ram_bytes)], record=False)
    model = BalloonModel(target=ram_bytes >> PAGE_SHIFT)
    out = model.handle(Request(int(Command.START), int(ALL_CAPABILITIES)), ram)
    assert out.response.status == Status.SUCCESS_WITH_CAPABILITIES
    return model, ram


def _pfn_batches(kind: str, batches: int, n: int) -> list[np.ndarray[Any, np.dtype[np.uint64]]]:
    first = PAGES_PER_2M  # stay clear of the batch page's frame
    out = []
    for i in range(batches):
        if kind == "2M":
            base = first + i * n * PAGES_PER_2M
            pfns = base + np.arange(n, dtype=np.uint64) * PAGES_PER_2M
        elif kind == "4K-contiguous":
            pfns = first + i * n + np.arange(n, dtype=np.uint64)
        else:  # scattered: every other page
            pfns = first + 2 * (i * n + np.arange(n, dtype=np.uint64))
        out.append(pfns.astype(np.uint64))
    return out


def batched_lock(kind: str, *, batches: int, n: int = BATCH_MAX_ENTRIES) -> dict[str, Any]:
    """Batched LOCK (and then UNLOCK) calls of ``n`` entries per second, model only."""
    huge = kind == "2M"
    pages_per_entry = PAGES_PER_2M if huge else 1
    span = (batches * n * pages_per_entry * (2 if kind == "4K-scattered" else 1)) + 2 * PAGES_PER_2M
    ram_bytes = -(-span // PAGES_PER_2M) * PAGES_PER_2M << PAGE_SHIFT
    model, ram = _fresh(ram_bytes)
    lock = Command.BATCHED_2M_LOCK if huge else Command.BATCHED_LOCK
    unlock = Command.BATCHED_2M_UNLOCK if huge else Command.BATCHED_UNLOCK
    gpa = BATCH_PFN << PAGE_SHIFT
    pfn_lists = _pfn_batches(kind, batches, n)
    pages = [build_batch(p) for p in pfn_lists]
    runs = 0
    lock_times: list[float] = []
    for page in pages:
        ram.write(gpa, page)
        t = time.perf_counter()
        out = model.handle(Request(int(lock), BATCH_PFN, n), ram)
        lock_times.append(time.perf_counter() - t)
        assert out.response.status == Status.SUCCESS
        runs += sum(len(e.pfn_starts) for e in out.effects if isinstance(e, Reclaim))
    locked = model.size
    unlock_times: list[float] = []
    for page in pages:
        ram.write(gpa, page)
        t = time.perf_counter()
        out = model.handle(Request(int(unlock), BATCH_PFN, n), ram)
        unlock_times.append(time.perf_counter() - t)
    ok = locked == batches * n * pages_per_entry and model.size == 0
    lock_s = sum(lock_times)
    unlock_s = sum(unlock_times)
    return {
        "kind": kind,
        "entries_per_batch": n,
        "batches": batches,
        "lock_batches_per_s": batches / lock_s,
        "lock_entries_per_s": batches * n / lock_s,
        "lock_gib_per_s": batches * n * pages_per_entry / lock_s * 4096 / GIB,
        "lock_us_p50": statistics.median(lock_times) * 1e6,
        "unlock_batches_per_s": batches / unlock_s,
        "unlock_entries_per_s": batches * n / unlock_s,
        "reclaim_runs_per_batch": runs / batches,
        "all_entries_succeeded": bool(ok),
    }


def get_target(*, calls: int) -> dict[str, Any]:
    model, ram = _fresh(GIB)
    req = Request(int(Command.GET_TARGET), GIB >> PAGE_SHIFT)
    t = time.perf_counter()
    for _ in range(calls):
        model.handle(req, ram)
    dt = time.perf_counter() - t
    # the whole frame path: parse the 24 request bytes, handle, build the response
    raw = req.build()
    t = time.perf_counter()
    for _ in range(calls):
        model.answer_frame(raw, 24, ram)
    dt_frame = time.perf_counter() - t
    return {
        "calls": calls,
        "handle_per_s": calls / dt,
        "answer_frame_per_s": calls / dt_frame,
    }


def measure(*, batches: int = 400, calls: int = 20000) -> dict[str, Any]:
    return {
        "batched_lock": {
            kind: batched_lock(kind, batches=batches)
            for kind in ("2M", "4K-contiguous", "4K-scattered")
        },
        "get_target": get_target(calls=calls),
    }
