"""``vdev supervise --standby``: the next ``vdev serve`` waits started and imported; when the
serving one exits it takes the store over (no Python start-up in a restart), a new standby
follows once it is ready, SIGHUP warms a standby of the new command before stopping the old
one, and a standby never outlives its supervisor."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import trio
from supervise_helpers import alive, cmdline, retry, supervised_from_file

from lab.vdev_process import (
    ApiVdev,
    served_pid,
    supervised_children,
    warm_standby,
)


async def standby(vdev: ApiVdev) -> int:
    """The pid of the supervisor's standby, once it said it is warm."""
    with trio.fail_after(60):
        while (pid := warm_standby(vdev.proc.pid, vdev.proc.log())) is None:
            await trio.sleep(0.05)
    assert len(supervised_children(vdev.proc.pid)) == 2
    return pid


async def next_served(vdev: ApiVdev, old: int) -> int:
    with trio.fail_after(30):
        while (pid := served_pid(vdev.proc.pid)) in (old, None):
            await trio.sleep(0.005)
    assert pid is not None
    return pid


async def test_standby_takes_over_and_never_outlives_the_supervisor(tmp_path: Path) -> None:
    with trio.fail_after(150):
        async with supervised_from_file(tmp_path) as (vdev, argv, cmd_file):
            # SIGKILL: the warm standby is the next vdev, and serves the same sockets
            first = served_pid(vdev.proc.pid)
            assert first is not None
            first_standby = await standby(vdev)
            os.kill(first, signal.SIGKILL)
            assert await next_served(vdev, first) == first_standby
            assert (await retry(lambda: vdev.set_target(100)))["target_pages"] == 100
            # SIGTERM (a hand-over): the same, and a fresh standby followed the last one
            standby2 = await standby(vdev)
            assert standby2 != first_standby
            os.kill(first_standby, signal.SIGTERM)
            assert await next_served(vdev, first_standby) == standby2
            assert (await retry(vdev.vm))["name"] == "vm0"
            # SIGHUP with a new command: a standby of *that* command takes over
            await standby(vdev)
            new_argv = [*argv, "--stats-interval", "0"]
            cmd_file.write_text(json.dumps(new_argv))
            os.kill(vdev.proc.pid, signal.SIGHUP)
            third = await next_served(vdev, standby2)
            assert cmdline(third)[-2:] == ["--stats-interval", "0"]
            assert (await retry(vdev.vm))["name"] == "vm0"
            log = (tmp_path / "vdev.log").read_text()
            assert log.count(" took over ") == 3 and log.count("connection resumed") == 0
            # the supervisor dies without a word: its standby leaves by itself (end of file
            # on its socket); the serving vdev keeps the guests until stopped
            standby4 = await standby(vdev)
            os.kill(vdev.proc.pid, signal.SIGKILL)
            with trio.fail_after(20):
                while alive(standby4):
                    await trio.sleep(0.05)
            assert alive(third)
        # vdev_serve's stop: the rest of the supervisor's process group is killed too
        with trio.fail_after(10):
            while alive(third):
                await trio.sleep(0.02)
