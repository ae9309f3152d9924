"""Fuzz target ``wire``: live ``vdev serve`` processes attacked over their vhost-user sockets.

:func:`session` starts one ``vdev serve --socket-count 2`` per personality (``vmw`` and
``virtio-balloon``): socket 0 of each is attacked, socket 1 belongs to a healthy guest. The
first byte of each input picks the personality (even: vmw, odd: virtio-balloon); the rest
drives one attack connection: malformed vhost-user messages (any id, flags and size, lying
sizes), wrong and extra fds, memory tables that overlap or lie, rings pointing anywhere,
then the personality's own traffic through real rings: random vmmemctl command streams and
raw descriptors (vmw); inflate/deflate PFN arrays (out of RAM, huge, too many, device-
writable), stats buffers of any length and tags, GET/SET_CONFIG at any offset and size, raw
descriptors on any queue (virtio-balloon). Oracle, after every input:

* both processes are still running;
* a healthy guest of the attacked personality on its other socket is served within a
  deadline: vmw START, a batch LOCK of resident pages and an UNLOCK; virtio-balloon an
  inflate of resident pages (used length 0) and a deflate;
* the device's accounting matches the RAM file: those pages are gone from the healthy
  guest's memfd (``st_blocks`` dropped by exactly that much) and read back as zeros;
* its RSS stays bounded and its open fds return to the baseline (no fd leak per connection).

Guidance: the attack runs out of process, so the fuzzer's own tracer sees nothing of vdev
(``GUIDED = False``). With ``--vdev-coverage FILE`` each vdev runs under coverage.py
(:mod:`lab.fuzz.covprobe`, branch coverage of ``vdev`` and ``protocol``) and answers a probe
with the arcs measured so far; :func:`coverage_count` sums them, and the built-in engine keeps
an input in the corpus when that number grew while it ran (new arcs reached inside vdev).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from conformance.rawfrontend import (
    BATCH_PAGE,
    FREE_START_PFN,
    PAGE,
    QVA_BASE,
    STATS_BUFFER,
    BalloonGuest,
    Frontend,
    VmwGuest,
    table_payload,
    vring_addr,
    vring_state,
)
from guest_driver.frontend import GuestRamFile, VmwChannel, connect_frontend
from guest_driver.virtq import Buffer
from lab.fuzz import covprobe
from lab.fuzz.corpus import Draw, Finding
from lab.vdev_process import VdevProcess, start_vdev
from protocol import vhost_user as vu
from protocol import virtio_balloon as vb
from protocol import vmw
from protocol.errors import BackendError, BackendHungUp
from protocol.vhost_user import FrontendRequest as R
from protocol.vmw import Command as C

ENGINE = "builtin"
GUIDED = False
INSTRUMENT = ("vdev",)
RSS_LIMIT_MB = 1024
FD_SLACK = 8
DEADLINE = 5.0
HEALTHY_RAM = 32 << 20
HEALTHY_PAGES = 64
RECONNECT_RETRY = 3.0


PERSONALITIES = ("vmw", "virtio-balloon")


@dataclass
class Vdev:
    """One attacked ``vdev serve`` (one personality)."""

    device: str
    vdev: VdevProcess
    attack: str
    healthy: str
    probe: str | None = None  # covprobe socket (with coverage)
    base_fds: int = 0
    base_rss_kb: int = 0


@dataclass
class Live:
    vdevs: dict[str, Vdev]
    arcs: dict[str, int] = field(default_factory=dict)  # per personality, last probed
    attacked: str | None = None  # the personality the last input attacked

    def alive_or_finding(self) -> None:
        for v in self.vdevs.values():
            if not v.vdev.alive():
                raise Finding(
                    f"{v.device} vdev exited with {v.vdev.returncode}: {v.vdev.log_tail()}"
                )


_LIVE: Live | None = None


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def coverage_data_files(data_file: str | Path) -> list[Path]:
    """The per-personality coverage data files a session with ``coverage_file`` writes."""
    return [Path(f"{data_file}.{device}") for device in PERSONALITIES]


@contextlib.contextmanager
def session(
    device: str | None = None,
    vdev_cmd: list[str] | None = None,
    coverage_file: str | Path | None = None,
) -> Iterator[Live]:
    """Start ``vdev serve`` (or ``vdev_cmd``) with two sockets per personality (``device``:
    just that one) for a campaign; with ``coverage_file`` under :mod:`lab.fuzz.covprobe`,
    writing ``coverage_file.PERSONALITY``."""
    global _LIVE
    devices = (device,) if device else PERSONALITIES
    with (
        tempfile.TemporaryDirectory(prefix="vballoon-wire-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        live = Live({})
        for dev in devices:
            probe = f"{tmp}/{dev}.probe" if coverage_file else None
            cmd = vdev_cmd
            if coverage_file:
                cmd = [
                    sys.executable,
                    "-m",
                    "lab.fuzz.covprobe",
                    f"{coverage_file}.{dev}",
                    str(probe),
                ]
            vdev = start_vdev(
                Path(tmp) / dev, socket_count=2, no_api=True, device=dev,
                target=str(64 << 20), verbose=0, vdev_cmd=cmd, log_path=Path(tmp) / f"{dev}.log",
            )  # fmt: skip
            stack.enter_context(vdev)
            v = Vdev(dev, vdev, vdev.paths[0], vdev.paths[1], probe)
            v.base_fds = _fd_count(vdev.pid)
            v.base_rss_kb = _rss_kb(vdev.pid)
            live.vdevs[dev] = v
        _LIVE = live
        try:
            yield live
        finally:
            _LIVE = None


def coverage_count() -> int | None:
    """Arcs measured so far in every vdev of the session (None: not under coverage)."""
    live = _LIVE
    if live is None or any(v.probe is None for v in live.vdevs.values()):
        return None
    for v in live.vdevs.values():  # only the vdev attacked since (a probe costs ~50 ms)
        if v.probe is not None and (v.device not in live.arcs or v.device == live.attacked):
            got = covprobe.probe(v.probe)
            if got is None:
                return None
            live.arcs[v.device] = got[0]
    return sum(live.arcs.values())


# --------------------------------------------------------------------------------------
# attacks


def _some_fds(d: Draw, fe: Frontend, owned: list[int]) -> list[int]:
    out = []
    for _ in range(d.choice([0, 0, 1, 1, 2, 9])):
        kind = d.below(3)
        if kind == 0:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            owned.append(fd)
        elif kind == 1:
            fd = fe.ram.fd
        else:
            r, w = os.pipe()
            owned += [r, w]
            fd = r
        out.append(fd)
    return out


def _region(d: Draw, ram: GuestRamFile) -> dict[str, int]:
    reg = ram.vhost_regions()[0]
    k = d.below(8)
    if k == 1:
        reg["memory_size"] = d.choice([0, 1, PAGE - 1, 1 << 40, (1 << 64) - 1])
    elif k == 2:
        reg["guest_phys_addr"] = d.choice([(1 << 64) - PAGE, 1 << 63, PAGE // 2, d.u64()])
    elif k == 3:
        reg["mmap_offset"] = d.choice([PAGE, 1 << 40, (1 << 64) - PAGE, d.u64()])
    elif k == 4:
        reg["userspace_addr"] = d.choice([0, (1 << 64) - PAGE, d.u64()])
    return reg


async def _raw_descriptors(d: Draw, q: Any, ram_size: int) -> None:
    """1-3 raw descriptors (any address, length, flags, next) posted on ``q`` and kicked."""
    head = q.ring._free[0] if q.ring._free else 0
    rows = {
        head + i: (d.u64() if d.chance(1, 2) else d.below(ram_size), d.u32(), d.below(8), d.below(70))
        for i in range(d.between(1, 3))
    }  # fmt: skip
    await q.ring.post_raw(head, rows)
    q.kick_now()
    await trio.sleep(0.005)


async def _raw_message(d: Draw, fe: Frontend, owned: list[int]) -> None:
    known = [int(r) for r in R]
    request = d.choice(known) if d.chance(3, 4) else d.u32()
    flags = vu.VERSION if d.chance(3, 4) else d.u32()
    if d.chance(1, 2):
        flags |= vu.FLAG_NEED_REPLY
    payload = d.blob(64) if d.chance(3, 4) else bytes(d.below(300))
    size = len(payload) if d.chance(7, 8) else d.choice([len(payload) + 8, 4097, d.u32()])
    fds = _some_fds(d, fe, owned)
    await fe.chan.send(request, payload, fds, flags=flags, size=size)


async def _mem_table(d: Draw, fe: Frontend, owned: list[int]) -> None:
    n = d.choice([1, 1, 2, 3, 0, 9])
    regions = [_region(d, fe.ram) for _ in range(n)]
    fds = [fe.ram.fd] * n if d.chance(3, 4) else _some_fds(d, fe, owned)
    await fe.chan.send(R.SET_MEM_TABLE, table_payload(regions), fds, flags=vu.VERSION)


async def _mem_reg(d: Draw, fe: Frontend, owned: list[int]) -> None:
    req = d.choice([R.ADD_MEM_REG, R.REM_MEM_REG])
    payload = vu.build_payload(vu.SINGLE_REGION, {"padding": 0, "region": _region(d, fe.ram)}, "r")
    fds = [fe.ram.fd] if d.chance(3, 4) else _some_fds(d, fe, owned)
    await fe.chan.send(req, payload, fds, flags=vu.VERSION)


async def _bogus_ring(d: Draw, fe: Frontend, owned: list[int]) -> None:
    idx = d.choice([0, 1, 1, 2, 255, d.u32()])
    await fe.chan.send(
        R.SET_VRING_NUM, vring_state(idx & 0xFFFF_FFFF, d.choice([0, 3, 64, 1 << 15, 1 << 16]))
    )
    addrs = [d.choice([QVA_BASE, QVA_BASE + 1, QVA_BASE + (1 << 40), d.u64(), 0]) for _ in range(3)]
    await fe.chan.send(R.SET_VRING_ADDR, vring_addr(idx & 0xFFFF_FFFF, *addrs))
    await fe.chan.send(R.SET_VRING_BASE, vring_state(idx & 0xFFFF_FFFF, d.u16()))
    kick = os.eventfd(1, os.EFD_CLOEXEC)
    owned.append(kick)
    await fe.chan.send(R.SET_VRING_KICK, vu.u64(idx & 0xFF), [kick])
    await fe.chan.send(R.SET_VRING_ENABLE, vring_state(idx & 0xFFFF_FFFF, 1))


async def _commands(d: Draw, fe: Frontend) -> None:
    """Random vmmemctl traffic through properly set up rings (if the set-up survived)."""
    g = VmwGuest(fe)
    if 0 not in fe.queues:
        await fe.set_mem_table()
        await fe.setup_queue(0)
        await fe.setup_queue(1)
        await g.start()
    end = fe.ram.size // PAGE
    for _ in range(d.below(8)):
        k = d.below(6)
        cmd = d.choice(list(C)) if k else d.u32()
        pfn = d.choice([FREE_START_PFN + d.below(2048), end, d.u64(), 0, BATCH_PAGE // PAGE])
        if cmd in (C.BATCHED_LOCK, C.BATCHED_UNLOCK, C.BATCHED_2M_LOCK, C.BATCHED_2M_UNLOCK):
            pfns = [FREE_START_PFN + d.below(4096) for _ in range(d.below(20))]
            entries = [p << 12 | (d.u8() if d.chance(1, 8) else 0) for p in pfns]
            with trio.move_on_after(1):
                await g.batch(cmd, [], raw_entries=entries, count=d.choice([len(entries), 0, 513]))
        elif d.chance(1, 5):
            # raw descriptors anywhere
            await _raw_descriptors(d, g.cmdq, fe.ram.size)
        else:
            with trio.move_on_after(1):
                await g.command(cmd, pfn, d.choice([0, 1, 512, d.u64()]))


async def _vb_commands(d: Draw, fe: Frontend) -> None:
    """Random virtio-balloon traffic through properly set up rings (if the set-up survived)."""
    if 0 not in fe.queues:
        await fe.set_mem_table()
        for i in (0, 1, 2):
            await fe.setup_queue(i)
    g = BalloonGuest(fe)
    end = fe.ram.size // PAGE
    for _ in range(d.below(8)):
        k = d.below(8)
        if k < 3:  # inflate (0) / deflate (1, 2): PFN arrays, mostly in RAM
            n = d.choice([1, 7, 64, 256, 257, 0])
            pfns = [
                d.choice([FREE_START_PFN + d.below(2048), end - 1, end, d.u32(), 0, 1])
                for _ in range(n)
            ]
            with trio.move_on_after(1):
                await g.pfns(min(k, 1), pfns, write=d.chance(1, 8))
        elif k == 3:  # a stats buffer: any tags and values, any length
            if d.chance(1, 3):
                raw = d.blob(200)
            else:
                stats = [(d.below(20), d.u64()) for _ in range(d.below(16))]
                raw = b"".join(vb.STAT.build({"tag": t, "val": v}) for t, v in stats)
            await fe.mem.write(STATS_BUFFER, raw)
            size = len(raw) if d.chance(3, 4) else d.choice([0, 1, 9, 4096, d.u32()])
            q = fe.queues[vb.Queue.STATS]
            await q.ring.add([Buffer(STATS_BUFFER, size, write=d.chance(1, 8))])
            q.kick_now()
            await trio.sleep(0.005)
        elif k == 4:
            await fe.get_config(d.choice([0, 4, 7, 8, 16, d.u32()]), d.choice([0, 4, 8, 16, 256]))
        elif k == 5:
            data = d.blob(24)
            await fe.set_config(d.choice([0, 4, 6, 8, d.u32()]), data, d.choice([0, 1, d.u32()]))
        else:  # raw descriptors on any queue
            await _raw_descriptors(d, fe.queues[d.below(3)], fe.ram.size)


async def _attack(d: Draw, path: str, device: str = "vmw") -> None:
    owned: list[int] = []
    fe = await Frontend.connect(path, ram_size=16 << 20)
    try:
        # anything going wrong on the attacker's side (a reply it did not expect, its own ring
        # bookkeeping confused by raw descriptors) ends the attack; only the oracle judges
        with contextlib.suppress(Exception):
            if d.chance(2, 3):
                await fe.negotiate()
            for _ in range(d.between(1, 8)):
                k = d.below(10)
                if k < 3:
                    await _raw_message(d, fe, owned)
                elif k < 5:
                    await _mem_table(d, fe, owned)
                elif k < 6:
                    await _mem_reg(d, fe, owned)
                elif k < 7:
                    await _bogus_ring(d, fe, owned)
                elif device == "vmw":
                    await _commands(d, fe)
                else:
                    await _vb_commands(d, fe)
            await trio.sleep(0.01)
    finally:
        fe.close()
        for fd in owned:
            with contextlib.suppress(OSError):
                os.close(fd)


async def _healthy(path: str) -> None:
    """The well-behaved guest on the other socket (our normal front-end): START, a batch LOCK
    of resident pages, the RAM file shrinks by exactly those pages, they read back as zeros,
    UNLOCK. Raises :class:`Finding` when the device gets any of it wrong."""
    ram = GuestRamFile(HEALTHY_RAM, name="wire-healthy-ram")
    try:
        # the previous healthy connection may not be noticed gone yet: vdev refuses us then
        async with connect_frontend(path, ram, retry=RECONNECT_RETRY) as fe:
            problem = await _healthy_checks(VmwChannel(fe), ram)
    finally:
        ram.close()
    if problem:
        raise Finding(problem)


async def _healthy_vb(path: str) -> None:
    """The well-behaved virtio-balloon guest on the other socket: inflate resident pages
    (used length 0), the RAM file shrinks by exactly those pages, they read back as zeros,
    deflate. Raises :class:`Finding` when the device gets any of it wrong."""
    b = await BalloonGuest.attach(path)
    try:
        problem = await _healthy_vb_checks(b)
    finally:
        b.close()
    if problem:
        raise Finding(problem)


async def _healthy_vb_checks(b: BalloonGuest) -> str | None:
    ram, n = b.fe.ram, HEALTHY_PAGES
    first = FREE_START_PFN + 100
    ram.fill(first * PAGE, n * PAGE, 0xA5)
    before = ram.allocated_bytes()
    used = await b.inflate(list(range(first, first + n)))
    if used.len != 0:
        return f"healthy virtio-balloon guest: inflate used length {used.len}"
    freed = before - ram.allocated_bytes()
    if freed != n * PAGE:
        return f"accounting: {n} pages inflated, RAM file shrank by {freed} bytes"
    if ram.read(first * PAGE, PAGE) != bytes(PAGE):
        return "accounting: an inflated page still holds data"
    used = await b.deflate(list(range(first, first + n)))
    if used.len != 0:
        return f"healthy virtio-balloon guest: deflate used length {used.len}"
    return None


async def _healthy_checks(ch: VmwChannel, ram: GuestRamFile) -> str | None:
    resp = await ch.call(C.START, int(vmw.ALL_CAPABILITIES))
    if resp.status != vmw.Status.SUCCESS_WITH_CAPABILITIES:
        return f"healthy guest: START answered {resp.status:#x}"
    n = HEALTHY_PAGES
    first = max(FREE_START_PFN, -(-ch.end // PAGE)) + 100  # clear of the rings and channel
    batch_pfn = first + n
    ram.fill(first * PAGE, n * PAGE, 0xA5)
    ram.fill(batch_pfn * PAGE, PAGE, 0)  # resident before measuring, like the locked pages
    before = ram.allocated_bytes()
    request = vmw.Request(C.BATCHED_LOCK, batch_pfn, n)
    resp, after = await ch.command(request, vmw.build_batch(range(first, first + n)))
    assert after is not None
    bad = [int(s) for s in vmw.entry_statuses(vmw.batch_entries(after, n)) if s]
    if resp.status != 0 or bad:
        return f"healthy guest: batch lock {resp.status:#x}, entry statuses {bad[:4]}"
    freed = before - ram.allocated_bytes()
    if freed != n * PAGE:
        return f"accounting: {n} pages locked, RAM file shrank by {freed} bytes"
    if ram.read(first * PAGE, PAGE) != bytes(PAGE):
        return "accounting: a locked page still holds data"
    resp = await ch.call(C.UNLOCK, first)
    if resp.status != 0:
        return f"healthy guest: UNLOCK answered {resp.status:#x}"
    return None


def one_input(data: bytes) -> None:
    live = _LIVE
    if live is None:
        with session() as _:
            one_input(data)
        return
    d = Draw(data)
    devices = list(live.vdevs)
    v = live.vdevs[devices[d.u8() % 2 % len(devices)]]
    live.attacked = v.device

    async def main() -> None:
        with trio.move_on_after(DEADLINE):
            await _attack(d, v.attack, v.device)
        live.alive_or_finding()
        try:
            with trio.fail_after(DEADLINE):
                if v.device == "vmw":
                    await _healthy(v.healthy)
                else:
                    await _healthy_vb(v.healthy)
        except* (trio.TooSlowError, BackendError, BackendHungUp, OSError) as group:
            exc = group.exceptions[0]  # (from the front-end's nursery: in a group)
            raise Finding(
                f"healthy {v.device} guest not served after the attack: {exc!r}"
            ) from None
        rss_mb = _rss_kb(v.vdev.pid) // 1024
        if rss_mb > RSS_LIMIT_MB:
            raise Finding(f"{v.device} vdev RSS {rss_mb} MiB > {RSS_LIMIT_MB} MiB")
        # the attacked connection is gone: its fds must be closed (allow a moment)
        for _ in range(50):
            fds = _fd_count(v.vdev.pid)
            if fds <= v.base_fds + FD_SLACK:
                break
            await trio.sleep(0.01)
        else:
            raise Finding(f"fd leak: {v.device} vdev holds {fds} fds, {v.base_fds} at start")

    trio.run(main)


def seeds() -> list[bytes]:
    """First byte even: vmw, odd: virtio-balloon."""
    vmw_seeds = [
        bytes([0, 9, 9, 9]) + bytes(range(64)),
        bytes([0, 0, 7, 1]) + struct.pack("<Q", 2) * 8,
        bytes([200, 3, 0, 0, 0]) + bytes(100),
        bytes(range(255, 0, -1)),
    ]
    vb_seeds = [
        bytes([0, 0, 0, 8, 0, 7, 0, 0, 5, 1]) + bytes(range(64)),  # negotiated, ring traffic
        bytes([0, 0, 0, 8, 0, 9, 0, 3]) + bytes(range(100, 200)),
        bytes([0, 9, 9, 9]) + bytes(range(64, 0, -1)),
        bytes(range(1, 255, 2)),
    ]
    return [bytes([0]) + s for s in vmw_seeds] + [bytes([1]) + s for s in vb_seeds]
