"""GuestMemory over a real memfd: translation, bounds, the GuestRam protocol, reclaim."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np
import pytest
import trio

import vdev.memory
from protocol.errors import FrontendError, GuestError, HostResourceError
from protocol.units import PAGE_SIZE
from vdev.memory import GuestMemory, RegionSpec, close_regions

MiB = 1 << 20
UVA = 0x7F00_0000_0000


def qemu_like(memfd: int, size: int) -> tuple[list[RegionSpec], list[int]]:
    """QEMU's low-RAM layout with the two ROM holes, three dups of one memfd."""
    specs = [
        RegionSpec(0x0, 0xC0000, UVA, 0x0),
        RegionSpec(0xE0000, 0x10000, UVA + 0xE0000, 0xE0000),
        RegionSpec(0x100000, size - 0x100000, UVA + 0x100000, 0x100000),
    ]
    return specs, [os.dup(memfd) for _ in specs]


@pytest.fixture
def memfd():
    fd = os.memfd_create("test-ram")
    os.ftruncate(fd, 16 * MiB)
    yield fd
    os.close(fd)


@pytest.fixture
def mem(memfd):
    m = GuestMemory("t")
    m.set_table(*qemu_like(memfd, 16 * MiB))
    yield m
    m.close()


def test_translation_and_bounds(mem: GuestMemory) -> None:
    assert mem.total_pages == (16 * MiB - 0x100000) // PAGE_SIZE + 0xC0 + 0x10
    mem.write(0x200000, b"hello")
    assert mem.read(0x200000, 5) == b"hello"
    assert mem.qva_to_gpa(UVA + 0x200000, 16) == 0x200000
    with pytest.raises(GuestError):
        mem.read(0xC0000, 1)  # the hole
    with pytest.raises(GuestError):
        mem.read(0xBFFFF, 2)  # straddles region end
    with pytest.raises(GuestError):
        mem.read((1 << 64) - 4, 8)  # overflow
    with pytest.raises(GuestError):
        mem.write(16 * MiB - 2, b"abc")
    with pytest.raises(FrontendError):
        mem.qva_to_gpa(UVA + 0xC0000, 8)
    mem.store_u16(0x300002, 0xBEEF)
    assert mem.load_u16(0x300002) == 0xBEEF
    with pytest.raises(GuestError):
        mem.load_u16(0x300001)


def test_pfn_mask(mem: GuestMemory) -> None:
    pfns = np.array([0, 0xBF, 0xC0, 0xDF, 0xE0, 0xEF, 0xF0, 0x100, 0xFFF, 0x1000, 2**52], np.uint64)
    assert mem.ram_pfn_mask(pfns, 1).tolist() == [
        True,
        True,
        False,
        False,
        True,
        True,
        False,
        True,
        True,
        False,
        False,
    ]
    two_m = np.array([0, 512, 512 * 7, 512 * 8], np.uint64)
    # 2 MiB at pfn 0 straddles the hole; 512 is inside region 2; 512*8 is past the end
    assert mem.ram_pfn_mask(two_m, 512).tolist() == [False, True, True, False]
    big = np.array([2**64 - 1], np.uint64)
    assert mem.ram_pfn_mask(big, 512).tolist() == [False]


def test_reclaim_punches_the_file(mem: GuestMemory, memfd: int) -> None:
    mem.write(0x400000, b"\x5a" * (4 * MiB))
    before = os.fstat(memfd).st_blocks * 512
    assert mem.allocated_bytes() == before >= 4 * MiB
    n = mem.reclaim(np.array([0x400], np.uint64), np.array([1024], np.uint64))
    assert n == 4 * MiB
    assert before - os.fstat(memfd).st_blocks * 512 == 4 * MiB
    assert mem.read(0x400000, 8) == bytes(8)
    # clamped to regions: a run over the hole punches only RAM
    assert (
        mem.reclaim(np.array([0xB0], np.uint64), np.array([0x60], np.uint64))
        == (0x10 + 0x10 + 0x10) * PAGE_SIZE
    )


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_long_run_is_punched_exactly(
    mem: GuestMemory, memfd: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run longer than the native loop's 2 MiB fallocate chunk, starting and ending off any
    2 MiB boundary: every page of it is punched, none beside it."""
    if native and not vdev.memory.NATIVE_PUNCH:
        pytest.skip(vdev.memory.NATIVE_PUNCH_INFO)
    if not native:
        monkeypatch.setattr(vdev.memory, "_vb_punch", None)
    mem.write(0x100000, b"\x5a" * (15 * MiB))
    before = os.fstat(memfd).st_blocks * 512
    first, count = 0x203, 5 * 256 + 3  # 5 MiB + 12 KiB from an odd page
    assert mem.reclaim(np.array([first], np.uint64), np.array([count], np.uint64)) == (
        count * PAGE_SIZE
    )
    assert before - os.fstat(memfd).st_blocks * 512 == count * PAGE_SIZE
    end = (first + count) * PAGE_SIZE
    assert mem.read(first * PAGE_SIZE - PAGE_SIZE, PAGE_SIZE) == b"\x5a" * PAGE_SIZE
    assert mem.read(first * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert mem.read(end - PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert mem.read(end, PAGE_SIZE) == b"\x5a" * PAGE_SIZE


def test_native_punch_is_loaded() -> None:
    """scripts/setup builds the native reclaim loop; under CI its absence is a failure."""
    if not vdev.memory.NATIVE_PUNCH and os.environ.get("CI") != "true":
        pytest.skip(vdev.memory.NATIVE_PUNCH_INFO)
    assert vdev.memory.NATIVE_PUNCH, vdev.memory.NATIVE_PUNCH_INFO


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_scattered_reclaim_both_loops(
    mem: GuestMemory, memfd: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The native loop and the Python fallback punch exactly the same pages: isolated 4 KiB
    pages (madvise), a long run (fallocate), runs over the ROM hole and unsorted input."""
    if native and not vdev.memory.NATIVE_PUNCH:
        pytest.skip(vdev.memory.NATIVE_PUNCH_INFO)
    if not native:
        monkeypatch.setattr(vdev.memory, "_vb_punch", None)
    mem.write(0, b"\x11" * 0xC0000)
    mem.write(0xE0000, b"\x11" * 0x10000)
    mem.write(0x100000, b"\x5a" * (15 * MiB))
    before = os.fstat(memfd).st_blocks * 512
    odd = np.arange(0x401, 0xC01, 2, dtype=np.uint64)  # 1024 isolated pages
    starts = np.concatenate([odd[::-1], np.array([0xC00, 0xB0], np.uint64)])
    counts = np.concatenate([np.ones(1024, np.uint64), np.array([0x100, 0x60], np.uint64)])
    n = mem.reclaim(starts, counts)
    # the last odd page 0xBFF touches the run at 0xC00 (merged); 0xB0+0x60 covers the hole
    want = (1024 + 0x100 + 0x30) * PAGE_SIZE
    assert n == want and mem.reclaimed_bytes_total == want
    assert before - os.fstat(memfd).st_blocks * 512 == want
    assert mem.read(0x401000, 1) == b"\0" and mem.read(0x400000, 1) == b"\x5a"
    assert mem.read(0xCFF000, 1) == b"\0" and mem.read(0xD00000, 1) == b"\x5a"


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_punch_failure_names_the_call(
    memfd: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RAM file the kernel will not punch (a memfd sealed against writes): a host-side
    error naming the failing call and its errno, from either loop."""
    if native and not vdev.memory.NATIVE_PUNCH:
        pytest.skip(vdev.memory.NATIVE_PUNCH_INFO)
    if not native:
        monkeypatch.setattr(vdev.memory, "_vb_punch", None)
    import fcntl

    fd = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4 * MiB)
    m = GuestMemory("sealed")
    m.set_table([RegionSpec(0, 4 * MiB, UVA, 0)], [fd])
    try:
        m.write(0, b"\x01" * (4 * MiB))
        # F_SEAL_FUTURE_WRITE: our existing writable mapping stays, punching is refused
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x0010)
        with pytest.raises(HostResourceError, match=r"madvise\(MADV_REMOVE\) failed.*Errno 1\b"):
            m.reclaim(np.array([2], np.uint64), np.array([1], np.uint64))
        with pytest.raises(HostResourceError, match=r"fallocate\(PUNCH_HOLE\) failed.*Errno 1\b"):
            m.reclaim(np.array([0], np.uint64), np.array([1024], np.uint64))
        # isolated pages: one batched call in the native loop, refused; the error is named
        with pytest.raises(HostResourceError, match=r"madvise\(MADV_REMOVE\) failed.*Errno 1\b"):
            m.reclaim(np.arange(2, 64, 2, dtype=np.uint64), np.ones(31, np.uint64))
        assert m.allocated_bytes() == 4 * MiB
    finally:
        m.close()


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


def test_native_punch_batches_isolated_pages_and_stops_at_the_failing_one() -> None:
    """The native loop gives runs of isolated pages back in one ``process_madvise`` call
    (Linux >= 6.13 takes MADV_REMOVE for the calling process); when the kernel stops inside
    a batch, the pieces before are counted, and the failing piece is named with its errno."""
    if not vdev.memory.NATIVE_PUNCH:
        if os.environ.get("CI") == "true":
            pytest.fail(vdev.memory.NATIVE_PUNCH_INFO)
        pytest.skip(vdev.memory.NATIVE_PUNCH_INFO)
    fd = os.memfd_create("batch")
    size = 64 * PAGE_SIZE
    os.ftruncate(fd, 2 * size)
    mm = mmap.mmap(fd, 2 * size)
    try:
        mm[:size] = b"\x33" * size
        addr = vdev.memory._mapping_address(mm)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        assert libc.munmap(addr + size, size) == 0  # a hole after the mapping's first half
        fn = vdev.memory._vb_punch
        done, failed, call = ctypes.c_uint64(), ctypes.c_size_t(), ctypes.c_int()

        def punch(offsets: list[int]) -> int:
            moff = np.array(offsets, np.uint64)
            lens = np.full(moff.size, PAGE_SIZE, np.uint64)
            return int(
                fn(
                    addr,
                    fd,
                    0,
                    moff.ctypes.data,
                    lens.ctypes.data,
                    moff.size,
                    64 << 10,
                    ctypes.byref(done),
                    ctypes.byref(failed),
                    ctypes.byref(call),
                )
            )

        pages = [2 * i * PAGE_SIZE for i in range(16)]
        assert punch(pages) == 0 and done.value == 16 * PAGE_SIZE
        assert os.fstat(fd).st_blocks * 512 == size - 16 * PAGE_SIZE
        if _kernel_at_least(6, 13):
            assert vdev.memory.punch_batching() is True
        # the 4th piece lies past the mapping: 3 punched, then that piece's own error
        odd = [(2 * i + 1) * PAGE_SIZE for i in range(3)] + [size + 16 * PAGE_SIZE, 7 * PAGE_SIZE]
        err = punch(odd)
        assert err in (errno.ENOMEM, errno.EFAULT, errno.EINVAL), err
        assert (failed.value, done.value, call.value) == (3, 3 * PAGE_SIZE, 1)
        assert os.fstat(fd).st_blocks * 512 == size - 19 * PAGE_SIZE
        assert mm[7 * PAGE_SIZE] == 0x33  # after the failing piece: untouched
    finally:
        mm.close()
        os.close(fd)


async def test_reclaim_async_large_in_thread(memfd: int) -> None:
    os.ftruncate(memfd, 80 * MiB)
    m = GuestMemory("big")
    m.set_table(*qemu_like(memfd, 80 * MiB))
    with trio.fail_after(10):
        m.write(0x100000, b"\x01" * (70 * MiB))
        done = await m.reclaim_async(np.array([0x100], np.uint64), np.array([70 * 256], np.uint64))
    assert done == 70 * MiB
    assert m.reclaimed_bytes_total == 70 * MiB
    m.close()


def test_table_replacement_and_regions(memfd: int) -> None:
    m = GuestMemory("r")
    m.set_table(*qemu_like(memfd, 16 * MiB))
    spec = m.regions[1].spec
    assert m.remove_region(spec)
    assert not m.contains(0xE0000, 1)
    m.add_region(spec, os.dup(memfd))
    assert m.contains(0xE0000, 1)
    m.add_region(spec, os.dup(memfd))  # the identical region again replaces it
    assert len(m.regions) == 3
    with pytest.raises(FrontendError):  # an overlapping, different one is refused
        m.add_region(RegionSpec(0xE8000, 0x1000, UVA + 0xE8000, 0xE8000), os.dup(memfd))
    m.set_table([RegionSpec(0, 1 * MiB, UVA, 0)], [os.dup(memfd)])
    assert m.total_pages == 256
    with pytest.raises(FrontendError):
        m.set_table([RegionSpec(0, 1 * MiB, UVA, 0)], [])
    m.close()
    assert m.empty


def test_replaced_regions_are_released_not_closed(memfd: int) -> None:
    """Table changes never close a region (or a refused fd) inline: the owner takes them and
    closes them, in a worker thread when they may free a populated RAM file."""
    m = GuestMemory("rel")
    m.set_table(*qemu_like(memfd, 16 * MiB))
    first = m.regions
    assert m.take_released() == []
    m.set_table([RegionSpec(0, 1 * MiB, UVA, 0)], [os.dup(memfd)])
    released = m.take_released()
    assert released == list(first) and not any(r.closed for r in first)
    os.fstat(first[0].fd)  # still open
    close_regions(released)
    assert all(r.closed for r in first)
    [kept] = m.regions
    m.add_region(kept.spec, os.dup(memfd))  # the identical region again replaces it
    assert m.take_released() == [kept] and not kept.closed
    kept.close()
    refused = os.dup(memfd)
    with pytest.raises(FrontendError):
        m.set_table([RegionSpec(0, 1 * MiB, UVA, 0)], [refused, os.dup(memfd)])
    released = m.take_released()
    assert refused in released  # the fds of a refused table: released too
    close_regions(released)
    with pytest.raises(OSError):
        os.fstat(refused)
    [last] = m.regions
    assert m.remove_region(last.spec)
    assert m.take_released() == [last]
    last.close()
    m.close()
