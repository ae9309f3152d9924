"""vdev's vhost-user sockets appear only listening: ``vdev.listeners.listen`` binds a temporary name,
listens, then renames it onto the path, so a front-end that connects as soon as the path
exists is never refused (QEMU's ``-chardev socket,reconnect`` would give up a round)."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import trio

from conformance.backend import unix_listening
from lab.vdev_process import spawn_vdev
from vdev import listeners
from vdev.devices.base import get_personality
from vdev.registry import GuestRegistry
from vdev.server import Server


def _connect(path: str) -> int:
    """0 if a connect to ``path`` succeeded, else its errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError as e:
            return e.errno or -1
    return 0


async def test_path_never_exists_before_listen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: at the moment vdev calls listen(), a connect to the final path finds
    nothing there (the old bind-then-listen: the file exists and the connect is refused).
    A stale socket file there is replaced, a non-socket refused."""
    paths = [str(tmp_path / "fresh.sock"), str(tmp_path / "stale.sock")]
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(paths[1])
    stale.close()
    seen: list[int] = []
    cls = type(trio.socket.socket(socket.AF_UNIX))
    listen = cls.listen

    def probing_listen(self: object, backlog: int = 128) -> None:
        seen.append(_connect(paths[len(seen)]))
        listen(self, backlog)  # type: ignore[arg-type]

    monkeypatch.setattr(cls, "listen", probing_listen)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = Server(GuestRegistry("vmw"), get_personality("vmw"), socket_paths=paths)
            await nursery.start(server.run)
            # fresh: nothing there yet; stale: the old file, nobody listening (refused) --
            # but never the new socket before it listens
            assert seen == [errno.ENOENT, errno.ECONNREFUSED]
            monkeypatch.undo()
            assert unix_listening(paths)  # /proc/net/unix lists them by their bound names
            assert [_connect(p) for p in paths] == [0, 0]
            assert sorted(os.listdir(tmp_path)) == ["fresh.sock", "stale.sock"]  # no temp names
            nursery.cancel_scope.cancel()

    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        await listeners.listen(str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "not a socket"


def test_tight_connect_loop_never_refused(tmp_path: Path) -> None:
    """A front-end connecting in a tight loop from before ``vdev serve`` starts: every socket
    (16 of them) is missing, then accepts; never ECONNREFUSED."""
    base = tmp_path / "vm"
    paths = [f"{base}{i}" for i in range(16)]
    outcomes: dict[str, list[int]] = {p: [] for p in paths}
    stop = threading.Event()

    def hammer() -> None:
        pending = list(paths)
        while pending and not stop.is_set():
            for p in list(pending):
                err = _connect(p)
                if err != errno.ENOENT:
                    outcomes[p].append(err)
                if err == 0:
                    pending.remove(p)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    time.sleep(0.05)  # the loop runs before vdev does
    vdev = spawn_vdev(base, socket_count=16, no_api=True, verbose=0, log_path=tmp_path / "log")
    try:
        thread.join(20)
        assert not thread.is_alive(), vdev.log_tail()
        assert unix_listening(paths)
    finally:
        stop.set()
        vdev.stop()
    refused = {p: o for p, o in outcomes.items() if errno.ECONNREFUSED in o}
    assert not refused, refused
    assert all(o and o[-1] == 0 for o in outcomes.values()), outcomes
