"""Shared fixtures for the back-end tests (and anyone else's).

* ``vdev_process`` — a factory starting ``vdev serve`` as a separate process on a fresh
  socket in ``tmp_path``: ``srv = vdev_process(sockets=2, target="64M")``; ``srv.paths``,
  ``srv.proc``, ``srv.log()`` (its stderr so far), ``srv.stop()`` (SIGTERM, returns the exit
  code). Every process is stopped at teardown.
* ``vdev_inproc`` — an async factory running a :class:`vdev.server.Server` inside the test's
  trio nursery: ``server, registry = await vdev_inproc(sockets=1, target_pages=0)``;
  ``registry`` drives targets (``registry.set_target("vm0", pages)``).
* ``guest_ram`` — a factory for :class:`guest_driver.frontend.GuestRamFile` (memfd guest
  RAM, QEMU-like layout by default), closed at teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from guest_driver.frontend import GuestRamFile

MiB = 1 << 20


@dataclass
class VdevProcess:
    proc: subprocess.Popen[bytes]
    paths: list[str]
    stderr_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def vdev_process(tmp_path: Path) -> Iterator[Callable[..., VdevProcess]]:
    started: list[VdevProcess] = []

    def start(
        *extra: str, sockets: int | None = None, target: str = "0", verbose: int = 2
    ) -> VdevProcess:
        base = str(tmp_path / f"vu{len(started)}.sock")
        args = [sys.executable, "-m", "vdev", "serve", "--socket-path", base, "--target", target]
        if sockets is not None:
            args += ["--socket-count", str(sockets)]
        if verbose:
            args.append("-" + "v" * verbose)
        args += list(extra)
        paths = [base] if sockets is None else [f"{base}{i}" for i in range(sockets)]
        err = tmp_path / f"vdev{len(started)}.stderr"
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err.open("wb")
        )
        srv = VdevProcess(proc, paths, err, args)
        started.append(srv)
        deadline = time.monotonic() + 10
        while not all(os.path.exists(p) for p in paths):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vdev serve did not come up:\n{srv.log()}")
            time.sleep(0.01)
        return srv

    yield start
    for srv in started:
        if srv.alive():
            srv.stop()


@pytest.fixture
async def vdev_inproc(nursery: trio.Nursery, tmp_path: Path) -> Any:
    from vdev.device import get_personality
    from vdev.registry import GuestRegistry
    from vdev.server import Server

    async def start(
        sockets: int = 1, target_pages: int = 0, device: str = "vmw"
    ) -> tuple[Any, Any]:
        registry = GuestRegistry(device, target=target_pages)
        paths = [str(tmp_path / f"in{i}.sock") for i in range(sockets)]
        server = Server(registry, get_personality(device), socket_paths=paths)
        await nursery.start(server.run)
        return server, registry

    return start


@pytest.fixture
def guest_ram() -> Iterator[Callable[..., GuestRamFile]]:
    made: list[GuestRamFile] = []

    def make(size: int = 32 * MiB, layout: str = "qemu") -> GuestRamFile:
        ram = GuestRamFile(size, layout=layout)
        made.append(ram)
        return ram

    yield make
    for ram in made:
        ram.close()
