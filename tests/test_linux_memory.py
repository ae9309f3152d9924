"""The in-guest page source on this machine's own kernel (root: pagemap gives frames).

Real pages, real mlock, real /proc/self/pagemap: what ``guest-driver run-linux`` does inside
a guest, checked where it runs fastest. The frames must be present, distinct, stable, and
every page freed must be unmapped (the process's locked memory falls back)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from guest_driver.guest_memory import PAGES_PER_2M, PageSize
from guest_driver.linux_memory import (
    GuestMemoryError,
    LinuxPageSource,
    LockedPages,
    Pagemap,
    meminfo,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pagemap frames need root")


def vm_locked_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck")


@pytest.fixture
def source() -> tuple[LinuxPageSource, LockedPages]:
    pm = Pagemap()
    locked = LockedPages(pm, pages=8)
    yield LinuxPageSource(pm, locked), locked
    locked.close()
    pm.close()


def test_locked_pages_are_a_memory_port(source: tuple[LinuxPageSource, LockedPages]) -> None:
    import trio

    src, locked = source
    gpa = locked.alloc(4096)
    assert gpa % 4096 == 0 and gpa > 0
    assert src.batch_pfn is not None and src.batch_pfn * 4096 != gpa

    async def main() -> None:
        await locked.write(gpa + 100, b"vmw")
        assert await locked.read(gpa + 100, 3) == b"vmw"
        with pytest.raises(GuestMemoryError, match="not inside one of our pages"):
            await locked.read(gpa + 4000, 200)  # crosses into a page that is not contiguous
        with pytest.raises(GuestMemoryError):
            await locked.read(12345 * 4096, 4)

    trio.run(main)
    with pytest.raises(GuestMemoryError, match="do not fit one page"):
        locked.alloc(8192)
    assert not locked.moved()


def test_4k_pages_have_distinct_frames_and_are_freed(
    source: tuple[LinuxPageSource, LockedPages],
) -> None:
    src, _ = source
    base = vm_locked_kib()
    pfns = src.alloc_balloon(PageSize.SIZE_4K, 2048)
    assert pfns.size == 2048
    assert (pfns > 0).all() and np.unique(pfns).size == 2048
    assert vm_locked_kib() - base == 2048 * 4
    assert src.ballooned_pages == 2048
    assert src.moved() == 0
    # free every other page of the first half, then the rest: runs are unmapped, not pages
    src.free_balloon(PageSize.SIZE_4K, pfns[:1024:2])
    assert src.ballooned_pages == 1536
    assert vm_locked_kib() - base == 1536 * 4
    with pytest.raises(GuestMemoryError, match="not ours"):
        src.free_balloon(PageSize.SIZE_4K, pfns[:2])  # already freed
    src.free_balloon(PageSize.SIZE_4K, np.concatenate([pfns[1:1024:2], pfns[1024:]]))
    assert src.ballooned_pages == 0
    assert vm_locked_kib() == base


def test_2m_pages_are_real_huge_pages_or_refused(
    source: tuple[LinuxPageSource, LockedPages],
) -> None:
    src, _ = source
    firsts = src.alloc_balloon(PageSize.SIZE_2M, 4)
    assert firsts.size + src.refused_huge == 4
    assert (firsts % PAGES_PER_2M == 0).all()
    src.free_balloon(PageSize.SIZE_2M, firsts)
    assert src.ballooned_pages == 0


def test_meminfo_has_what_the_runner_reads() -> None:
    m = meminfo()
    assert m["MemTotal"] > m["MemAvailable"] > 0
