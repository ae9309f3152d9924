"""Shared fixtures for the back-end tests (and anyone else's).

* ``vdev_process`` — a factory starting ``vdev serve`` as a separate process on a fresh
  socket in ``tmp_path`` (:func:`lab.vdev_process.start_vdev`):
  ``srv = vdev_process(sockets=2, target="64M")``; ``srv.paths``, ``srv.proc``, ``srv.log()``
  (its output so far), ``srv.stop()`` (SIGTERM, then SIGKILL; returns the exit code). Every
  process is stopped at teardown.
* ``vdev_inproc`` — an async factory running a :class:`vdev.server.Server` inside the test's
  trio nursery: ``server, registry = await vdev_inproc(sockets=1, target_pages=0)``;
  ``registry`` drives targets (``registry.set_target("vm0", pages)``).
* ``guest_ram`` — a factory for :class:`guest_driver.frontend.GuestRamFile` (memfd guest
  RAM, QEMU-like layout by default), closed at teardown.

pytest-timeout in a trio test cancels the test's trio run (:class:`TrioTimeout`) instead of
raising inside trio's event loop, which would skip every ``finally`` (QEMU and vdev left
running) and leave trio's run state behind, failing the next trio test with "run() from
inside a run()".
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import pytest_timeout
import trio

from guest_driver.frontend import GuestRamFile
from lab import linux_image, qemu
from lab.linux_image import LinuxImage, ProvisionError
from lab.qemu import QemuBinary
from lab.vdev_process import VdevProcess, start_vdev

MiB = 1 << 20


def missing_prerequisite(reason: str) -> NoReturn:
    """A prerequisite scripts/setup provides is missing: skip, saying why, or under CI
    (``CI=true``, where set-up ran on a fresh machine) fail."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: scripts/setup must provide it)")
    pytest.skip(reason)


class TrioTimeout:
    """pytest-timeout's SIGALRM for one trio test: the first alarm cancels the test (from the
    signal handler, through :meth:`trio.lowlevel.TrioToken.run_sync_soon`, the one trio call
    that is signal-safe), so its context managers stop their processes and trio's run ends
    normally; the test then fails saying so. A test still running :data:`GRACE` s later
    (cleanup stuck) gets pytest-timeout's own handling."""

    GRACE = 30.0
    RETRY = 1.0  # the alarm fired before the test function started (async fixtures)

    def __init__(self, item: pytest.Item, settings: Any) -> None:
        self.item, self.settings = item, settings
        self.token: trio.lowlevel.TrioToken | None = None
        self.scope: trio.CancelScope | None = None
        self.fired = False
        self.waited = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def guarded(**kwargs: Any) -> None:
            with trio.CancelScope() as scope:
                self.token, self.scope = trio.lowlevel.current_trio_token(), scope
                await fn(**kwargs)
            if scope.cancelled_caught and self.fired:
                pytest.fail(
                    f"Timeout: the test ran more than {self.settings.timeout} s "
                    "(pytest-timeout); it was cancelled and cleaned up"
                )

        return guarded

    def on_alarm(self, signum: int, frame: Any) -> None:
        if self.fired:  # its cleanup is stuck
            pytest_timeout.timeout_sigalrm(self.item, self.settings)
        elif self.scope is None:  # its async fixtures are still being set up
            self.waited += self.RETRY
            if self.waited >= self.GRACE:
                pytest_timeout.timeout_sigalrm(self.item, self.settings)
            signal.setitimer(signal.ITIMER_REAL, self.RETRY)
        else:
            self.fired = True
            assert self.token is not None
            self.token.run_sync_soon(self.scope.cancel)
            signal.setitimer(signal.ITIMER_REAL, self.GRACE)

    def start(self) -> None:
        signal.signal(signal.SIGALRM, self.on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.settings.timeout)

    def cancel(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """A trio test's timeout is a :class:`TrioTimeout`; others keep pytest-timeout's."""
    if (
        item.get_closest_marker("trio") is None
        or settings.method != "signal"
        or not settings.timeout
        or threading.current_thread() is not threading.main_thread()
        or hasattr(getattr(item, "obj", None), "hypothesis")
    ):
        return None
    guard = TrioTimeout(item, settings)
    item._trio_timeout = guard  # type: ignore[attr-defined]
    item.cancel_timeout = guard.cancel  # type: ignore[attr-defined]  # pytest-timeout's
    guard.start()
    return True


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Before pytest-trio wraps the test in ``trio.run``: wrap it in :class:`TrioTimeout`'s
    cancel scope."""
    guard = getattr(item, "_trio_timeout", None)
    if guard is not None and isinstance(item, pytest.Function):
        item.obj = guard.wrap(item.obj)
    yield


@pytest.fixture
def vdev_process(tmp_path: Path) -> Iterator[Callable[..., VdevProcess]]:
    """A factory over :func:`lab.vdev_process.start_vdev`; all stopped at teardown."""
    started: list[VdevProcess] = []

    def start(
        *extra: str, sockets: int | None = None, target: str = "0", verbose: int = 2
    ) -> VdevProcess:
        n = len(started)
        srv = start_vdev(
            tmp_path / f"vu{n}.sock", socket_count=sockets, target=target, verbose=verbose,
            extra=extra, log_path=tmp_path / f"vdev{n}.log", timeout=10,
        )  # fmt: skip
        started.append(srv)
        return srv

    yield start
    for srv in started:
        if srv.alive():
            srv.stop()


@pytest.fixture
async def vdev_inproc(nursery: trio.Nursery, tmp_path: Path) -> Any:
    from lab.vdev_inprocess import start_inprocess_vdev

    async def start(
        sockets: int = 1, target_pages: int = 0, device: str = "vmw"
    ) -> tuple[Any, Any]:
        paths = [tmp_path / f"in{i}.sock" for i in range(sockets)]
        vdev = await start_inprocess_vdev(nursery, paths, device=device, target_pages=target_pages)
        return vdev.server, vdev.registry

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


@pytest.fixture(scope="module")
def linux_env() -> tuple[QemuBinary, LinuxImage]:
    """A QEMU with the generic vhost-user device (>= 10.2) and the Linux guest image, both
    provided by scripts/setup; where set-up could not, the test is skipped saying why (and
    fails under CI, see :func:`missing_prerequisite`)."""
    q = qemu.best_qemu(need_test_device=True)
    if q is None:
        missing_prerequisite(
            f"no QEMU >= 10.2 with {qemu.TEST_DEVICE} on this machine (scripts/setup)"
        )
    try:
        image = linux_image.build()
    except ProvisionError as e:
        missing_prerequisite(f"the Linux guest image could not be provisioned here: {e}")
    return q, image
