"""What a conformance case gets: fresh connections, a way to set the target, checks."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from conformance.rawfrontend import BalloonGuest, Frontend, VmwGuest
from protocol import vmw
from protocol.errors import BackendHungUp


class CaseFailed(AssertionError):
    """The back-end did not do what the cited section says."""


class Skipped(Exception):
    """The case cannot run against this back-end / configuration (with the reason)."""


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
        """Run ``--target-hook`` (``{vm}``, ``{pages}``, ``{bytes}``, ``{socket}`` substituted)."""
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
            err = proc.stderr.decode(errors="replace").strip()[-300:]
            raise Skipped(f"target hook failed ({proc.returncode}): {err}")

    async def need_target(self, pages: int) -> None:
        """Make sure the target is ``pages`` before the case proceeds."""
        if self.initial_target == pages:
            return
        await self.set_target(pages)


def run_hook_sync(cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, shell=True, capture_output=True, check=False)
