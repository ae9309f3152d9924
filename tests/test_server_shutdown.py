"""``vdev serve`` exits quickly on SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import trio
from server_helpers import (
    MiB,
)

from guest_driver.frontend import VmwChannel, connect_frontend
from protocol.vmw import ALL_CAPABILITIES, Command

#: "Promptly": what separates an exit that waits on nothing from one that waits for the guests
#: to go quiet (the hammer below never does) or for a timeout. About 0.1-0.3 s on an idle
#: machine; the margin is for a loaded 2-core CI host, where the interpreter's own teardown
#: alone has been seen to take over a second.
PROMPT = 5.0


def _time_sigterm(srv: Any) -> tuple[float, int]:
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    while srv.proc.poll() is None and time.monotonic() - t0 < 10:
        time.sleep(0.002)
    return time.monotonic() - t0, srv.proc.wait(5)


async def test_sigterm_exit_is_quick(vdev_process, guest_ram) -> None:
    """``vdev serve`` exits promptly on SIGTERM (:data:`PROMPT`): with no guest (~0.1 s on
    an idle machine, most of it the interpreter's own teardown), and with guests connected, one of them keeping its command
    ring busy (shutdown answers what is queued once, it does not serve until it goes quiet)."""
    with trio.fail_after(60):
        idle = vdev_process(sockets=2, verbose=1)
        await trio.sleep(0.3)
        took, code = await trio.to_thread.run_sync(_time_sigterm, idle)
        assert code == 0 and took < PROMPT, f"exit took {took:.2f} s with no guest"

        busy = vdev_process(sockets=2, verbose=1)
        async with (
            connect_frontend(busy.paths[0], guest_ram(64 * MiB)) as a,
            connect_frontend(busy.paths[1], guest_ram(64 * MiB)) as b,
        ):
            channels = [VmwChannel(a), VmwChannel(b)]
            for ch in channels:
                await ch.call(Command.START, int(ALL_CAPABILITIES))
            calls = 0

            async def hammer() -> None:
                nonlocal calls
                with contextlib.suppress(Exception):  # until the back-end goes away
                    while True:
                        await channels[0].call(Command.GET_TARGET)
                        calls += 1

            async with trio.open_nursery() as inner:
                inner.start_soon(hammer)
                await trio.sleep(0.3)
                took, code = await trio.to_thread.run_sync(_time_sigterm, busy)
                inner.cancel_scope.cancel()
        assert calls > 0
        assert code == 0 and took < PROMPT, f"exit took {took:.2f} s with busy guests"
        assert "Traceback" not in busy.log()
