"""``vdev serve`` as a child process, driven through its management API (:mod:`vdev.client`).

The one way the guest side (the demo, the end-to-end tests) runs the real device:
:func:`vdev_serve` starts ``python -m vdev serve --socket-path S --api-socket A`` and yields
an :class:`ApiVdev` once both sockets exist; on exit the process is stopped by its PID
(SIGTERM, then SIGKILL) and reaped. :class:`ApiVdev` is what an operator has: the API
(``PUT /vms/{name}/target``, ``POST /vms/{name}/reset``, ``GET /vms/{name}``) and the
operator CLI (``vdev stat`` ...) pointed at the same socket.

The API client is synchronous (httpx); its calls run in a worker thread, one at a time.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from protocol.errors import LocalError

from .qemu import qemu_process

REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


class ApiVdev:
    """A running ``vdev serve`` seen through its API socket; methods act on guest ``name``."""

    def __init__(self, proc: trio.Process, socket_path: Path, api_socket: Path, name: str):
        from vdev.client import ApiClient

        self.proc = proc
        self.socket_path = socket_path
        self.api_socket = api_socket
        self.name = name
        self.client = ApiClient(str(api_socket))
        self._lock = trio.Lock()

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        async with self._lock:
            return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw))

    async def vm(self) -> dict[str, Any]:
        """``GET /vms/{name}``."""
        return await self._call(self.client.vm, self.name)

    async def size_pages(self) -> int:
        return int((await self.vm())["size_pages"])

    async def snapshot(self) -> dict[str, Any]:
        return await self.vm()

    async def set_target(self, pages: int) -> dict[str, Any]:
        """``PUT /vms/{name}/target {"target_pages": N}`` (a manual target); the VM's view."""
        return await self._call(self.client.set_target, self.name, target_pages=pages)

    async def reset(self) -> dict[str, Any]:
        """``POST /vms/{name}/reset``: demand a balloon reset."""
        return await self._call(self.client.reset, self.name)

    async def set_setting(self, path: str, value: int) -> int:
        """``PUT /settings/{path}``, e.g. ``("Mem/CtlMaxPercent", 99)``."""
        return await self._call(self.client.set_setting, path, value)

    async def cli(self, *args: str) -> str:
        """``vdev ARGS --api-socket S`` (the operator CLI); its stdout. Raises on failure."""
        argv = [sys.executable, "-m", "vdev", *args, "--api-socket", str(self.api_socket)]
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, cwd=REPO_ROOT)
        return bytes(done.stdout).decode()

    def close(self) -> None:
        self.client.close()


def vdev_serve_argv(
    socket_path: Path,
    api_socket: Path,
    *,
    device: str = "vmw",
    target: str = "0",
    verbose: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    argv = [
        sys.executable, "-m", "vdev", "serve", "--device", device,
        "--socket-path", str(socket_path), "--api-socket", str(api_socket), "--target", target,
    ]  # fmt: skip
    if verbose:
        argv.append("-" + "v" * verbose)
    return [*argv, *extra]


@contextlib.asynccontextmanager
async def vdev_serve(
    directory: Path,
    *,
    device: str = "vmw",
    target: str = "0",
    name: str = "vm0",
    socket_name: str = "vm0.sock",
    settings: Mapping[str, int] | None = None,
    extra: Sequence[str] = (),
    log_path: Path | None = None,
    verbose: int = 1,
    timeout: float = 15,
) -> AsyncIterator[ApiVdev]:
    """``vdev serve`` on ``directory/socket_name`` with its API on ``directory/vdev.api``.

    ``settings`` (ESXi-style paths, e.g. ``{"Mem/CtlMaxPercent": 99}``) are applied through
    the API before yielding; ``extra`` goes to the command line (``--host-memory 64G`` ...);
    its output goes to ``log_path`` (default ``directory/vdev.log``)."""
    sock, api = directory / socket_name, directory / "vdev.api"
    argv = vdev_serve_argv(sock, api, device=device, target=target, verbose=verbose, extra=extra)
    with open(log_path or directory / "vdev.log", "ab") as out:
        async with qemu_process(argv, stdout=out.fileno(), stderr=out.fileno()) as proc:
            with trio.fail_after(timeout):
                while not (sock.is_socket() and api.is_socket()):
                    if proc.returncode is not None:
                        raise LocalError(f"vdev serve exited {proc.returncode} before listening")
                    await trio.sleep(0.02)
            handle = ApiVdev(proc, sock, api, name)
            try:
                for path, value in (settings or {}).items():
                    await handle.set_setting(path, value)
                yield handle
            finally:
                handle.close()
