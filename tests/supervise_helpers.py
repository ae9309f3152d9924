"""What the ``vdev supervise`` tests share: a supervised vmw vdev whose command is a file,
and small probes of its processes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from lab.vdev_process import ApiVdev, serve_argv, vdev_serve
from protocol.errors import ApiError


def cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def retry(fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``fn()`` until it works: the API is down while vdev restarts."""
    with trio.fail_after(30):
        while True:
            try:
                return await fn()
            except ApiError:
                await trio.sleep(0.02)


@asynccontextmanager
async def supervised_from_file(tmp_path: Path) -> AsyncIterator[tuple[ApiVdev, list[str], Path]]:
    """``vdev serve`` (vmw, a simulated 64 GiB host) under ``vdev supervise --standby
    --command-file F``: (the vdev, its command, F)."""
    sock, api = tmp_path / "vm0.sock", tmp_path / "vdev.api"
    argv = serve_argv(sock, api_socket=api, device="vmw", extra=["--host-memory", "64G"])
    cmd_file = tmp_path / "vdev.json"
    cmd_file.write_text(json.dumps(argv))
    async with vdev_serve(
        tmp_path, device="vmw", supervised=True, supervisor_args=["--command-file", str(cmd_file)]
    ) as vdev:
        yield vdev, argv, cmd_file
