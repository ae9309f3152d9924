"""``vdev serve`` as a child process: the one way the guest side and the tests start it.

* :func:`serve_argv`: the command line (``python -m vdev serve`` or another ``vdev_cmd``).
* :class:`VdevProcess`: a started child with its log file (a
  :class:`conformance.backend.BackendProcess`, the harness's one way to run any back-end); waits until its sockets listen
  (:meth:`~VdevProcess.wait_listening`, or ``await`` :meth:`~VdevProcess.wait_listening_async`)
  and stops by its PID (:meth:`~VdevProcess.stop`: SIGTERM, then SIGKILL after ``timeout``;
  returns the exit code; ``await`` :meth:`~VdevProcess.stop_async` runs the same in a thread).
* :func:`start_vdev` (blocking: tests' ``vdev_process`` fixture, ``run-qemu --linux``, the wire
  fuzzer) returns a listening :class:`VdevProcess`, also a context manager that stops it;
  :func:`open_vdev` is the same as an async context manager (the stop is shielded);
  :func:`spawn_vdev` only starts it.
* ``socket_count=N`` (every helper) is vdev's ``--socket-count``: sockets ``PATH0..PATH(N-1)``
  for guests vm0..vm(N-1), each waited for (:func:`socket_paths`).
* :func:`vdev_serve` (demo, end-to-end tests) yields an :class:`ApiVdev`: what an operator has,
  the API (``PUT /vms/{name}/target``, ``POST /vms/{name}/reset``, ``GET /vms/{name}``) and
  the operator CLI (``vdev stat`` ...) pointed at the same socket. The API client is
  synchronous (httpx); its calls run in a worker thread, one at a time.

The child gets its own session (a terminal's Ctrl-C reaches only us; we stop it), stdin from
``/dev/null``, stdout and stderr appended to the log file (or ours: ``inherit_output``), the
repository as its working directory (``cwd``) and first on ``PYTHONPATH`` (so another
``vdev_cmd`` script imports this tree's ``vdev``).
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from conformance.backend import VDEV_CMD, BackendProcess, BackendStartError

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0

T = TypeVar("T")


class VdevStartError(BackendStartError):
    """``vdev serve`` exited, or did not listen in time, before it was ready.

    Raised by :class:`VdevProcess`'s waits (``start_vdev``, ``open_vdev``); caught by
    ``scripts/run-qemu`` (reported, exit 1); in tests and the demo it fails the caller."""


def socket_paths(socket_path: str | Path, socket_count: int | None = None) -> list[str]:
    """``PATH`` alone, or ``PATH0..PATH(socket_count-1)`` (vdev's ``--socket-count``)."""
    if socket_count is None:
        return [str(socket_path)]
    return [f"{socket_path}{i}" for i in range(socket_count)]


def serve_argv(
    socket_path: str | Path,
    *,
    socket_count: int | None = None,
    api_socket: str | Path | None = None,
    no_api: bool = False,
    device: str | None = None,
    target: str = "0",
    verbose: int = 1,
    extra: Sequence[str] = (),
    vdev_cmd: Sequence[str] | None = None,
    supervised: bool = False,
    supervisor_args: Sequence[str] = (),
) -> list[str]:
    """``vdev serve`` on ``socket_path`` (with ``socket_count``: ``--socket-count``, sockets
    ``socket_path0..``, see :func:`socket_paths`); the API on ``api_socket`` (default: vdev's,
    ``<first socket>.api``), none with ``no_api``;
    ``device`` None leaves vdev's default personality; ``extra`` is appended. ``supervised``:
    under ``vdev supervise`` (the fd store and restarts, a warm standby, the serving vdev's
    pid in ``<socket_path>.vdev.pid``: :func:`served_pid`)."""
    cmd = list(vdev_cmd or VDEV_CMD)
    supervisor = [*cmd, "supervise", "--restart-delay", "0", "--standby"]
    supervisor += ["--pid-file", f"{socket_path}.vdev.pid", *supervisor_args, "--"]
    prefix = supervisor if supervised else []
    argv = [*prefix, *cmd, "serve"]
    if device is not None:
        argv += ["--device", device]
    argv += ["--socket-path", str(socket_path)]
    if socket_count is not None:
        argv += ["--socket-count", str(socket_count)]
    if api_socket is not None:
        argv += ["--api-socket", str(api_socket)]
    if no_api:
        argv.append("--no-api")
    argv += ["--target", target]
    if verbose:
        argv.append("-" + "v" * verbose)
    return [*argv, *extra]


def vdev_serve_argv(
    socket_path: Path,
    api_socket: Path,
    *,
    device: str = "vmw",
    target: str = "0",
    verbose: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """:func:`serve_argv` with an explicit API socket and personality (``run-qemu --dry-run``)."""
    return serve_argv(
        socket_path, api_socket=api_socket, device=device, target=target, verbose=verbose,
        extra=extra,
    )  # fmt: skip


#: The build name :func:`upgraded_tree`'s copy reports (``vdev serve BUILD from PATH``).
UPGRADE_BUILD = "upgrade-test"


def upgraded_tree(where: Path) -> Path:
    """Another vdev build for upgrade tests: a copy of ``vdev`` and ``protocol`` under
    ``where/upgrade``, named :data:`UPGRADE_BUILD`, byte-compiled as an installed build is."""
    root = where / "upgrade"
    for pkg in ("vdev", "protocol"):
        shutil.copytree(REPO_ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    init = root / "vdev" / "__init__.py"
    init.write_text(init.read_text() + f'\nBUILD = "{UPGRADE_BUILD}"\n')
    compileall.compile_dir(root, quiet=1)
    return root


def upgraded_argv(argv: Sequence[str], root: Path) -> list[str]:
    """``argv`` (a ``python -m vdev ...`` command line) run from the build at ``root``
    (:func:`upgraded_tree`): what a supervisor's ``--command-file`` names for the upgrade.
    ``-P``: not the working directory (this repository) first on ``sys.path``."""
    return ["/usr/bin/env", f"PYTHONPATH={root}", argv[0], "-P", *argv[1:]]


def supervised_children(supervisor_pid: int) -> list[int]:
    """The processes a ``vdev supervise`` runs: the serving vdev and its standby, if any."""
    try:
        children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in children.split()]


def served_pid(supervisor_pid: int) -> int | None:
    """The ``vdev serve`` a ``vdev supervise`` runs now, if any: the one its ``--pid-file``
    names (not its standby), else its only child."""
    try:
        args = Path(f"/proc/{supervisor_pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    pids = supervised_children(supervisor_pid)
    if b"--pid-file" in args[:-1]:
        try:
            pid = int(Path(os.fsdecode(args[args.index(b"--pid-file") + 1])).read_text())
        except (OSError, ValueError):
            return None
        return pid if pid in pids else None
    return pids[0] if pids else None


def warm_standby(supervisor_pid: int, log: str) -> int | None:
    """The standby of a ``vdev supervise --standby`` that is warm now (its ``log`` says so),
    if any."""
    served = served_pid(supervisor_pid)
    pids = supervised_children(supervisor_pid)
    for m in re.finditer(r"standby pid (\d+) warm", log):
        if int(m[1]) in pids and int(m[1]) != served:
            return int(m[1])
    return None


class VdevProcess(BackendProcess):
    """A ``vdev serve`` child (see :func:`start_vdev` / :func:`open_vdev`): a
    :class:`~conformance.backend.BackendProcess` that waits for its vhost-user sockets and,
    when given, its API socket.

    ``proc`` is the :class:`subprocess.Popen`; ``paths`` the vhost-user sockets; ``api_socket``
    the API socket waited for (None: not waited for); ``args`` the command line. Its output
    goes to ``log_path`` (appended), else nowhere, or with ``inherit_output`` to our stdout
    and stderr; it runs in ``cwd`` (default the repository; None: ours) with the repository
    first on ``PYTHONPATH``."""

    start_error = VdevStartError

    def __init__(
        self,
        args: Sequence[str],
        paths: Sequence[str],
        *,
        api_socket: str | Path | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = REPO_ROOT,
        inherit_output: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.api_socket = None if api_socket is None else str(api_socket)
        environ = dict(os.environ if env is None else env)
        environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), environ.get("PYTHONPATH")) if p
        )
        super().__init__(
            args, [*self.paths, *([self.api_socket] if self.api_socket else [])],
            what="vdev serve", log_path=log_path, env=environ, cwd=cwd,
            inherit_output=inherit_output,
        )  # fmt: skip

    def __enter__(self) -> VdevProcess:
        return self


def spawn_vdev(
    socket_path: str | Path,
    *,
    socket_count: int | None = None,
    api_socket: str | Path | None = None,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = REPO_ROOT,
    inherit_output: bool = False,
    **argv_kw: Any,
) -> VdevProcess:
    """Start ``vdev serve`` without waiting: on ``socket_path``, or with ``socket_count`` on
    ``socket_path0..socket_path(N-1)`` (``paths``: every one is waited for). ``argv_kw`` goes
    to :func:`serve_argv` (``device``, ``target``, ``verbose``, ``extra``, ``no_api``,
    ``vdev_cmd``); the API socket, when given, is waited for too."""
    argv = serve_argv(socket_path, socket_count=socket_count, api_socket=api_socket, **argv_kw)
    paths = socket_paths(socket_path, socket_count)
    return VdevProcess(
        argv, paths, api_socket=api_socket, log_path=log_path, env=env, cwd=cwd,
        inherit_output=inherit_output,
    )  # fmt: skip


def start_vdev(
    socket_path: str | Path, *, timeout: float = START_TIMEOUT, **kw: Any
) -> VdevProcess:
    """:func:`spawn_vdev`, then block until it listens (or raise :class:`VdevStartError`,
    the process stopped). Use it as a context manager to stop it on exit."""
    vdev = spawn_vdev(socket_path, **kw)
    vdev.wait_listening(timeout)
    return vdev


@contextlib.asynccontextmanager
async def open_vdev(
    socket_path: str | Path, *, timeout: float = START_TIMEOUT, **kw: Any
) -> AsyncIterator[VdevProcess]:
    """:func:`start_vdev` for trio: yields once it listens; stopped on exit (shielded)."""
    vdev = spawn_vdev(socket_path, **kw)
    try:
        await vdev.wait_listening_async(timeout)
        yield vdev
    finally:
        await vdev.stop_async()


class ApiVdev:
    """A running ``vdev serve`` seen through its API socket; methods act on guest ``name``."""

    def __init__(self, proc: VdevProcess, socket_path: Path, api_socket: Path, name: str):
        from vdev.api.client import ApiClient

        self.proc = proc  # pid, returncode, log(), stop()
        self.socket_path = socket_path  # the first socket (guest vm0's)
        self.socket_paths = [Path(p) for p in proc.paths]  # vm0, vm1, ... in order
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


@contextlib.asynccontextmanager
async def vdev_serve(
    directory: Path,
    *,
    device: str = "vmw",
    target: str = "0",
    name: str = "vm0",
    socket_name: str = "vm0.sock",
    socket_count: int | None = None,
    settings: Mapping[str, int] | None = None,
    extra: Sequence[str] = (),
    log_path: Path | None = None,
    verbose: int = 1,
    timeout: float = START_TIMEOUT,
    supervised: bool = False,
    supervisor_args: Sequence[str] = (),
) -> AsyncIterator[ApiVdev]:
    """``vdev serve`` on ``directory/socket_name`` with its API on ``directory/vdev.api``;
    with ``socket_count`` N (``--socket-count``) on ``directory/socket_name0`` ..
    ``socket_name(N-1)`` (guests vm0..vm(N-1); every socket listens before this yields;
    :attr:`ApiVdev.socket_paths`).

    ``settings`` (ESXi-style paths, e.g. ``{"Mem/CtlMaxPercent": 99}``) are applied through
    the API before yielding; ``extra`` goes to the command line (``--host-memory 64G`` ...);
    its output goes to ``log_path`` (default ``directory/vdev.log``)."""
    sock, api = directory / socket_name, directory / "vdev.api"
    async with open_vdev(
        sock, socket_count=socket_count, api_socket=api,
        log_path=log_path or directory / "vdev.log", timeout=timeout,
        device=device, target=target, verbose=verbose, extra=extra, supervised=supervised,
        supervisor_args=supervisor_args,
    ) as proc:  # fmt: skip
        handle = ApiVdev(proc, Path(proc.paths[0]), api, name)
        try:
            for path, value in (settings or {}).items():
                await handle.set_setting(path, value)
            yield handle
        finally:
            handle.close()
