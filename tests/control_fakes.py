"""A stand-in for a connected guest behind the real GuestRegistry, for control-plane tests
that do not need a vhost-user connection: it implements the registry's LiveDevice interface
and moves its balloon towards the target when told to (`settle`)."""

from __future__ import annotations

from vdev.devices.base import DeviceStatus
from vdev.registry import GuestRegistry


class FakeGuest:
    def __init__(
        self, registry: GuestRegistry, name: str, ram_pages: int, *, follow: bool = False
    ) -> None:
        self.registry = registry
        self.name = name
        self._ram = ram_pages
        self.size = 0
        self.target = registry.target_of(name)
        self.follow = follow  # reach every target at once (as a fast driver would)
        self.resets = 0
        self.started = True  # the balloon driver runs (MCTL? = Y)
        self.capabilities = 0x3E  # what it negotiated (no bearing on MCTL?)
        self.counters = {"lock": 0, "lock failed": 0, "unlock": 0, "unlock failed": 0}
        self.guest_stats: dict[str, int] = {}
        self.has_stats = False
        registry.attach(name, self)

    # -- LiveDevice -------------------------------------------------------------------------

    def status(self) -> DeviceStatus:
        return DeviceStatus(
            size_pages=self.size,
            target_pages=self.target,
            capabilities=self.capabilities if self.started else 0,
            driver_active=self.started,
            guest_type=1,
            doorbell_registered=True,
            counters=dict(self.counters),
            guest_stats=dict(self.guest_stats),
        )

    def ram_pages(self) -> int:
        return self._ram

    def ram_allocated_bytes(self) -> int:
        return (self._ram - self.size) * 4096

    def reclaimed_bytes_total(self) -> int:
        return self.counters["lock"] * 4096

    def request_target(self, pages: int) -> None:
        self.target = pages
        if self.follow:
            self.settle()

    def request_stats(self) -> bool:
        """Statistics the guest "reports" at once (only when ``has_stats``, like a
        virtio-balloon guest with a stats queue)."""
        if not self.has_stats:
            return False
        # half of its memory free: an idle guest (the policy's guest floor leaves it be if
        # it had next to nothing free)
        self.guest_stats = {
            "stat-total-memory": self._ram * 4096,
            "stat-free-memory": self._ram * 4096 // 2,
        }
        return True

    def request_reset(self) -> None:
        self.resets += 1
        self.size = 0
        self.registry.note_reset(self.name)
        self.registry.note_size(self.name, 0)

    # -- test controls ----------------------------------------------------------------------

    def settle(self, max_pages: int | None = None) -> None:
        """Move the balloon towards the target (at most ``max_pages``), as a driver would."""
        delta = self.target - self.size
        if max_pages is not None:
            delta = max(-max_pages, min(max_pages, delta))
        if delta > 0:
            self.counters["lock"] += delta
        else:
            self.counters["unlock"] -= delta
        self.size += delta
        self.registry.note_size(self.name, self.size)


def make_registry(*ram_pages: int, follow: bool = False) -> tuple[GuestRegistry, list[FakeGuest]]:
    """A registry with one connected fake guest per entry of ``ram_pages`` (vm0, vm1...)."""
    registry = GuestRegistry("vmw")
    guests = []
    for i, ram in enumerate(ram_pages):
        registry.add(f"vm{i}", f"/nonexistent/vm{i}.sock")
        guests.append(FakeGuest(registry, f"vm{i}", ram, follow=follow))
    return registry, guests


# ------------------------------------------------------------------------------ real processes


class GuestProcess:
    """``guest-driver run`` (our vmmemctl guest driver over vhost-user) as a separate process."""

    def __init__(self, socket_path: str, memory: str, log_path: str, poll: float = 0.1) -> None:
        import subprocess
        import sys

        self.socket_path = socket_path
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guest_driver",
                "run",
                "--socket",
                socket_path,
                "--memory",
                memory,
                "--poll",
                str(poll),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(log_path, "wb"),  # noqa: SIM115  (the child owns it)
        )

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(predicate: object, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll a synchronous predicate (for the sync CLI tests; async tests use trio)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
