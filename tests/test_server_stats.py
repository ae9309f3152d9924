"""virtio-balloon guest stats: the public request verb, the polling interval, vmw has none,
a bad interval is refused, and the API's ``POST /vms/{name}/stats``."""

from __future__ import annotations

from pathlib import Path

import httpx
import jsonschema
import pytest
import trio
from control_fakes import FakeGuest, make_registry
from server_helpers import (
    BALLOON_FEATURES,
    MiB,
    post_stats,
    returned,
    start_server,
    wait_for,
)

from guest_driver.frontend import WANTED_FEATURES, connect_frontend
from vdev.api.app import OPENAPI
from vdev.api.serve import serve_api
from vdev.config import ControlConfig
from vdev.devices.vmw import VmwDevice
from vdev.policy.control import ControlPlane
from vdev.registry import GuestRegistry
from vdev.server import Server

# ------------------------------------------------------------------------------ stats


async def test_request_stats_public_verb(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        _, registry, [path] = await start_server(nursery, tmp_path)
        assert not registry.request_stats("vm0")  # nothing connected
        with pytest.raises(KeyError):
            registry.request_stats("nope")
        ram = guest_ram(32 * MiB)
        wanted = int(WANTED_FEATURES) | BALLOON_FEATURES
        async with connect_frontend(path, ram, wanted_features=wanted) as fe:
            head = await post_stats(fe, 5)
            await wait_for(lambda: registry.view("vm0").counters["stats held"] == 1)
            assert registry.view("vm0").guest_stats["stat-free-memory"] == 5
            await trio.sleep(0.3)  # no interval: the buffer stays held
            assert registry.view("vm0").counters["stats held"] == 1
            assert registry.request_stats("vm0")
            await returned(fe, head)
            assert registry.view("vm0").counters["stats requests"] == 1
            head = await post_stats(fe, 7)  # the driver refills it
            await wait_for(lambda: registry.view("vm0").guest_stats["stat-free-memory"] == 7)


async def test_stats_interval_polls_the_guest(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        _, registry, [path] = await start_server(nursery, tmp_path, stats_interval=0.1)
        ram = guest_ram(32 * MiB)
        wanted = int(WANTED_FEATURES) | BALLOON_FEATURES
        async with connect_frontend(path, ram, wanted_features=wanted) as fe:
            for free in (11, 12, 13):  # each buffer comes back without anyone asking
                head = await post_stats(fe, free)
                await returned(fe, head)
                assert registry.view("vm0").guest_stats["stat-free-memory"] == free
            assert registry.view("vm0").counters["stats requests"] >= 3


async def test_request_stats_on_vmw_is_false(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        server, registry, [path] = await start_server(nursery, tmp_path, "vmw", stats_interval=0.05)
        async with connect_frontend(path, guest_ram(32 * MiB)):
            await wait_for(lambda: registry.view("vm0").connected)
            assert not registry.request_stats("vm0")
            [conn] = server.connections
            assert not await conn.refresh_stats()


def test_server_rejects_bad_stats_interval() -> None:
    with pytest.raises(ValueError):
        Server(GuestRegistry(), VmwDevice, stats_interval=-1)


class StatsGuest(FakeGuest):
    requested = 0

    def request_stats(self) -> bool:
        self.requested += 1
        return True


async def test_api_post_stats(tmp_path: Path) -> None:
    registry, [_plain] = make_registry(1 << 18)
    registry.add("vm1", "/nonexistent/vm1.sock")
    guest = StatsGuest(registry, "vm1", 1 << 18)
    registry.add("vm2", "/nonexistent/vm2.sock")  # never connected
    control = ControlPlane(registry, ControlConfig(host_memory=4 << 30))
    declared = OPENAPI["paths"]["/vms/{name}/stats"]["post"]["responses"]

    def check(r: httpx.Response) -> None:
        assert str(r.status_code) in declared, r.status_code
        schema = declared[str(r.status_code)]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator({**schema, "components": OPENAPI["components"]}).validate(
            r.json()
        )

    api = tmp_path / "api"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            await nursery.start(
                lambda task_status: serve_api(control, str(api), task_status=task_status)
            )
            async with httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(api)), base_url="http://vdev"
            ) as c:
                r = await c.post("/vms/vm1/stats")
                check(r)
                assert r.status_code == 202 and r.json()["name"] == "vm1"
                assert guest.requested == 1
                for name in ("vm0", "vm2"):  # no request_stats / not connected
                    r = await c.post(f"/vms/{name}/stats")
                    check(r)
                    assert r.status_code == 409 and "statistics" in r.json()["error"]
                r = await c.post("/vms/nope/stats")
                check(r)
                assert r.status_code == 404
                assert (await c.get("/vms/vm1/stats")).status_code == 405
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ isolation
