"""Is the front-end's guest RAM reclaimable? Private mappings (``share=off``) are not.

vdev frees guest memory by punching holes in the region files QEMU sends. That only reaches
the guest's pages when QEMU maps those files shared (``memory-backend-memfd,share=on``, or a
file backend with ``share=on``). With ``share=off`` QEMU maps the file privately: the guest's
pages are QEMU's own copy-on-write anonymous memory, the file stays empty, and a punch frees
nothing (the guest is told its pages were taken, the host gets nothing back).

The front-end's PID comes with the socket (``SO_PEERCRED``); its ``/proc/PID/maps`` says how
each region's QEMU virtual address (``userspace_addr``) is mapped. This reads only the
mapping line of each region; the parser takes text (tests feed it captured lines).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class RegionLike(Protocol):
    @property
    def guest_phys_addr(self) -> int: ...
    @property
    def userspace_addr(self) -> int: ...
    @property
    def memory_size(self) -> int: ...


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    shared: bool
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """``/proc/PID/maps`` lines (``start-end perms offset dev inode [path]``)."""
    out: list[Mapping] = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or "-" not in parts[0] or len(parts[1]) != 4:
            continue
        lo, _, hi = parts[0].partition("-")
        try:
            start, end = int(lo, 16), int(hi, 16)
        except ValueError:
            continue
        out.append(
            Mapping(start, end, parts[1][3] == "s", parts[5].strip() if len(parts) > 5 else "")
        )
    return out


def private_regions(maps: Sequence[Mapping], regions: Sequence[RegionLike]) -> list[str]:
    """Descriptions of the regions whose QEMU mapping is private (not reclaimable)."""
    bad: list[str] = []
    for r in regions:
        m = next((m for m in maps if m.start <= r.userspace_addr < m.end), None)
        if m is not None and not m.shared:
            bad.append(
                f"guest 0x{r.guest_phys_addr:x}+{r.memory_size >> 20} MiB is mapped private"
                f" by the front-end ({m.path or 'anonymous'}): share=off? punching it frees"
                " nothing"
            )
    return bad


def peer_pid(sock: socket.socket) -> int | None:
    """The PID at the other end of a unix socket (SO_PEERCRED), or None."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


def check_peer_regions(pid: int | None, regions: Sequence[RegionLike]) -> list[str]:
    """:func:`private_regions` for the process ``pid`` (empty if its maps cannot be read:
    another PID namespace, no permission)."""
    if pid is None:
        return []
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            maps = parse_maps(f.read())
    except OSError:
        return []
    return private_regions(maps, regions)
