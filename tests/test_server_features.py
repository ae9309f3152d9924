"""Features: what the front-end negotiated reaches the guest's ``capabilities``; the
driver being active follows the driver, not the features."""

from __future__ import annotations

import trio
from server_helpers import (
    BALLOON_FEATURES,
    MiB,
    start_server,
    wait_for,
)

from guest_driver.frontend import WANTED_FEATURES, VmwChannel, connect_frontend
from protocol import virtio_balloon as vb
from protocol.vhost_user import FrontendRequest as R
from protocol.vmw import ALL_CAPABILITIES, Command

# ------------------------------------------------------------------------------ features


async def test_negotiated_features_reach_capabilities(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        _, registry, [path] = await start_server(nursery, tmp_path)
        assert registry.view("vm0").capabilities == 0
        ram = guest_ram(32 * MiB)
        wanted = int(WANTED_FEATURES) | int(vb.Feature.DEFLATE_ON_OOM)
        async with connect_frontend(path, ram, wanted_features=wanted) as fe:
            await wait_for(lambda: registry.view("vm0").connected)
            assert registry.view("vm0").capabilities == int(vb.Feature.DEFLATE_ON_OOM)
            await fe.request(R.RESET_DEVICE)  # the acked features are gone
            assert registry.view("vm0").capabilities == 0
        async with connect_frontend(
            path, ram, wanted_features=int(WANTED_FEATURES) | BALLOON_FEATURES
        ):
            await wait_for(lambda: registry.view("vm0").connected)
            assert registry.view("vm0").capabilities == BALLOON_FEATURES


async def test_driver_active_follows_the_driver_not_the_features(
    nursery, tmp_path, guest_ram
) -> None:
    """MCTL?: virtio-balloon is active once its rings run (DRIVER_OK), even with no device
    feature accepted; vmw once START granted capabilities, and not while a reset is due."""
    with trio.fail_after(20):
        _, registry, [path] = await start_server(nursery, tmp_path)
        ram = guest_ram(32 * MiB)
        async with connect_frontend(path, ram, start=False) as fe:
            await wait_for(lambda: registry.view("vm0").connected)
            assert not registry.view("vm0").driver_active  # features, no DRIVER_OK yet
            await fe.start()
            view = registry.view("vm0")
            assert view.driver_active and view.capabilities == 0
            assert view.gauges == {"actual", "stats held"}  # the personality's, passed on
            await fe.request(R.RESET_DEVICE)
            assert not registry.view("vm0").driver_active
        assert not registry.view("vm0").driver_active  # disconnected

    with trio.fail_after(20):
        (tmp_path / "vmw").mkdir()
        _, registry, [path] = await start_server(nursery, tmp_path / "vmw", "vmw")
        async with connect_frontend(path, guest_ram(32 * MiB)) as fe:
            ch = VmwChannel(fe)
            await wait_for(lambda: registry.view("vm0").connected)
            assert not registry.view("vm0").driver_active  # rings run, no START yet
            await ch.call(Command.START, int(ALL_CAPABILITIES))
            assert registry.view("vm0").driver_active
            registry.demand_reset("vm0")
            await wait_for(lambda: not registry.view("vm0").driver_active)
            assert registry.view("vm0").capabilities != 0  # still granted, but reset pending
            await ch.call(Command.START, int(ALL_CAPABILITIES))
            assert registry.view("vm0").driver_active
