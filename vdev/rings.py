"""The rings of one connection: a kick loop per ring, and the used-ring push with its call.

After rust-vmm's ``vhost-user-backend`` event loop (``VringEpollHandler``): the connection
(:mod:`vdev.connection`, the handler) configures the rings from vhost-user messages; this
module waits on their kick eventfds and signals their call eventfds.

* :meth:`Rings.kick_loop`: one task per ring. A ring that has not started waits until it is
  armed (SET_VRING_KICK); a started ring waits on its kick eventfd
  (``trio.lowlevel.wait_readable``), or is polled every :data:`POLL_INTERVAL` when it has no
  kick fd (the no-fd bit) or the fd cannot be polled; each wake-up drains the eventfd and
  calls the connection's ``process(index)``.
* :meth:`Rings.push`: the completions of one device call, published on their used rings,
  then each touched ring's call eventfd signalled when the driver wants an interrupt.

No locking here: the connection calls everything under its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from vdev.memory import GuestMemory
from vdev.virtq import RingBroken, VirtQueue

log = logging.getLogger(__name__)

#: How often a ring without a kick fd is polled.
POLL_INTERVAL = 0.02


class Rings:
    """The :class:`~vdev.virtq.VirtQueue`\\ s of one connection and what wakes them."""

    def __init__(self, name: str, num_queues: int) -> None:
        self.name = name
        self.queues = [VirtQueue(i, name=f"{name}/q{i}") for i in range(num_queues)]
        self._armed = [trio.Event() for _ in self.queues]

    def arm(self, index: int) -> None:
        """Ring ``index`` started (it has a kick fd, or the no-fd bit): wake its loop."""
        self._armed[index].set()

    def disarm(self, index: int) -> None:
        """Ring ``index`` stopped: its loop waits for the next :meth:`arm`."""
        self._armed[index] = trio.Event()

    def forget_kick(self, q: VirtQueue) -> None:
        """Wake the ring task off the old kick fd before it gets closed."""
        if q.kick_fd is not None:
            trio.lowlevel.notify_closing(q.kick_fd)
            q.replace_fd("kick", None)

    def close(self) -> None:
        """Close every ring's fds (the kick loops wake and wait on their next arm)."""
        for q in self.queues:
            self.forget_kick(q)
            q.close()

    async def kick_loop(self, q: VirtQueue, process: Callable[[int], Awaitable[None]]) -> None:
        """Serve ring ``q`` forever: wait for a kick (or poll), then ``await process(index)``."""
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
            await process(q.index)

    def push(self, memory: GuestMemory, completions: list[tuple[int, int, int]]) -> None:
        """Publish ``(queue, head, written length)`` on the used rings, then signal each
        touched ring's call eventfd when its driver wants an interrupt. A broken ring is
        skipped (it logged why; it waits for the front-end to re-arm it)."""
        by_queue: dict[int, list[tuple[int, int]]] = {}
        for qi, head, length in completions:
            by_queue.setdefault(qi, []).append((head, length))
        for qi, done in by_queue.items():
            q = self.queues[qi]
            try:
                if q.push(memory, done):
                    q.signal()
            except RingBroken:
                pass
