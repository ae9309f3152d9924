"""What a conformance case gets: fresh connections, a way to set the target, checks."""

from __future__ import annotations

import contextlib
import enum
import shlex
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import trio

from conformance.rawfrontend import FREE_START_PFN, BalloonGuest, Frontend, VmwGuest
from guest_driver.virtq import Buffer, UsedElem
from protocol import vmw
from protocol.errors import BackendHungUp


class CaseFailed(AssertionError):
    """The back-end did not do what the cited section says."""


class Skipped(Exception):
    """The case cannot run against this back-end / configuration (with the reason)."""


class SetupError(Exception):
    """The harness's own set-up failed: a ``--target-hook`` command, or a back-end it was to
    start. Not a verdict on the back-end, and never a skip: the run stops there and fails
    (``python -m conformance`` exits 3). :func:`conformance.runner.run_all` sets
    :attr:`results` to what ran before, the case it stopped at last (an error)."""

    results: list[Any]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.results = []


def expect(cond: object, msg: str) -> None:
    if not cond:
        raise CaseFailed(msg)


def expect_eq(got: object, want: object, what: str) -> None:
    if got != want:
        raise CaseFailed(f"{what}: got {_fmt(got)}, expected {_fmt(want)}")


def _fmt(v: object) -> str:
    if isinstance(v, vmw.Status):
        return v.name
    if isinstance(v, int) and not isinstance(v, bool):
        try:
            return f"{vmw.Status(v).name} ({v:#x})" if v in set(vmw.Status) else f"{v:#x}"
        except ValueError:
            return f"{v:#x}"
    return repr(v)


def expect_status(resp: vmw.Response, want: vmw.Status, what: str) -> None:
    if resp.status != want:
        name = vmw.Status(resp.status).name if resp.status in set(vmw.Status) else "?"
        raise CaseFailed(f"{what}: status {name} ({resp.status:#x}), expected {want.name}")


TargetSetter = Callable[[int], Awaitable[None]]


class Need(enum.Enum):
    """What a case needs beyond a vmw guest's command queue (``Case.needs``).

    A transport provides some of these (:attr:`Context.provides`); the runner reports a case
    that needs one its transport lacks as skipped, with the reason. A case that needs none
    of them talks to the device only the way a guest driver does (the cmdq, the eventq and
    its own pages), through :meth:`Context.vmw` and :meth:`Context.pfn`, and so runs over
    every transport, the in-guest one included."""

    #: speaks vhost-user to the back-end itself (messages, memory table, fds, ring set-up)
    VHOST_USER = "vhost-user"
    #: reads or measures the guest RAM file from the host side (st_blocks, page contents)
    RAM_FILE = "ram-file"
    #: changes the operator target while it runs (``--target-hook``)
    TARGET_CHANGE = "target-change"
    #: posts hostile descriptor chains (a device that gives up on the ring is acceptable
    #: there, but inside a guest it would take the guest's only device down with it)
    RAW_RING = "raw-ring"
    #: locks 2 MiB pages at frames it chooses (adjacent, 2 MiB-aligned): a process in a
    #: guest gets no such frames from its kernel
    HUGE_RUNS = "huge-runs"

    @property
    def why(self) -> str:
        return _NEED_WHY[self]


_NEED_WHY = {
    Need.VHOST_USER: "speaks vhost-user itself",
    Need.RAM_FILE: "reads the guest RAM file on the host",
    Need.TARGET_CHANGE: "changes the target while it runs",
    Need.RAW_RING: "posts hostile descriptor chains",
    Need.HUGE_RUNS: "locks adjacent 2 MiB pages at chosen frames",
}


class VmwSession(Protocol):
    """A started vmw driver session as the transport-neutral cases see it: commands on the
    cmdq, hand-made chains, and the guest pages the harness owns.
    :class:`conformance.rawfrontend.VmwGuest` (our own vhost-user front-end) and
    :class:`conformance.inguest.GuestVmw` (a guest's virtio-pci function) implement it."""

    @property
    def ram_end_pfn(self) -> int: ...
    @property
    def batch_pfn(self) -> int: ...
    @property
    def indirect(self) -> bool: ...
    @property
    def scratch(self) -> int: ...

    async def command(self, cmd: int, arg1: int = 0, arg2: int = 0) -> vmw.Response: ...
    async def start(self, caps: int = int(vmw.ALL_CAPABILITIES)) -> vmw.Response: ...
    async def exchange(
        self, request: bytes, resp_len: int = vmw.RESPONSE_SIZE
    ) -> tuple[bytes, UsedElem]: ...
    async def batch(
        self,
        cmd: int,
        pfns: Sequence[int],
        *,
        raw_entries: Sequence[int] | None = None,
        count: int | None = None,
    ) -> tuple[vmw.Response, list[int]]: ...
    def ring_pfn_ranges(self) -> list[tuple[int, int]]: ...
    async def write(self, gpa: int, data: bytes) -> None: ...
    async def read(self, gpa: int, n: int) -> bytes: ...
    async def post(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> UsedElem: ...
    async def fill_page(self, pfn: int, byte: int) -> None: ...
    async def read_page(self, pfn: int) -> bytes: ...


@dataclass
class Context:
    """Per case: the socket under test, the personality, and the tools to reach it."""

    socket: str
    device: str
    vm: str = "vm0"
    target_hook: str | None = None
    #: set when the runner started vdev for this case with ``--target`` (spawn mode)
    initial_target: int | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    #: the transport's name in reports, and what it can do besides guest commands
    transport: ClassVar[str] = "vhost-user"
    provides: ClassVar[frozenset[Need]] = frozenset(Need)

    def pfn(self, i: int = 0) -> int:
        """The ``i``-th page the case may lock (a page of the harness's own guest RAM)."""
        return FREE_START_PFN + i

    # -- connections ---------------------------------------------------------------------

    async def frontend(self, **kw: Any) -> Frontend:
        fe = await Frontend.connect(self.socket, **kw)
        self._closers.append(fe.close)
        return fe

    async def vmw(self, *, start: bool = False, **negotiate: Any) -> VmwGuest:
        g = await VmwGuest.attach(self.socket, **negotiate)
        self._closers.append(g.close)
        if start:
            resp = await g.start()
            expect_status(resp, vmw.Status.SUCCESS_WITH_CAPABILITIES, "START")
        return g

    async def guest(self, *, start: bool = False) -> VmwSession:
        """A fresh vmw driver session (the device starts over: ERROR_RESET until START);
        with ``start``, START with every capability. Here: a new vhost-user connection."""
        return await self.vmw(start=start)

    async def balloon(self, **kw: Any) -> BalloonGuest:
        g = await BalloonGuest.attach(self.socket, **kw)
        self._closers.append(g.close)
        return g

    def close_all(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()

    async def still_serving(self, what: str) -> None:
        """A fresh, healthy connection still gets served (the device survived).

        The case's own connections are closed first: a back-end may serve one front-end
        per socket, as QEMU uses it."""
        self.close_all()
        try:
            with trio.fail_after(5):
                if self.device == "vmw":
                    g = await VmwGuest.attach(self.socket)
                    try:
                        resp = await g.start()
                        expect_status(resp, vmw.Status.SUCCESS_WITH_CAPABILITIES, "START")
                    finally:
                        g.close()
                else:
                    b = await BalloonGuest.attach(self.socket)
                    try:
                        await b.config()
                        used = await b.inflate([])
                        expect_eq(used.len, 0, "inflate used length")
                    finally:
                        b.close()
        except (BackendHungUp, OSError, trio.TooSlowError) as exc:
            raise CaseFailed(
                f"after {what}, a fresh healthy connection was not served: {exc!r}"
            ) from exc

    # -- the operator's target -----------------------------------------------------------

    @property
    def can_set_target(self) -> bool:
        return self.target_hook is not None

    async def set_target(self, pages: int) -> None:
        """Run ``--target-hook`` (``{vm}``, ``{pages}``, ``{bytes}``, ``{socket}`` substituted).

        A hook that exits non-zero is a set-up error (:class:`SetupError`), not a skip: the
        harness could not do what the case needs."""
        if self.target_hook is None:
            raise Skipped("needs --target-hook CMD (or --spawn-vdev) to change the target")
        cmd = self.target_hook.format(
            vm=shlex.quote(self.vm),
            pages=pages,
            bytes=pages * 4096,
            socket=shlex.quote(self.socket),
        )
        proc = await trio.run_process(
            cmd, shell=True, capture_stdout=True, capture_stderr=True, check=False
        )
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-500:]
            raise SetupError(
                f"--target-hook failed: `{cmd}` (target {pages} pages) exited with status "
                f"{_exit_status(proc.returncode)}; "
                + (f"its stderr: {err}" if err else "it wrote nothing on stderr")
            )

    async def try_set_target(self, pages: int) -> str | None:
        """:meth:`set_target` for a target the operator side may refuse (one beyond the
        guest's RAM): None when it was set, else the hook's failure (a refusal, not a
        set-up error; the case decides what it means)."""
        try:
            await self.set_target(pages)
        except SetupError as exc:
            return str(exc)
        return None

    async def need_target(self, pages: int) -> None:
        """Make sure the target is ``pages`` before the case proceeds."""
        if self.initial_target == pages:
            return
        await self.set_target(pages)


def _exit_status(code: int) -> str:
    """``1``, or ``-9 (killed by SIGKILL)`` for a signal."""
    if code < 0:
        import signal

        try:
            return f"{code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def run_hook_sync(cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, shell=True, capture_output=True, check=False)
