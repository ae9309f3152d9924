"""The trio shell around the sans-I/O back-end: the only module in ``vdev`` that does I/O.

One :class:`Server` per ``vdev serve`` process. It listens on one unix socket per guest
(``--socket-path PATH``, or ``PATH0..PATH(N-1)`` with ``--socket-count N``; guests ``vm0``..),
or serves one already-connected socket (``--fd``). Each accepted front-end becomes a
:class:`Connection` running in the server's nursery:

* one reader task: ``recvmsg`` the 12-byte header (the fds arrive with it), then exactly
  ``size`` payload bytes; feed :class:`~vdev.vhost_user.BackendConnection`; act; reply;
* one task per ring waiting on its kick eventfd (``trio.lowlevel.wait_readable``; a ring
  without a kick fd is polled), draining it and letting the personality process the ring;
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
releases them and the connection closes them in a worker thread. A bug surfacing as an unexpected
exception in one connection closes that connection (logged with its traceback) and never
takes the server down. :meth:`Server.shutdown` (SIGINT/SIGTERM)
answers the requests still queued with ERROR_BUSY, then closes everything.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from protocol import vhost_user as vu
from protocol.errors import FrontendError, GuestError, HostResourceError, PeerClosed, PeerError
from protocol.vhost_user import FrontendRequest as R
from protocol.vhost_user import ProtocolFeature as PF
from vdev.devices.base import Device, DeviceContext, DeviceStatus, Work
from vdev.logs import current_vm
from vdev.memory import GuestMemory, Region, RegionSpec, close_regions
from vdev.ramcheck import check_peer_regions, peer_pid
from vdev.registry import GuestRegistry
from vdev.vhost_user import NEGOTIATION, BackendConnection, Message, close_fds
from vdev.virtq import RingBroken, VirtQueue

log = logging.getLogger(__name__)

#: How often a ring without a kick fd is polled.
POLL_INTERVAL = 0.02
#: The most shutdown waits for the requests queued at that moment to be answered BUSY (one
#: pass per ring, every connection at once; a lock held by a large reclaim is what can
#: make it wait at all).
SHUTDOWN_GRACE = 0.5
#: How long a new front-end waits for the previous one of the same guest to disconnect.
RECONNECT_GRACE = 2.0
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


def socket_paths(path: str, count: int | None) -> list[str]:
    """``PATH`` alone, or ``PATH0..PATH(count-1)`` (rust-vmm's --socket-count)."""
    if count is None:
        return [path]
    return [f"{path}{i}" for i in range(count)]


def listen_temp_path(path: str) -> str:
    """The name a listener is bound to before it is renamed onto ``path`` (``.NAME~`` beside
    it). ``/proc/net/unix`` keeps the bound name, so ``path`` itself is never listed short
    of ``listen()`` (what ``conformance.backend.unix_listening`` checks)."""
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}~")


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
    ) -> None:
        self.server = server
        self.sock = sock
        self.guest = guest
        self.name = f"{guest}#{next(_serial)}"
        self.memory = GuestMemory(self.name)
        self.queues = [VirtQueue(i, name=f"{self.name}/q{i}") for i in range(device_cls.num_queues)]
        self.device = device_cls(
            DeviceContext(self.name, self.memory, self.queues),
            target=server.registry.target_of(guest),
        )
        self.proto = BackendConnection(
            name=self.name,
            device_features=device_cls.features,
            num_queues=device_cls.num_queues,
        )
        self.lock = trio.Lock()
        self._armed = [trio.Event() for _ in self.queues]
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

    async def run(self) -> None:
        registry = self.server.registry
        registry.attach(self.guest, self)
        log.info("%s: front-end connected", self.name)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._control_loop)
                if self.server.stats_interval > 0 and self.device.supports_stats:
                    nursery.start_soon(self._stats_loop, self.server.stats_interval)
                for q in self.queues:
                    nursery.start_soon(self._ring_loop, q)
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
            while True:
                for msg in await self._recv_messages():
                    reply = await self._handle(msg)
                    if reply:
                        await self._send_all(reply)
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
        for q in self.queues:
            self._forget_kick(q)
            q.close()
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
                chunk, anc, flags, _ = await self.sock.recvmsg(n - len(data), _ANC_SPACE)
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

    async def _recv_messages(self) -> list[Message]:
        header, fds = await self._recv_exact(vu.HEADER_SIZE)
        msgs = self.proto.receive(header, fds)  # validates the header before we read on
        if msgs:
            return msgs
        size = vu.parse_header(header).size
        payload, stray = await self._recv_exact(size)
        if stray:
            close_fds(stray)
            self.proto.fail()
            raise FrontendError(f"{self.name}: fds arrived inside a payload")
        return self.proto.receive(payload)

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

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
            return self.proto.answer(msg)
        handler = getattr(self, f"_on_{r.name.lower()}")
        result: bytes | None = await handler(msg)
        return result if result is not None else self.proto.ack(msg)

    def _queue(self, msg: Message, *, stopped: bool = False) -> VirtQueue:
        q = self.queues[msg.vring_index]
        if stopped and q.started:
            raise FrontendError(f"{self.name}: {msg.request.name} on running ring {q.index}")
        return q

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
        self.ram_problems = check_peer_regions(peer_pid(self.sock), specs)  # type: ignore[arg-type]
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
            self._queue(msg, stopped=True).set_num(msg.body.num)

    async def _on_set_vring_base(self, msg: Message) -> None:
        async with self.lock:
            self._queue(msg, stopped=True).set_base(msg.body.num)

    async def _on_set_vring_addr(self, msg: Message) -> None:
        b = msg.body
        async with self.lock:
            self._queue(msg, stopped=True).set_addr(self.memory, b.desc, b.used, b.avail)
            self.device.rings_changed()

    async def _on_get_vring_base(self, msg: Message) -> bytes:
        async with self.lock:
            q = self._queue(msg)
            self.device.queue_stopped(q.index)
            self._forget_kick(q)
            base = q.stop()
            self._armed[q.index] = trio.Event()
        log.debug("%s: ring %d stopped at %d", self.name, q.index, base)
        body = vu.build_payload(vu.VRING_STATE, {"index": q.index, "num": base}, "vring state")
        return self.proto.reply(msg, body)

    async def _on_set_vring_kick(self, msg: Message) -> None:
        q = self._queue(msg)
        fd = msg.fd
        if fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, False)
        self._forget_kick(q)
        q.replace_fd("kick", fd)
        q.started = True
        self._armed[q.index].set()
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
        async with self.lock:
            work = self.device.write_config(b.offset, bytes(b.data), migration=b.flags == 1)
            await self._execute(work)

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
                self._forget_kick(q)
                q.close()
                q.enabled = False
                q.broken = False
                self._armed[i] = trio.Event()
            self.device.features_negotiated(0)  # the acked features are gone (vhost_user.py)
            work = self.device.demand_reset()
            self.server.registry.note_reset(self.guest)
            await self._execute(work)
        log.info("%s: device reset by the front-end", self.name)

    _on_reset_owner = _on_reset_device

    # -- rings ---------------------------------------------------------------------------

    def _forget_kick(self, q: VirtQueue) -> None:
        """Wake the ring task off the old kick fd before it gets closed."""
        if q.kick_fd is not None:
            trio.lowlevel.notify_closing(q.kick_fd)
            q.replace_fd("kick", None)

    async def _ring_loop(self, q: VirtQueue) -> None:
        polled = False
        while True:
            if not q.started:
                await self._armed[q.index].wait()
                continue
            fd = q.kick_fd
            if fd is None or polled:
                await trio.sleep(POLL_INTERVAL)
            else:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    continue  # replaced or stopped
                except OSError as exc:  # e.g. a regular file: not pollable
                    log.warning(
                        "%s: kick fd of ring %d unusable (%s): polling", self.name, q.index, exc
                    )
                    polled = True
                    continue
                q.drain_kick()
            await self.process(q.index)

    async def process(self, index: int) -> None:
        """Let the device serve ring ``index`` until it takes nothing more."""
        q = self.queues[index]
        while True:
            async with self.lock:
                if not q.ready or self.closed:
                    return
                try:
                    work = self.device.kick(index)
                    await self._execute(work)
                    more = q.publish_avail_event(self.memory) if q.ready else False
                except RingBroken:
                    return
            if not (work.popped and (more or not q.event_idx)):
                return
            await trio.lowlevel.checkpoint()

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
        """Carry out a device's Work: reclaim, then used rings, then calls, then config."""
        for rec in work.reclaims:
            try:
                await self.memory.reclaim_async(rec.pfn_starts, rec.pfn_counts)
            except HostResourceError as exc:
                log.error("%s: reclaim failed: %s", self.name, exc)
        if work.reclaims:
            await self._close_released()  # regions the table dropped while a worker used them
        self._complete(work)

    def _complete(self, work: Work) -> None:
        """The synchronous rest of :meth:`_execute` (after the reclaims): used rings, calls,
        config change, size event."""
        by_queue: dict[int, list[tuple[int, int]]] = {}
        for qi, head, length in work.completions:
            by_queue.setdefault(qi, []).append((head, length))
        for qi, completions in by_queue.items():
            q = self.queues[qi]
            try:
                if q.push(self.memory, completions):
                    q.signal()
            except RingBroken:
                pass
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
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
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


class Server:
    """Listeners for every guest socket, and the connections they accept."""

    def __init__(
        self,
        registry: GuestRegistry,
        device_cls: type[Device],
        *,
        socket_paths: Sequence[str] = (),
        names: Sequence[str] | None = None,
        stats_interval: float = 0.0,
    ) -> None:
        if not (stats_interval >= 0 and math.isfinite(stats_interval)):
            raise ValueError("the stats interval must be >= 0 seconds")
        self.registry = registry
        self.device_cls = device_cls
        #: Seconds between guest stats refreshes (0: only on request).
        self.stats_interval = float(stats_interval)
        self.socket_paths = [os.fspath(p) for p in socket_paths]
        self.names = list(names) if names else [f"vm{i}" for i in range(len(self.socket_paths))]
        if len(self.names) != len(self.socket_paths):
            raise ValueError("one name per socket")
        for name, path in zip(self.names, self.socket_paths, strict=True):
            if name not in registry.names():
                registry.add(name, path)
        self.connections: set[Connection] = set()
        self._nursery: trio.Nursery | None = None
        self._listeners: list[trio.socket.SocketType] = []
        self._guest_locks: dict[str, trio.Lock] = {}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every socket and serve until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name, path in zip(self.names, self.socket_paths, strict=True):
                listener = await self._listen(path)
                self._listeners.append(listener)
                nursery.start_soon(self._accept_loop, listener, name)
            log.info("serving %s on %s", self.device_cls.name, ", ".join(self.socket_paths) or "-")
            task_status.started(self)

    async def serve_fd(self, fd: int, name: str = "vm0") -> None:
        """Serve one already-connected socket (``--fd``) until it closes."""
        if name not in self.registry.names():
            self.registry.add(name, f"fd:{fd}")
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._serve(sock, name)

    async def _listen(self, path: str) -> trio.socket.SocketType:
        """A listener on ``path`` that never exists bound but not yet listening (a connect in
        between would be refused): bind a temporary name in the same directory, listen, then
        ``rename`` it onto ``path`` (atomic; it replaces a stale socket file there)."""
        p = Path(path)
        if p.exists() and not p.is_socket():
            raise OSError(errno.EADDRINUSE, "exists and is not a socket", path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = listen_temp_path(path)
        if len(os.fsencode(tmp)) >= 108:  # sun_path: no room for it
            tmp = ""  # bind the final name (a connect may race the listen)
        stale = Path(tmp or path)
        if stale.is_socket():
            stale.unlink()  # left by a vdev that is gone
        try:
            await sock.bind(tmp or path)
            sock.listen(8)
            if tmp:
                os.rename(tmp, path)
        except OSError:
            sock.close()
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        return sock

    async def _accept_loop(self, listener: trio.socket.SocketType, name: str) -> None:
        with listener:
            while True:
                try:
                    sock, _ = await listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("%s: accept failed: %s", name, exc)
                        await trio.sleep(0.1)
                        continue
                    raise
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_when_free, sock, name)

    async def _serve_when_free(self, sock: trio.socket.SocketType, name: str) -> None:
        """One front-end per guest: a new one waits briefly for the old one to go away."""
        current_vm.set(name)  # log lines from this task and its children name the guest
        lock = self._guest_locks.setdefault(name, trio.Lock())
        got = False
        with trio.move_on_after(RECONNECT_GRACE):
            await lock.acquire()
            got = True
        if not got:
            log.warning("%s: a second front-end connected while one is active: refused", name)
            sock.close()
            return
        try:
            await self._serve(sock, name)
        finally:
            lock.release()

    async def _serve(self, sock: trio.socket.SocketType, name: str) -> None:
        current_vm.set(name)
        try:
            conn = Connection(self, sock, name, self.device_cls)
        except BaseException:
            sock.close()
            raise
        self.connections.add(conn)
        try:
            await conn.run()
        except GuestError as exc:  # should have been answered inside; never fatal
            log.error("%s: unexpected guest error: %s", conn.name, exc)
        except Exception:  # a bug: lose this connection, not every guest of the process
            log.exception("%s: internal error, connection closed", conn.name)
        finally:
            self.connections.discard(conn)

    async def shutdown(self) -> None:
        """Answer queued requests with BUSY, then close every connection and listener."""
        log.info("shutting down: answering queued requests BUSY")
        connections = list(self.connections)
        for conn in connections:
            conn.device.shutdown()
        with trio.move_on_after(SHUTDOWN_GRACE):
            async with trio.open_nursery() as nursery:
                for conn in connections:
                    nursery.start_soon(conn.answer_queued)
        for path in self.socket_paths:
            with contextlib.suppress(OSError):
                if Path(path).is_socket():
                    os.unlink(path)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
