"""Both halves of the split ring against each other over a real memfd, plus hostile chains."""

from __future__ import annotations

import os

import pytest

from guest_driver.virtq import Buffer, DriverQueue, RingLayout
from protocol import virtqueue as vq
from vdev.memory import GuestMemory, RegionSpec
from vdev.virtq import RingBroken, VirtQueue

MiB = 1 << 20
UVA = 0x7F00_0000_0000
RING = 0x10000
SIZE = 16


class MemPort:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem

    async def read(self, gpa: int, n: int) -> bytes:
        return self.mem.read(gpa, n)

    async def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)


@pytest.fixture
def mem():
    fd = os.memfd_create("vq")
    os.ftruncate(fd, 4 * MiB)
    m = GuestMemory("vq")
    m.set_table([RegionSpec(0, 4 * MiB, UVA, 0)], [fd])
    yield m
    m.close()


async def make(mem: GuestMemory, *, event_idx: bool = False, indirect: bool = True):
    lay = RingLayout.contiguous(RING, SIZE)
    drv = DriverQueue(MemPort(mem), lay, event_idx=event_idx)
    await drv.init()
    dev = VirtQueue(0)
    dev.set_num(SIZE)
    dev.set_base(0)
    dev.set_addr(mem, UVA + lay.desc, UVA + lay.used, UVA + lay.avail)
    dev.event_idx, dev.indirect = event_idx, indirect
    dev.started = dev.enabled = True
    return drv, dev


@pytest.mark.parametrize("event_idx", [False, True])
async def test_round_trip(mem: GuestMemory, event_idx: bool) -> None:
    drv, dev = await make(mem, event_idx=event_idx)
    mem.write(0x100000, b"ping" * 6)
    for i in range(40):  # wraps the 16-entry ring
        h = await drv.add([Buffer(0x100000, 24), Buffer(0x101000 + i * 64, 24, write=True)])
        assert await drv.needs_kick()
        [chain] = dev.pop(mem)
        assert chain.error is None and chain.head == h
        assert chain.read(mem) == b"ping" * 6 and chain.writable_len == 24
        assert chain.write(mem, b"pong" * 6) == 24
        assert dev.push(mem, [(chain.head, 24)])
        assert not dev.publish_avail_event(mem)
        assert [(u.id, u.len) for u in await drv.poll_used()] == [(h, 24)]
        assert mem.read(0x101000 + i * 64, 24) == b"pong" * 6
    assert drv.num_free == SIZE
    assert dev.counters["bad_chains"] == 0


async def test_indirect(mem: GuestMemory) -> None:
    drv, dev = await make(mem)
    await drv.add(
        [Buffer(0x100000, 12), Buffer(0x100100, 12), Buffer(0x101000, 24, write=True)],
        indirect_table=0x30000,
    )
    [chain] = dev.pop(mem)
    assert chain.error is None
    assert chain.readable == [(0x100000, 12), (0x100100, 12)]
    assert chain.writable == [(0x101000, 24)]


D, N, W, IND = 0, int(vq.DescFlag.NEXT), int(vq.DescFlag.WRITE), int(vq.DescFlag.INDIRECT)
BAD_CHAINS = {
    "loop": {0: (0x100000, 8, N, 1), 1: (0x100000, 8, N, 0)},
    "next out of table": {0: (0x100000, 8, N, SIZE)},
    "outside RAM": {0: (8 * MiB, 8, D, 0)},
    "straddles RAM end": {0: (4 * MiB - 4, 8, D, 0)},
    "overflow": {0: ((1 << 64) - 4, 8, D, 0)},
    "readable after writable": {0: (0x100000, 8, W | N, 1), 1: (0x100100, 8, D, 0)},
    "indirect len % 16": {0: (0x30000, 24, IND, 0)},
    "indirect len 0": {0: (0x30000, 0, IND, 0)},
    "indirect + next": {0: (0x30000, 16, IND | N, 1), 1: (0x100000, 8, D, 0)},
    "indirect table outside RAM": {0: (8 * MiB, 16, IND, 0)},
}


@pytest.mark.parametrize("case", sorted(BAD_CHAINS))
async def test_bad_chain_completed_with_zero(mem: GuestMemory, case: str) -> None:
    drv, dev = await make(mem)
    await drv.post_raw(0, BAD_CHAINS[case])
    [chain] = dev.pop(mem)
    assert chain.error is not None
    assert dev.counters["bad_chains"] == 1
    dev.push(mem, [(chain.head, 0)])
    assert [(u.id, u.len) for u in await drv.poll_used()] == [(0, 0)]
    # and the queue keeps serving
    await drv.add([Buffer(0x100000, 24), Buffer(0x101000, 24, write=True)])
    [good] = dev.pop(mem)
    assert good.error is None


async def test_nested_indirect_and_not_negotiated(mem: GuestMemory) -> None:
    drv, dev = await make(mem)
    mem.write(0x30000, bytes(16))
    from guest_driver.virtq import build_descriptors

    mem.write(0x30000, build_descriptors([(0x31000, 16, IND, 0)]))
    await drv.post_raw(0, {0: (0x30000, 16, IND, 0)})
    [chain] = dev.pop(mem)
    assert chain.error and "nested" in chain.error
    dev.indirect = False
    await drv.post_raw(1, {1: (0x30000, 16, IND, 0)})
    [chain] = dev.pop(mem)
    assert chain.error and "INDIRECT_DESC" in chain.error


async def test_head_out_of_range(mem: GuestMemory) -> None:
    drv, dev = await make(mem)
    await drv.post_raw(SIZE + 3, {})
    [chain] = dev.pop(mem)
    assert chain.error and "head" in chain.error


async def test_avail_idx_jump_breaks_only_the_ring(mem: GuestMemory) -> None:
    drv, dev = await make(mem)
    await drv.publish_avail_idx(SIZE + 1)
    with pytest.raises(RingBroken):
        dev.pop(mem)
    assert dev.broken and not dev.ready
    assert dev.counters["ring_errors"] == 1
    # re-armed by the front-end
    await drv.init()
    dev.set_base(0)
    assert dev.ready and dev.pop(mem) == []


async def test_buffers_left_on_the_ring_on_purpose_do_not_ask_for_another_pass(
    mem: GuestMemory,
) -> None:
    """``publish_avail_event(mem, seen)``: True only when heads came after ``seen`` (the
    driver may have read the old event and not kicked), not for heads the device leaves
    untaken (an eventq buffer waiting for an event)."""
    drv, dev = await make(mem, event_idx=True)
    await drv.add([Buffer(0x100000, 8, write=True)])
    seen = dev.avail_idx(mem)
    assert dev.avail_count(mem) == 1  # not popped: the device has nothing to say yet
    assert not dev.publish_avail_event(mem, seen)
    assert dev.publish_avail_event(mem)  # the old meaning: something is untaken
    await drv.add([Buffer(0x101000, 8, write=True)])  # arrives during the next pass
    assert dev.publish_avail_event(mem, seen)
    assert not dev.publish_avail_event(mem, dev.avail_idx(mem))


async def test_event_idx_suppression(mem: GuestMemory) -> None:
    drv, dev = await make(mem, event_idx=True)
    await drv.add([Buffer(0x100000, 8)])
    assert await drv.needs_kick()  # avail_event 0 crossed
    await drv.add([Buffer(0x100000, 8)])
    assert not await drv.needs_kick()  # device did not ask again yet
    chains = dev.pop(mem)
    assert len(chains) == 2
    assert not dev.publish_avail_event(mem)
    await drv.add([Buffer(0x100000, 8)])
    assert await drv.needs_kick()
