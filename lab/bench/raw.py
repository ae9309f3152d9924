"""The physical limits, measured in the same run as the cases they are compared with.

* **contiguous**: a shared memfd whose pages were all written first (one byte per page, so
  each page is really allocated and mapped, as a guest's would be), then given back in large
  ranges: ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` and ``madvise(MADV_REMOVE)`` of the whole
  region in one call and in 2 MiB calls. The limit is the fastest of the four (the largest
  denominator, so the ratios are conservative).
* **per page**: the same, but one ``madvise(MADV_REMOVE)`` per 4 KiB page from a Python
  loop, what a device without coalescing could do at best. ``fallocate`` per page is
  measured alongside for reference.
* **compiled** (:mod:`.limits`): both again from a small C helper built at bench time, so the
  figures are the kernel's and not Python's; the ratios use these when a compiler is there.

Every variant checks with ``st_blocks`` that the region really was allocated before and
freed after.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lab.bench import limits
from lab.bench.system import GIB, MIB, allocated_bytes
from protocol.units import PAGE_SIZE
from vdev.memory import punch_hole

MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)


@dataclass
class Memfd:
    fd: int
    size: int
    mm: mmap.mmap
    u8: np.ndarray[Any, np.dtype[np.uint8]]

    def touch(self, offset: int = 0, length: int | None = None) -> float:
        """Write one byte in every page of the range; returns the seconds it took."""
        length = self.size - offset if length is None else length
        t = time.perf_counter()
        self.u8[offset : offset + length : PAGE_SIZE] = 0xA5
        return time.perf_counter() - t

    @property
    def allocated(self) -> int:
        return allocated_bytes(self.fd)


@contextlib.contextmanager
def memfd(size: int, name: str = "vballoon-bench-raw") -> Iterator[Memfd]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            u8 = np.frombuffer(mm, dtype=np.uint8)
            try:
                yield Memfd(fd, size, mm, u8)
            finally:
                del u8
        finally:
            with contextlib.suppress(BufferError):
                mm.close()
    finally:
        os.close(fd)


def _variant(m: Memfd, reps: int, reclaim: Callable[[Memfd], int]) -> dict[str, Any]:
    """Touch, check st_blocks, time ``reclaim`` (returns bytes given back), check again."""
    rates: list[float] = []
    verified = True
    for _ in range(reps):
        with contextlib.suppress(OSError):
            punch_hole(m.fd, 0, m.size)
        m.touch()
        before = m.allocated
        t = time.perf_counter()
        nbytes = reclaim(m)
        dt = time.perf_counter() - t
        after = m.allocated
        verified &= before >= m.size and before - after >= nbytes
        rates.append(nbytes / PAGE_SIZE / dt)
    pages_s = statistics.median(rates)
    return {
        "pages_per_s": pages_s,
        "gib_per_s": pages_s * PAGE_SIZE / GIB,
        "samples_pages_per_s": rates,
        "verified_st_blocks": bool(verified),
    }


def _fallocate(chunk: int | None) -> Callable[[Memfd], int]:
    def run(m: Memfd) -> int:
        step = chunk or m.size
        for off in range(0, m.size, step):
            punch_hole(m.fd, off, min(step, m.size - off))
        return m.size

    return run


def _madvise(chunk: int | None) -> Callable[[Memfd], int]:
    def run(m: Memfd) -> int:
        step = chunk or m.size
        for off in range(0, m.size, step):
            m.mm.madvise(MADV_REMOVE, off, min(step, m.size - off))
        return m.size

    return run


def _per_page_madvise(pages: int) -> Callable[[Memfd], int]:
    def run(m: Memfd) -> int:
        madvise = m.mm.madvise
        for off in range(0, pages * PAGE_SIZE, PAGE_SIZE):
            madvise(MADV_REMOVE, off, PAGE_SIZE)
        return pages * PAGE_SIZE

    return run


def _per_page_fallocate(pages: int) -> Callable[[Memfd], int]:
    def run(m: Memfd) -> int:
        fd = m.fd
        for off in range(0, pages * PAGE_SIZE, PAGE_SIZE):
            punch_hole(fd, off, PAGE_SIZE)
        return pages * PAGE_SIZE

    return run


def measure(*, size: int = GIB, per_page_pages: int = 1 << 17, reps: int = 3) -> dict[str, Any]:
    """Both limits; see the module docstring."""
    out: dict[str, Any] = {"region_bytes": size, "reps": reps}
    with memfd(size) as m:
        contiguous = {
            "fallocate_whole": _variant(m, reps, _fallocate(None)),
            "fallocate_2MiB": _variant(m, reps, _fallocate(2 * MIB)),
            "madvise_whole": _variant(m, reps, _madvise(None)),
            "madvise_2MiB": _variant(m, reps, _madvise(2 * MIB)),
        }
        touch_s = m.touch()
    best = max(contiguous, key=lambda k: contiguous[k]["pages_per_s"])
    out["contiguous"] = {
        "variants": contiguous,
        "best": best,
        "pages_per_s": contiguous[best]["pages_per_s"],
        "gib_per_s": contiguous[best]["gib_per_s"],
        "verified_st_blocks": all(v["verified_st_blocks"] for v in contiguous.values()),
    }
    out["touch_gib_per_s"] = size / GIB / touch_s if touch_s > 0 else None
    pp_size = per_page_pages * PAGE_SIZE
    with memfd(pp_size) as m:
        madv = _variant(m, reps, _per_page_madvise(per_page_pages))
        fall = _variant(m, reps, _per_page_fallocate(per_page_pages))
    out["per_page"] = {
        "pages": per_page_pages,
        "madvise": madv,
        "fallocate": fall,
        "pages_per_s": madv["pages_per_s"],
        "gib_per_s": madv["gib_per_s"],
        "verified_st_blocks": madv["verified_st_blocks"] and fall["verified_st_blocks"],
    }
    out["compiled"] = limits.measure(size=size, per_page_pages=per_page_pages, reps=reps)
    return out
