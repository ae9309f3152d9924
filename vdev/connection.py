"""One vhost-user front-end connection: its reader task and the dispatch of its messages.

After rust-vmm's ``vhost-user-backend`` handler (``VhostUserHandler``). Each front-end a
:class:`~vdev.server.Server` accepts becomes a :class:`Connection` running in the server's
nursery:

* one reader task: ``recvmsg`` the 12-byte header (the fds arrive with it), then exactly
  ``size`` payload bytes; feed :class:`~vdev.vhost_user.BackendConnection`; act; reply;
* one task per ring (:mod:`vdev.rings`) waiting on its kick eventfd and letting the
  personality process the ring (:meth:`Connection.process`);
* one control task applying operator requests from the registry (target, reset, stats);
* with ``stats_interval`` > 0 and a personality that holds a stats buffer (virtio-balloon),
  one task giving that buffer back every ``stats_interval`` seconds so the guest refreshes
  its statistics (QEMU's ``guest-stats-polling-interval``);
* a back-end channel sender (``CONFIG_CHANGE_MSG`` without NEED_REPLY, coalesced) and a
  reader that discards whatever the front-end writes on that channel.

Everything that touches a connection's rings or memory runs under that connection's lock,
so a new memory table or a GET_VRING_BASE never lands in the middle of a batch. Large
reclaims run in a worker thread. A slow or hostile front-end/guest therefore only ever
delays itself. A :class:`~protocol.errors.PeerError` (or a host resource failure caused by
the peer's input) closes that one connection with a log line naming it; a
:class:`~protocol.errors.GuestError` inside a ring is answered and counted, never fatal.

On disconnect every fd and mapping of the connection is closed and the registry entry goes
back to "disconnected" (the balloon is forgotten). The guest-RAM mappings and fds are
released in a worker thread: when the front-end is already gone, closing the last fd of
its RAM file frees all of that RAM synchronously (about a second per few GiB), which
would stall every other guest if done in the trio thread. The same goes for the regions a
SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG replaces or refuses (a hostile front-end may hand
over its only copy of a large populated memfd, then replace the table): the memory layer
releases them and the connection closes them in a worker thread.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import itertools
import logging
import math
import os
import select
import socket
import termios
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from protocol import vhost_user as vu
from protocol.errors import ConfigError, FrontendError, HostResourceError, PeerClosed, PeerError
from protocol.vhost_user import FrontendRequest as R
from protocol.vhost_user import ProtocolFeature as PF
from vdev.balloon import coalesce
from vdev.devices.base import Device, DeviceContext, DeviceStatus, Work
from vdev.handover import ConnStore, HandoverError, StateFile
from vdev.memory import GuestMemory, Region, RegionSpec, close_regions
from vdev.pagemap import PAGES_PER_2M, PageMap
from vdev.ramcheck import check_peer_regions, peer_pid
from vdev.rings import Rings
from vdev.vhost_user import NEGOTIATION, BackendConnection, Message, State, close_fds
from vdev.virtq import RingBroken, VirtQueue

if TYPE_CHECKING:
    from vdev.server import Server

log = logging.getLogger(__name__)

_ANC_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * array.array("i").itemsize)
_serial = itertools.count(1)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


async def _close_in_thread(regions: Sequence[Region | int]) -> None:
    """:func:`~vdev.memory.close_regions` in a worker thread, shielded (they must be closed
    even when the connection is being cancelled)."""
    if regions:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close_regions, list(regions))


class Connection:
    """One vhost-user front-end on one guest's socket (see the module docstring)."""

    def __init__(
        self,
        server: Server,
        sock: trio.socket.SocketType,
        guest: str,
        device_cls: type[Device],
        *,
        state: StateFile | None = None,
    ) -> None:
        self.server = server
        self.sock = sock
        # the stdlib socket under trio's: reads and writes that can complete at once do so
        # without a trip through trio's scheduler (see _recvmsg)
        self._raw: socket.socket = sock._sock  # type: ignore[attr-defined]
        #: the front-end's PID (SO_PEERCRED: fixed when it connected), None if unknown
        self._peer_pid = peer_pid(self._raw)
        self._waited = False
        self.guest = guest
        self.name = f"{guest}#{next(_serial)}"
        self.memory = GuestMemory(self.name)
        self.rings = Rings(self.name, device_cls.num_queues)
        self.queues = self.rings.queues
        # the hand-over (vdev under systemd or vdev supervise): the state file and the fd
        # store entries of this connection; None when nothing would keep them
        handover = server.handover
        self.state: StateFile | None = None
        self.fdstore: ConnStore | None = None
        if handover is not None and handover.enabled:
            self.state = state if state is not None else StateFile.create(guest)
            self.fdstore = ConnStore(handover, guest)
        self._vu_consumed = 0  # vhost-user messages consumed from the socket
        self._resumed = False
        #: The last batch's completions not yet pushed, and the used index of each ring
        #: before them (the hand-over record's "pending" / "used_base").
        self._pending: tuple[list[tuple[int, int, int]], dict[str, int]] | None = None
        self._vu_note: dict[str, Any] | None = None  # the last message answered (recorded)
        self.manual_target: int | None = None  # the record's (a resumed connection)
        self.device = device_cls(
            DeviceContext(
                self.name,
                self.memory,
                self.queues,
                pages=PageMap(backing=self.state) if self.state is not None else None,
            ),
            target=server.registry.target_of(guest),
        )
        self.proto = BackendConnection(
            name=self.name,
            device_features=device_cls.features,
            num_queues=device_cls.num_queues,
        )
        self.lock = trio.Lock()
        self._control_send, self._control_recv = trio.open_memory_channel[Callable[[], Work]](
            math.inf
        )
        self._control_queued = 0  # actions sent to the control task and not yet carried out
        self._backend: trio.socket.SocketType | None = None
        self._backend_send: trio.MemorySendChannel[bytes] | None = None
        self._config_change_pending = False
        self._nursery: trio.Nursery | None = None
        self._detached: list[Region | int] = []
        self.closed = False

    # -- LiveDevice (what the registry reads and asks) -----------------------------------

    def status(self) -> DeviceStatus:
        st = self.device.status()
        counters = dict(st.counters)
        for q in self.queues:
            for key, value in q.counters.items():
                counters[f"q{q.index} {key}"] = value
        counters["reclaim failures"] = self.memory.reclaim_failures
        return DeviceStatus(
            size_pages=st.size_pages,
            target_pages=st.target_pages,
            capabilities=st.capabilities,
            driver_active=st.driver_active,
            guest_type=st.guest_type,
            doorbell_registered=st.doorbell_registered,
            counters=counters,
            gauges=st.gauges,  # the ring counters are all monotonic
            guest_stats=st.guest_stats,
        )

    def ram_pages(self) -> int:
        return self.memory.total_pages

    def ram_allocated_bytes(self) -> int:
        return self.memory.allocated_bytes()

    def reclaimed_bytes_total(self) -> int:
        return self.memory.reclaimed_bytes_total

    def peer_pid(self) -> int | None:
        """The front-end's PID (SO_PEERCRED), for the backstop (vdev.policy.backstop)."""
        return self._peer_pid

    def unreclaimable(self) -> list[str]:
        """Regions the front-end maps privately (share=off): punching them frees nothing."""
        return list(getattr(self, "ram_problems", []))

    def request_target(self, pages: int) -> None:
        """A new target: applied at once when the connection is idle (the doorbell rings
        before the caller, e.g. the API handler, goes on), else queued in order."""
        self._control(lambda: self.device.set_target(pages))

    def _control(self, action: Callable[[], Work]) -> None:
        """Carry out an operator action now, in the caller (the trio thread), when nothing
        holds the connection lock and no earlier action is queued: exactly what the control
        task would do had it got the lock at once, minus a scheduling round. Otherwise queue
        it for the control task (order kept)."""
        if not self.closed and not self._control_queued and not self.lock.locked():
            try:
                work = action()
                if not work.reclaims:  # operator actions reclaim nothing; if one did, the
                    self._complete(work)  # task carries it out (it may need a thread)
                    return
            except RingBroken:  # logged by the ring; it waits for the front-end to re-arm it
                return
            except Exception:  # a bug: lose this connection, not the caller (the API)
                log.exception("%s: internal error in an operator action, closing", self.name)
                self.close()
                return
            action = lambda: work  # noqa: E731
        self._control_queued += 1
        self._control_send.send_nowait(action)

    def request_reset(self) -> None:
        """The operator's reset (``vdev reset``). :class:`~protocol.errors.ConfigError` for a
        personality that has none (:attr:`~vdev.devices.base.Device.operator_reset`)."""
        if not self.device.operator_reset:
            raise ConfigError(
                f"{self.guest}: a {self.device.name} device cannot make its driver start over "
                "(virtio has no device-initiated reset); set the target to 0 to take the "
                "balloon back"
            )

        def reset() -> Work:
            self.server.registry.note_reset(self.guest)
            return self.device.demand_reset()

        self._control(reset)

    def request_stats(self) -> bool:
        """Queue a guest stats refresh (the personality gives its held stats buffer back;
        the driver refills it). False when the personality keeps no stats."""
        if not self.device.supports_stats or self.closed:
            return False
        self._control_queued += 1
        self._control_send.send_nowait(self.device.request_stats)
        return True

    async def refresh_stats(self) -> bool:
        """:meth:`request_stats`, carried out now under the connection lock: True when a
        held stats buffer was given back to the guest."""
        if not self.device.supports_stats:
            return False
        async with self.lock:
            if self.closed:
                return False
            work = self.device.request_stats()
            await self._execute(work)
        return bool(work.completions)

    # -- life cycle ----------------------------------------------------------------------

    async def run(self, *, resumed: bool = False) -> None:
        registry = self.server.registry
        registry.attach(self.guest, self)
        self._resumed = resumed
        if resumed:
            registry.note_size(self.guest, self.device.size_pages())
        else:
            log.info("%s: front-end connected", self.name)
            if self.state is not None and self.fdstore is not None:
                self.fdstore.handover.store.store(f"state.{self.guest}", self.state.fd)
                self.fdstore.handover.store.store(f"conn.{self.guest}", self.sock.fileno())
                self._commit()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if resumed and self._backend is not None:
                    self._start_backend(self._backend)
                    # A config change the previous process queued may never have reached
                    # the writer (killed in between): tell the driver once more. A spurious
                    # one is harmless (the driver re-reads the config and finds it as it was).
                    self._send_config_change()
                nursery.start_soon(self._control_loop)
                if self.server.stats_interval > 0 and self.device.supports_stats:
                    nursery.start_soon(self._stats_loop, self.server.stats_interval)
                for q in self.queues:
                    nursery.start_soon(self._kick_loop, q)
                if resumed:  # what the guest posted while vdev was down
                    for q in self.queues:
                        if q.ready:
                            nursery.start_soon(self.process, q.index)
                try:
                    await self._reader()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.close()
            registry.detach(self.guest, self)
            await self._release_memory()

    async def _release_memory(self) -> None:
        """Unmap and close the detached guest-RAM regions in a worker thread."""
        regions, self._detached = self._detached, []
        await _close_in_thread(regions)

    async def _close_released(self) -> None:
        """Close the regions a table change (or a finished reclaim) released, in a worker
        thread: they may hold the last fd of a large populated RAM file. Awaited by this
        connection only (its next message waits; its rings and every other guest run on)."""
        await _close_in_thread(self.memory.take_released())

    async def _reader(self) -> None:
        try:
            if self.state is not None:
                if self._resumed:
                    await self.resume_vhost_user()
                await self._serve_peeked()
            while True:
                self._waited = False
                for msg in await self._recv_messages():
                    reply = await self._handle(msg)
                    if reply:
                        await self._send_all(reply)
                if not self._waited:  # a busy front-end: still let the other tasks run
                    await trio.lowlevel.checkpoint()
        except PeerClosed:
            log.info("%s: front-end disconnected", self.name)
        except (PeerError, HostResourceError) as exc:
            log.error("%s: closing the connection: %s", self.name, exc)
        except trio.ClosedResourceError:
            log.info("%s: connection closed locally", self.name)
        except OSError as exc:
            log.warning("%s: socket error, closing: %s", self.name, exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fdstore is not None and not self.server.handing_over:
            # the front-end is gone (or broke the protocol): nothing to resume; our copies
            # alone must not keep its socket open
            self.fdstore.remove_all()
            self.fdstore.handover.store.remove(f"conn.{self.guest}")
            self.fdstore.handover.store.remove(f"state.{self.guest}")
        elif self.fdstore is not None:
            self.fdstore.close()
        if self.state is not None and not self.server.handing_over:
            state, self.state = self.state, None
            state.close()  # the map views keep the mapping until they go; the fd goes now
        self.rings.close()
        self._detached += self.memory.detach()  # closed by run() in a worker thread
        self.proto.fail()
        self._control_send.close()
        if self._backend_send is not None:
            self._backend_send.close()
        if self._backend is not None:
            self._backend.close()
        self.sock.close()

    # -- the wire ------------------------------------------------------------------------

    async def _recv_exact(self, n: int) -> tuple[bytes, list[int]]:
        data = bytearray()
        fds: list[int] = []
        while len(data) < n:
            try:
                chunk, anc, flags = await self._recvmsg(n - len(data))
            except OSError:
                close_fds(fds)
                raise
            fds += _fds_from(anc)
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise FrontendError(f"{self.name}: more than {vu.MAX_FDS} fds in one message")
            if not chunk:
                close_fds(fds)
                if data:
                    raise FrontendError(f"{self.name}: connection closed inside a message")
                raise PeerClosed
            data += chunk
        return bytes(data), fds

    async def _recvmsg(self, n: int) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
        """One ``recvmsg``: at once when the bytes are there (a payload follows its header in
        the same segment; a reply is awaited by the front-end with the vCPU stopped, so the
        ~3 scheduler passes of an awaited trio socket call per message are latency the
        guest feels), else after waiting for the socket to become readable."""
        while True:
            if self._raw.fileno() < 0:  # closed here (close()): as trio's socket would say
                raise trio.ClosedResourceError
            try:
                chunk, anc, flags, _ = self._raw.recvmsg(n, _ANC_SPACE)
                return chunk, anc, flags
            except BlockingIOError:
                self._waited = True
                await trio.lowlevel.wait_readable(self.sock)

    async def _recv_messages(self) -> list[Message]:
        header, fds = await self._recv_exact(vu.HEADER_SIZE)
        msgs = self.proto.receive(header, fds)  # validates the header before we read on
        if msgs:
            return msgs
        payload, stray = await self._recv_exact(self.proto.pending_payload)
        if stray:
            close_fds(stray)
            self.proto.fail()
            raise FrontendError(f"{self.name}: fds arrived inside a payload")
        return self.proto.receive(payload)

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._raw.fileno() < 0:
                raise trio.ClosedResourceError
            try:
                sent = self._raw.send(view)
            except BlockingIOError:
                self._waited = True
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[sent:]

    # -- the wire under the hand-over: peek, handle, record, reply, consume ---------------
    #
    # A message is read with MSG_PEEK (its fds are cloned into ours) and stays in the
    # socket while it is handled. The new state and the reply are committed to the state
    # file, the reply is sent and marked sent (``vu_sent``), and only then is the message
    # consumed (``vu_consumed``). A vdev killed anywhere in between finds the message
    # again: not recorded -> handled again from the recorded state (same reply); recorded
    # and marked sent -> consumed only; recorded, not marked sent -> the reply is sent
    # unless the socket shows it went (bytes still unread by QEMU in our send queue, or
    # QEMU already sent its next message). The one window left is between the send
    # returning and the mark (a few instructions): a reply QEMU already read would then be
    # sent twice. (Between the consuming read and its record there is no scheduling point;
    # a kill in those few instructions is caught by the digest of the message kept in the
    # record, unless QEMU's next message is the same bytes.) docs/ARCHITECTURE.md, "Hand-over".

    async def _serve_peeked(self) -> None:
        state = self.state
        assert state is not None
        while True:
            data, fds = await self._peek_message()
            msgs = self.proto.receive(data, fds)
            for msg in msgs:
                reply = await self._handle(msg)
                seq = self._vu_consumed
                self._commit(vu={"seq": seq, "reply": reply.hex(), "msg": _digest(data)})
                if reply:
                    await self._send_all(reply)
                state.h["vu_sent"] = seq + 1
            await self._consume(len(data), len(fds))

    async def _peek_message(self) -> tuple[bytes, list[int]]:
        """The next whole message (header + payload) and its fds, left in the socket.

        A peek hands out the fds of the next skb even when it copies no byte of it (Linux
        ``unix_stream_read_generic`` moves on to the next skb with MSG_PEEK whatever is left
        to read). So the fds of a peek are the message's own only when the message is one
        that carries fds; otherwise they are the next message's and are dropped here. The
        consuming read then checks the count (:meth:`_consume`)."""
        delay = 0.001
        while True:
            data, fds = await self._peek(vu.HEADER_SIZE)
            need = vu.HEADER_SIZE
            if len(data) == vu.HEADER_SIZE:
                try:
                    need += self.proto.check_header(data)
                except FrontendError:
                    close_fds(fds)
                    raise
                if need == vu.HEADER_SIZE:
                    if not self.proto.expected_fds(data):
                        close_fds(fds)
                        fds = []
                    return data, fds
                close_fds(fds)
                data, fds = await self._peek(need)
                if len(data) == need:
                    if not self.proto.expected_fds(data):
                        close_fds(fds)
                        fds = []
                    return data, fds
            close_fds(fds)
            if _inq(self.sock) >= need:  # the rest is there but behind fds: not one message
                self.proto.fail()
                raise FrontendError(f"{self.name}: fds arrived inside a payload")
            if _peer_hung_up(self.sock):
                raise FrontendError(f"{self.name}: connection closed inside a message")
            await trio.sleep(delay)  # a front-end writing a message in pieces
            delay = min(delay * 2, 0.05)

    async def _peek(self, n: int) -> tuple[bytes, list[int]]:
        data, anc, flags, _ = await self.sock.recvmsg(n, _ANC_SPACE, socket.MSG_PEEK)
        fds = _fds_from(anc)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise FrontendError(f"{self.name}: more than {vu.MAX_FDS} fds in one message")
        if not data:
            close_fds(fds)
            raise PeerClosed
        return data, fds

    async def _consume(self, n: int, nfds: int | None = None) -> None:
        """Take ``n`` bytes (a message already handled) off the socket; close its fds. A
        message whose real fds are not the ``nfds`` the peek gave (a front-end that sent
        fds a message does not carry) closes the connection.

        The bytes were peeked: they are all there, and the read that takes the last of them
        is followed by the record of it (``vu_consumed``) with no scheduling point in
        between. (Through trio's socket, the read returns through a checkpoint: a vdev killed
        while other tasks ran there left a record saying the message was still in the
        socket; the next vdev then took QEMU's *next* message for it, consumed it unanswered,
        and QEMU waited for that reply for ever with its vCPU stopped.)"""
        left = n
        got = 0
        while left:
            chunk, anc, _ = await self._recvmsg(left)  # awaits only when nothing is there
            fds = _fds_from(anc)
            got += len(fds)
            close_fds(fds)
            if not chunk:
                raise PeerClosed
            left -= len(chunk)
        self._vu_consumed += 1
        if self.state is not None:
            self.state.h["vu_consumed"] = self._vu_consumed
        if nfds is not None and got != nfds:
            raise FrontendError(f"{self.name}: a message carried {got} fds, expected {nfds}")

    # -- hand-over: the record -------------------------------------------------------------

    def _sync_fds(self) -> None:
        """Store every fd the connection holds now under its role; drop what it let go."""
        st = self.fdstore
        if st is None:
            return
        want: dict[str, int] = {}
        for r in self.memory.regions:
            want[f"mem.{r.fd}"] = r.fd
        for q in self.queues:
            for which in ("kick", "call", "err"):
                fd = getattr(q, f"{which}_fd")
                if fd is not None:
                    want[f"q{q.index}.{which}.{fd}"] = fd
        if self._backend is not None:
            want[f"backend.{self._backend.fileno()}"] = self._backend.fileno()
        for key in [k for k in st.names if k not in want]:
            st.put(key, None)
        for key, fd in want.items():
            if key not in st.names:
                st.put(key, fd, poll=not key.startswith("mem."))

    def _record(self) -> dict[str, Any]:
        st = self.fdstore
        assert st is not None
        names = st.names
        return {
            "v": 1,
            "device": self.device.name,
            "guest": self.guest,
            "proto": {
                "acked": self.proto.acked_features,
                "protocol": self.proto.protocol_features,
                "state": self.proto.state.value,
                "started": sorted(self.proto.started),
                "stopped_at": {str(k): v for k, v in self.proto.stopped_at.items()},
            },
            "memory": [
                {
                    "gpa": r.spec.guest_phys_addr,
                    "size": r.spec.memory_size,
                    "uaddr": r.spec.userspace_addr,
                    "offset": r.spec.mmap_offset,
                    "fd": names[f"mem.{r.fd}"],
                }
                for r in self.memory.regions
            ],
            "rings": [
                {
                    "size": q.size,
                    "desc": q.desc,
                    "avail": q.avail,
                    "used": q.used,
                    "addr_set": q.addr_set,
                    "last_avail": q.last_avail_idx,
                    "used_idx": q.used_idx,
                    "event_idx": q.event_idx,
                    "indirect": q.indirect,
                    "enabled": q.enabled,
                    "started": q.started,
                    "broken": q.broken,
                    "counters": dict(q.counters),
                    **{
                        which: names.get(f"q{q.index}.{which}.{getattr(q, f'{which}_fd')}")
                        for which in ("kick", "call", "err")
                    },
                }
                for q in self.queues
            ],
            "backend": (
                names.get(f"backend.{self._backend.fileno()}")
                if self._backend is not None
                else None
            ),
            "config_change_pending": self._config_change_pending,
            "device_state": self.device.save_state(),
            "pending": [list(c) for c in self._pending[0]] if self._pending else [],
            "used_base": self._pending[1] if self._pending else {},
            "vu": self._vu_note,
            "reclaimed": self.memory.reclaimed_bytes_total,
            "manual_target": self.server.registry.manual.get(self.guest),
        }

    def _commit(
        self, pending: list[tuple[int, int, int]] | None = None, vu: dict[str, Any] | None = None
    ) -> None:
        """Commit the connection's state. ``pending``: the completions of the batch about to
        be pushed (kept, with the used indices they start at, until :meth:`_complete` pushed
        them: a commit in between, e.g. for a vhost-user message while a reclaim runs in a
        thread, records them too). ``vu``: the vhost-user message being answered (kept
        likewise until a newer one: :meth:`resume_vhost_user` acts on it only while that
        message is still unconsumed)."""
        if self.state is None or self.fdstore is None or self.closed:
            return
        if pending is not None:
            self._pending = (list(pending), {str(q.index): q.used_idx for q in self.queues})
        if vu is not None:
            self._vu_note = vu
        self._sync_fds()
        self.state.commit(self._record())
        self.fdstore.committed()

    # -- hand-over: resuming -------------------------------------------------------------

    @classmethod
    def resume(
        cls,
        server: Server,
        guest: str,
        device_cls: type[Device],
        sock_fd: int,
        state_fd: int,
    ) -> Connection:
        """Rebuild a connection from the fd store (``conn.<guest>``, ``state.<guest>`` and
        the fds its record names). Raises :class:`HandoverError` when it cannot."""
        handover = server.handover
        assert handover is not None
        state = StateFile.open(state_fd)
        try:
            record = state.read_record()
            if record is None:
                raise HandoverError("no committed record")
            if record.get("device") != device_cls.name:
                raise HandoverError(f"state of a {record.get('device')!r} device")
            undone = state.rollback()
            if undone:
                log.info("%s: rolled back an unfinished batch (%d map edits)", guest, undone)
        except BaseException:
            state.close()
            raise
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=sock_fd))
        self = cls(server, sock, guest, device_cls, state=state)
        try:
            self._restore(record)
        except BaseException:
            self.closed = True
            self.rings.close()
            close_regions(self.memory.detach())
            raise
        return self

    def _restore(self, rec: dict[str, Any]) -> None:
        handover = self.server.handover
        st = self.fdstore
        assert handover is not None and st is not None and self.state is not None

        def fd_of(name: str | None, key: str) -> int | None:
            if not name:
                return None
            fd = handover.take(name)
            if fd is None:
                raise HandoverError(f"{self.name}: stored fd {name} is missing")
            st.adopt(f"{key}.{fd}", name, fd)
            return fd

        p = rec["proto"]
        self.proto.acked_features = int(p["acked"])
        self.proto.protocol_features = int(p["protocol"])
        self.proto.state = State(p.get("state", State.NEGOTIATED.value))
        self.proto.started = {int(i) for i in p.get("started", ())}
        self.proto.stopped_at = {int(k): int(v) for k, v in p.get("stopped_at", {}).items()}
        specs, fds = [], []
        for m in rec["memory"]:
            fd = handover.take(m["fd"])
            if fd is None:
                raise HandoverError(f"{self.name}: stored memory fd {m['fd']} is missing")
            st.adopt(f"mem.{fd}", m["fd"], fd)
            specs.append(
                RegionSpec(int(m["gpa"]), int(m["size"]), int(m["uaddr"]), int(m["offset"]))
            )
            fds.append(fd)
        if specs:
            self.memory.set_table(specs, fds)
        for q, r in zip(self.queues, rec["rings"], strict=False):
            q.size = int(r["size"])
            q.desc, q.avail, q.used = int(r["desc"]), int(r["avail"]), int(r["used"])
            q.addr_set = bool(r["addr_set"])
            q.last_avail_idx = int(r["last_avail"])
            q.used_idx = int(r["used_idx"])
            q.event_idx, q.indirect = bool(r["event_idx"]), bool(r["indirect"])
            q.enabled, q.started, q.broken = (
                bool(r["enabled"]),
                bool(r["started"]),
                bool(r["broken"]),
            )
            q.counters.update(
                {k: int(v) for k, v in r.get("counters", {}).items() if k in q.counters}
            )
            for which in ("kick", "call", "err"):
                fd = fd_of(r.get(which), f"q{q.index}.{which}")
                if which == "kick" and fd is not None:
                    with contextlib.suppress(OSError):
                        os.set_blocking(fd, False)
                setattr(q, f"{which}_fd", fd)
            if q.started:
                self.rings.arm(q.index)
        backend = fd_of(rec.get("backend"), "backend")
        if backend is not None:
            self._backend = trio.socket.from_stdlib_socket(socket.socket(fileno=backend))
        self._config_change_pending = bool(rec.get("config_change_pending"))
        self.device.load_state(rec.get("device_state") or {})
        self.device.features_negotiated(self.proto.acked_features)
        self.device.rings_changed()
        self.memory.reclaimed_bytes_total = int(rec.get("reclaimed", 0))
        manual = rec.get("manual_target")
        self.manual_target = int(manual) if isinstance(manual, int) else None
        # the avail events as of the record: the old process may have died between
        # recording a batch and publishing the event after it, and a driver that reads a
        # stale event does not kick for its next buffer
        for q in self.queues:
            if q.ready and not self.memory.empty:
                with contextlib.suppress(RingBroken):
                    q.publish_avail_event(self.memory)
        # a reclaim the old process had not finished is finished before any answer is
        # written again: no LOCK is answered before its pages are gone (PROTOCOL.md)
        self._reconcile_holes()
        # the last batch's completions: written again where they were (idempotent)
        base = {int(k): int(v) for k, v in (rec.get("used_base") or {}).items()}
        by_queue: dict[int, list[tuple[int, int]]] = {}
        for qi, head, length in rec.get("pending") or []:
            by_queue.setdefault(int(qi), []).append((int(head), int(length)))
        for qi, done in by_queue.items():
            q = self.queues[qi]
            if not q.addr_set or qi not in base:
                continue
            q.used_idx = base[qi]
            try:
                if q.push(self.memory, done):
                    q.signal()
            except RingBroken:
                pass
        self._vu_consumed = int(self.state.h["vu_consumed"])

    def _reconcile_holes(self) -> None:
        """Punch every page of the map out of the RAM files again (idempotent): a reclaim
        the previous process had not finished is finished."""
        pages = self.device.ctx.pages
        if pages is None or self.memory.empty:
            return
        for starts, length in (
            (pages.locked_4k(), 1),
            (pages.locked_2m() * np.uint64(PAGES_PER_2M), PAGES_PER_2M),
        ):
            if starts.size:
                rec = coalesce(starts, length)
                with contextlib.suppress(HostResourceError):
                    self.memory.reclaim(rec.pfn_starts, rec.pfn_counts)

    async def resume_vhost_user(self) -> None:
        """Finish the vhost-user message the previous process was answering (see above)."""
        state = self.state
        assert state is not None
        rec = state.read_record() or {}
        note = rec.get("vu")
        if not note or int(note.get("seq", -1)) != self._vu_consumed:
            return  # nothing recorded but unconsumed: the reader handles what is queued
        seq = self._vu_consumed
        reply = bytes.fromhex(note.get("reply", ""))
        data, fds = await self._peek_message()
        close_fds(fds)
        if note.get("msg", _digest(data)) != _digest(data):
            # not the recorded message: that one was consumed (the kill fell between the
            # consuming read and its record); its reply had gone (marked before consuming)
            log.info("%s: message %d had been consumed", self.name, seq)
            self._vu_consumed += 1
            state.h["vu_sent"] = self._vu_consumed
            state.h["vu_consumed"] = self._vu_consumed
            return
        if reply and int(state.h["vu_sent"]) != seq + 1:
            queued_after = _inq(self.sock) > len(data)
            if _outq(self.sock) > 0 or queued_after:
                log.info("%s: the reply to message %d had gone out", self.name, seq)
            else:
                log.warning("%s: sending the reply to message %d again", self.name, seq)
                await self._send_all(reply)
            state.h["vu_sent"] = seq + 1
        await self._consume(len(data))

    # -- requests ------------------------------------------------------------------------

    async def _handle(self, msg: Message) -> bytes:
        log.debug("%s: %s", self.name, msg)
        r = msg.request
        if r in NEGOTIATION:
            if r is R.SET_FEATURES:
                for q in self.queues:
                    q.event_idx = self.proto.event_idx
                    q.indirect = self.proto.indirect
                    if self.proto.rings_start_enabled:
                        q.enabled = True
                self.device.features_negotiated(self.proto.acked_features)
            reply = self.proto.answer(msg)
        else:
            handler = getattr(self, f"_on_{r.name.lower()}")
            result: bytes | None = await handler(msg)
            reply = result if result is not None else self.proto.ack(msg)
        reason = self.proto.take_reset()
        if reason is not None:
            await self._device_reset(reason)
        return reply

    async def _device_reset(self, reason: str) -> None:
        """The front-end reset the device (``vdev/vhost_user.py`` says how that is seen: a
        ring restarted at another base, features re-negotiated, RESET_DEVICE): the device
        forgets the balloon, as a real one does. The pages it had reclaimed are zero pages
        the guest may use again; what the new driver inflates is reclaimed anew."""
        async with self.lock:
            forgotten = self.device.size_pages()
            work = self.device.device_reset()
            self.server.registry.note_reset(self.guest)
            await self._execute(work)
            self.server.registry.note_size(self.guest, self.device.size_pages())
        log.info(
            "%s: device reset (%s): forgot a balloon of %d pages", self.name, reason, forgotten
        )

    def _queue(self, msg: Message) -> VirtQueue:
        return self.queues[msg.vring_index]  # index and ring state checked by the machine

    async def _on_set_mem_table(self, msg: Message) -> None:
        specs = [
            RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in msg.body.regions
        ]
        try:
            async with self.lock:
                self.memory.set_table(specs, list(msg.fds))
                self.device.rings_changed()
        finally:
            await self._close_released()  # the old table (or the refused one)
        log.info(
            "%s: memory table: %d regions, %d pages of RAM",
            self.name,
            len(specs),
            self.memory.total_pages,
        )
        self.ram_problems = check_peer_regions(self._peer_pid, specs)
        for problem in self.ram_problems:
            log.warning("%s: %s", self.name, problem)

    async def _on_add_mem_reg(self, msg: Message) -> None:
        r = msg.body.region
        spec = RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        try:
            async with self.lock:
                if len(self.memory.regions) >= self.proto.max_mem_slots:
                    await _close_in_thread(msg.fds)
                    raise FrontendError(
                        f"{self.name}: more than {self.proto.max_mem_slots} regions"
                    )
                self.memory.add_region(spec, msg.fds[0])
                self.device.rings_changed()
        finally:
            await self._close_released()  # a region it replaced (or the refused one)

    async def _on_rem_mem_reg(self, msg: Message) -> None:
        r = msg.body.region
        spec = RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        async with self.lock:
            if not self.memory.remove_region(spec):
                log.warning(
                    "%s: REM_MEM_REG of an unknown region gpa=%#x", self.name, spec.guest_phys_addr
                )
            self.device.rings_changed()
        await _close_in_thread([*self.memory.take_released(), *msg.fds])  # fd: unused

    async def _on_set_vring_num(self, msg: Message) -> None:
        async with self.lock:
            self._queue(msg).set_num(msg.body.num)

    async def _on_set_vring_base(self, msg: Message) -> None:
        async with self.lock:
            self._queue(msg).set_base(msg.body.num)

    async def _on_set_vring_addr(self, msg: Message) -> None:
        b = msg.body
        async with self.lock:
            self._queue(msg).set_addr(self.memory, b.desc, b.used, b.avail)
            self.device.rings_changed()

    async def _on_get_vring_base(self, msg: Message) -> bytes:
        async with self.lock:
            q = self._queue(msg)
            self.device.queue_stopped(q.index)
            self.rings.forget_kick(q)
            base = q.stop()
            self.rings.disarm(q.index)
        log.debug("%s: ring %d stopped at %d", self.name, q.index, base)
        return self.proto.vring_base_reply(msg, base)

    async def _on_set_vring_kick(self, msg: Message) -> None:
        q = self._queue(msg)
        fd = msg.fd
        if fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, False)
        self.rings.forget_kick(q)
        q.replace_fd("kick", fd)
        q.started = True
        self.rings.arm(q.index)
        if self._config_change_pending:
            self._send_config_change()

    async def _on_set_vring_call(self, msg: Message) -> None:
        self._queue(msg).replace_fd("call", msg.fd)

    async def _on_set_vring_err(self, msg: Message) -> None:
        self._queue(msg).replace_fd("err", msg.fd)

    async def _on_set_vring_enable(self, msg: Message) -> None:
        q = self._queue(msg)
        q.enabled = bool(msg.body.num)
        if q.enabled and q.started and self._nursery is not None:
            self._nursery.start_soon(self.process, q.index)

    async def _on_get_config(self, msg: Message) -> bytes:
        b = msg.body
        data = self.device.read_config(b.offset, b.size)
        body = vu.build_payload(
            vu.CONFIG,
            {"offset": b.offset, "size": b.size, "flags": b.flags, "data": data},
            "config",
        )
        return self.proto.reply(msg, body)

    async def _on_set_config(self, msg: Message) -> None:
        b = msg.body
        await self._lock()
        try:
            work = self.device.write_config(b.offset, bytes(b.data), migration=b.flags == 1)
            await self._execute(work)
        finally:
            self.lock.release()

    async def _on_set_backend_req_fd(self, msg: Message) -> None:
        fd = msg.fds[0]
        try:
            sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        except OSError as exc:
            close_fds(msg.fds)
            raise FrontendError(
                f"{self.name}: SET_BACKEND_REQ_FD fd is not a socket: {exc}"
            ) from None
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise FrontendError(f"{self.name}: back-end channel is not a stream socket")
        if self._backend is not None:
            self._backend.close()
        self._backend = sock
        self._start_backend(sock)

    def _start_backend(self, sock: trio.socket.SocketType) -> None:
        send, recv = trio.open_memory_channel[bytes](1)
        if self._backend_send is not None:
            self._backend_send.close()
        self._backend_send = send
        assert self._nursery is not None
        self._nursery.start_soon(self._backend_writer, sock, recv)
        self._nursery.start_soon(self._backend_reader, sock)

    async def _on_reset_device(self, msg: Message) -> None:
        async with self.lock:
            for i, q in enumerate(self.queues):
                self.rings.forget_kick(q)
                q.close()
                q.enabled = False
                q.broken = False
                self.rings.disarm(i)
            self.device.features_negotiated(0)  # the acked features are gone (vhost_user.py)
        # the balloon is forgotten by _handle: the machine reports RESET_DEVICE as a reset

    _on_reset_owner = _on_reset_device

    # -- rings ---------------------------------------------------------------------------

    async def _kick_loop(self, q: VirtQueue) -> None:
        await self.rings.kick_loop(q, self.process)

    async def process(self, index: int) -> None:
        """Let the device serve ring ``index`` until it takes nothing more."""
        q = self.queues[index]
        while True:
            await self._lock()
            try:
                if not q.ready or self.closed:
                    return
                try:
                    seen = q.avail_idx(self.memory)
                    work = self.device.kick(index)
                    await self._execute(work)
                    more = q.publish_avail_event(self.memory, seen) if q.ready else False
                except RingBroken:
                    return
            finally:
                self.lock.release()
            # EVENT_IDX: go on while buffers arrived during this pass, before the avail
            # event was published (their driver read the old one and may not have kicked).
            # Every pass publishes, even one that pops nothing: after a restart the
            # published event can be behind (the old process died before publishing).
            # Buffers the device leaves on the ring on purpose (eventq) do not count, or an
            # idle guest's ring is served in a loop. Without EVENT_IDX: until a pass pops
            # nothing.
            if not (more if q.event_idx else work.popped):
                return
            await trio.lowlevel.checkpoint()

    async def _lock(self) -> None:
        """Take :attr:`lock`: at once when it is free (the usual case: a kick or a config
        write while the vCPU waits), without the scheduler pass ``async with`` costs."""
        try:
            self.lock.acquire_nowait()
        except trio.WouldBlock:
            await self.lock.acquire()

    async def process_all(self) -> None:
        for q in self.queues:
            await self.process(q.index)

    async def answer_queued(self) -> None:
        """One pass over every ready ring: what the guest queued is answered (BUSY after
        :meth:`Device.shutdown`); what it queues afterwards is not waited for. (Serving the
        rings until they go quiet would let a busy guest hold shutdown up.)"""
        for q in self.queues:
            async with self.lock:
                if not q.ready or self.closed:
                    continue
                try:
                    await self._execute(self.device.kick(q.index))
                except RingBroken:
                    continue
                except Exception:  # a bug: this guest's queue goes unanswered, not shutdown
                    log.exception("%s: answering ring %d at shutdown", self.name, q.index)

    async def _execute(self, work: Work) -> None:
        """Carry out a device's Work: commit it (hand-over), reclaim, then used rings, then
        calls, then config.

        Every reclaim of the Work (one per LOCK batch the kick found on the ring: a driver
        with several commands in flight) goes to the kernel as one: the runs of all batches
        are planned together, so runs adjacent across batches merge into one punch. The
        completions are pushed only after it: no LOCK is answered before its pages are gone.
        """
        if work:
            self._commit(work.completions)
        if len(work.reclaims) > 1:
            starts = np.concatenate([r.pfn_starts for r in work.reclaims])
            counts = np.concatenate([r.pfn_counts for r in work.reclaims])
            reclaims: list[tuple[Any, Any]] = [(starts, counts)]
        else:
            reclaims = [(r.pfn_starts, r.pfn_counts) for r in work.reclaims]
        for pfn_starts, pfn_counts in reclaims:
            try:
                await self.memory.reclaim_async(pfn_starts, pfn_counts)
            except HostResourceError as exc:
                log.error("%s: reclaim failed: %s", self.name, exc)
        if work.reclaims:
            await self._close_released()  # regions the table dropped while a worker used them
        self._complete(work, committed=True)

    def _complete(self, work: Work, *, committed: bool = False) -> None:
        """The synchronous rest of :meth:`_execute` (after the reclaims): used rings, calls,
        config change, size event."""
        if work and not committed:
            self._commit(work.completions)
        self.rings.push(self.memory, work.completions)
        self._pending = None  # pushed: nothing to write again after a restart
        if work.config_changed:
            self._send_config_change()
        if work.reclaims or work.popped:
            self.server.registry.note_size(self.guest, self.device.size_pages())

    # -- operator requests ---------------------------------------------------------------

    async def _control_loop(self) -> None:
        async for action in self._control_recv:
            try:
                async with self.lock:
                    await self._execute(action())
            finally:
                self._control_queued -= 1

    async def _stats_loop(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            await self.refresh_stats()

    # -- back-end channel ----------------------------------------------------------------

    def _send_config_change(self) -> None:
        if self._backend_send is None or not (
            self.proto.has_protocol(PF.CONFIG) and self.proto.has_protocol(PF.BACKEND_REQ)
        ):
            return
        if not any(q.started for q in self.queues):  # suspended: no messages to the front-end
            self._config_change_pending = True
            return
        self._config_change_pending = False
        with contextlib.suppress(
            trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
        ):  # a full channel already holds one; a writer that ended logged why
            self._backend_send.send_nowait(self.proto.config_change_message())

    async def _backend_writer(
        self, sock: trio.socket.SocketType, recv: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        async with recv:
            async for data in recv:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[await sock.send(view) :]
                except (OSError, trio.ClosedResourceError) as exc:
                    log.warning("%s: back-end channel send failed: %s", self.name, exc)
                    return

    async def _backend_reader(self, sock: trio.socket.SocketType) -> None:
        """Discard anything the front-end sends on the back-end channel (we never ask)."""
        try:
            while True:
                data, anc, _, _ = await sock.recvmsg(4096, _ANC_SPACE)
                close_fds(_fds_from(anc))
                if not data:
                    return
        except (OSError, trio.ClosedResourceError):
            return


def _digest(message: bytes) -> str:
    """What the hand-over record keeps of a message to recognise it in the socket again
    (two identical messages in a row cannot be told apart: a narrower check, not a proof)."""
    return hashlib.blake2b(message, digest_size=8).hexdigest()


def _inq(sock: trio.socket.SocketType) -> int:
    """Bytes queued for reading (SIOCINQ: every skb of a unix stream socket)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return int(buf[0])


def _outq(sock: trio.socket.SocketType) -> int:
    """Bytes we sent that the peer has not read yet (SIOCOUTQ)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    except OSError:
        return 0
    return int(buf[0])


def _peer_hung_up(sock: trio.socket.SocketType) -> bool:
    p = select.poll()
    p.register(sock.fileno(), select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in p.poll(0))
