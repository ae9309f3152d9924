"""``vdev`` that SIGKILLs itself at one point of the vhost-user path, once (hand-over tests).

Run as ``python tests/crashing_vdev.py serve ...`` with ``VBALLOON_CRASH_AT`` one of
``before-commit`` (a message handled, nothing recorded), ``before-send`` (recorded, reply not
sent), ``before-consume`` (reply sent and marked, message still in the socket), ``in-consume`` (at
the first scheduling point while the message is being consumed, before the consumption is
recorded: there must be none once its bytes are read), ``after-read`` (consumed, the record
left as it was before: a kill in the few instructions between the read and its record) with
``VBALLOON_CRASH_REQUEST`` the vhost-user request number; or, on a ring batch that reclaims
pages, ``batch-before-commit`` (the model changed the page map, nothing recorded) and
``batch-before-punch`` (recorded, the pages not yet punched) and ``batch-before-push``
(recorded and reclaimed, the used ring not written). A resumed vdev logs an error if it
writes a recorded answer again before it finished the reclaim the old process left.
``VBALLOON_CRASH_FLAG`` is a file whose existence arms the crash (it is removed when it fires:
the restarted vdev runs on).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vdev import connection as C
from vdev import memory as M
from vdev import virtq as V
from vdev.cli.main import main

POINT = os.environ.get("VBALLOON_CRASH_AT", "")
REQUEST = int(os.environ.get("VBALLOON_CRASH_REQUEST", "-1"))
FLAG = Path(os.environ.get("VBALLOON_CRASH_FLAG", "/nonexistent"))


def _fire(conn: Any, point: str, *, batch: bool = False) -> None:
    if point != POINT or not FLAG.exists():
        return
    if batch or getattr(conn, "_crash_request", None) == REQUEST:
        FLAG.unlink()
        os.kill(os.getpid(), signal.SIGKILL)


_handle, _commit, _send, _consume = (
    C.Connection._handle, C.Connection._commit, C.Connection._send_all, C.Connection._consume,
)  # fmt: skip
_execute, _complete = C.Connection._execute, C.Connection._complete
_restore, _reconcile = C.Connection._restore, C.Connection._reconcile_holes
_reclaim_async, _push = M.GuestMemory.reclaim_async, V.VirtQueue.push
_restoring: list[Any] = []  # the connection being resumed, while _restore runs


async def execute(self: Any, work: Any) -> None:
    if work.reclaims:
        _fire(self, "batch-before-commit", batch=True)
    await _execute(self, work)


def complete(self: Any, work: Any, *, committed: bool = False) -> None:
    if work.reclaims and committed:
        _fire(self, "batch-before-push", batch=True)
    _complete(self, work, committed=committed)


async def reclaim_async(self: Any, starts: Any, counts: Any) -> int:
    _fire(None, "batch-before-punch", batch=True)
    return await _reclaim_async(self, starts, counts)


def restore(self: Any, rec: Any) -> None:
    self._crash_reconciled = False
    _restoring.append(self)
    try:
        _restore(self, rec)
    finally:
        _restoring.remove(self)


def reconcile(self: Any) -> None:
    _reconcile(self)
    self._crash_reconciled = True


def push(self: Any, mem: Any, done: Any) -> Any:
    if _restoring and not _restoring[-1]._crash_reconciled:
        logging.getLogger("vdev.crash").error(
            "crash harness: an answer written again before the reclaim was finished"
        )
    return _push(self, mem, done)


async def handle(self: Any, msg: Any) -> Any:
    self._crash_request = int(msg.request)
    return await _handle(self, msg)


def commit(self: Any, pending: Any = None, vu: Any = None) -> None:
    if vu is not None:
        _fire(self, "before-commit")
    _commit(self, pending, vu)


async def send_all(self: Any, data: bytes) -> None:
    _fire(self, "before-send")
    await _send(self, data)


class _InConsume(trio.abc.Instrument):
    """Fires ``in-consume`` when any task step begins while ``conn`` consumes a message."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        _fire(self.conn, "in-consume")


async def consume(self: Any, n: int, nfds: int | None = None) -> None:
    _fire(self, "before-consume")
    watch = _InConsume(self)
    trio.lowlevel.add_instrument(watch)
    before = int(self.state.h["vu_consumed"]) if self.state is not None else 0
    try:
        await _consume(self, n, nfds)
    finally:
        trio.lowlevel.remove_instrument(watch)
    armed = FLAG.exists() and getattr(self, "_crash_request", None) == REQUEST
    if POINT == "after-read" and self.state is not None and armed:
        self.state.h["vu_consumed"] = before
        _fire(self, "after-read")


C.Connection._handle = handle  # type: ignore[method-assign]
C.Connection._commit = commit  # type: ignore[method-assign]
C.Connection._send_all = send_all  # type: ignore[method-assign]
C.Connection._consume = consume  # type: ignore[method-assign]
C.Connection._execute = execute  # type: ignore[method-assign]
C.Connection._complete = complete  # type: ignore[method-assign]
C.Connection._restore = restore  # type: ignore[method-assign]
C.Connection._reconcile_holes = reconcile  # type: ignore[method-assign]
M.GuestMemory.reclaim_async = reclaim_async  # type: ignore[method-assign,assignment]
V.VirtQueue.push = push  # type: ignore[method-assign,assignment]

if __name__ == "__main__":
    main()
