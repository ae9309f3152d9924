"""A final stop (``vdev serve --deflate-on-stop``) deflates every guest: once it started, the
control plane's next step cannot raise a target again (a manual target is re-applied at every
step; it used to win the race against a slow guest, which then never deflated)."""

from __future__ import annotations

from pathlib import Path

import trio

from conformance.rawfrontend import VmwGuest
from protocol.vmw import Status
from vdev.devices.vmw import VmwDevice
from vdev.registry import GuestRegistry
from vdev.server import Server


async def test_targets_stay_zero_once_a_final_stop_deflates(tmp_path: Path) -> None:
    registry = GuestRegistry(VmwDevice.name, target=64)
    path = tmp_path / "vmw.sock"
    server = Server(registry, VmwDevice, socket_paths=[str(path)])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            g = await VmwGuest.attach(str(path))
            try:
                assert (await g.start()).status == Status.SUCCESS_WITH_CAPABILITIES
                registry.set_target("vm0", 128)  # the operator's manual target
                assert registry.view("vm0").target_pages == 128
                await server.deflate_all(0)  # the final stop began (no wait here)
                assert registry.view("vm0").target_pages == 0
                registry.set_target("vm0", 128)  # the control plane's next step
                assert registry.view("vm0").target_pages == 0
            finally:
                g.close()
            nursery.cancel_scope.cancel()
