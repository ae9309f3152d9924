"""The server in the test's own trio loop: the registry drives targets; doorbell, config
change, registry events, disconnect; SIGTERM answers queued requests BUSY."""

from __future__ import annotations

import signal

import trio

from guest_driver.frontend import VmwChannel, connect_frontend
from guest_driver.virtq import Buffer
from protocol.vmw import ALL_CAPABILITIES, Command, EventKind, Request, Response, Status

MiB = 1 << 20


async def test_registry_drives_the_guest(vdev_inproc, guest_ram) -> None:
    server, registry = await vdev_inproc(sockets=2, target_pages=0)
    events = registry.subscribe()
    ram = guest_ram(32 * MiB)
    with trio.fail_after(10):
        assert registry.names() == ["vm0", "vm1"]
        assert not registry.view("vm0").connected
        async with connect_frontend(server.socket_paths[0], ram) as fe:
            ch = VmwChannel(fe)
            r = await ch.call(Command.START, int(ALL_CAPABILITIES))
            assert r.status == Status.SUCCESS_WITH_CAPABILITIES
            assert (await ch.call(Command.VMCI_DOORBELL_SET, 7, 8)).status == Status.SUCCESS
            await ch.post_event_buffers(2)
            registry.set_target("vm0", 300)
            assert await ch.next_event() == EventKind.TARGET_CHANGED
            await fe.wait_config_change()
            assert int.from_bytes(await fe.get_config(0, 4), "little") == 300
            r = await ch.call(Command.LOCK, 0x400)
            assert (r.status, r.result) == (Status.SUCCESS, 300)
            v = registry.view("vm0")
            assert v.connected and v.size_pages == 1 and v.target_pages == 300
            assert v.doorbell_registered and v.ram_pages == ram.total_pages
            assert v.reclaimed_bytes_total == 4096
            registry.demand_reset("vm0")
            assert await ch.next_event() == EventKind.RESET
            assert (await ch.call(Command.GET_TARGET)).status == Status.ERROR_RESET
        while registry.view("vm0").connected:
            await trio.sleep(0.01)
    kinds = []
    while True:
        try:
            kinds.append(events.receive_nowait().kind)
        except trio.WouldBlock:
            break
    assert kinds[0] == "connected" and kinds[-1] == "disconnected"
    assert {"target", "size", "reset"} <= set(kinds)
    assert registry.view("vm0").target_pages == 300  # the target outlives the connection


async def test_sigterm_answers_busy(vdev_process, guest_ram) -> None:
    srv = vdev_process()
    ram = guest_ram(32 * MiB)
    with trio.fail_after(15):
        async with connect_frontend(srv.paths[0], ram) as fe:
            ch = VmwChannel(fe)
            assert (await ch.call(Command.START, 0)).status == Status.SUCCESS_WITH_CAPABILITIES
            await trio.sleep(0.3)  # the server is idle now: nothing will look at cmdq
            # post a request without kicking, then stop the server
            ram.write(ch.request_gpa, Request(Command.GET_TARGET).build())
            head = await ch.cmdq.driver.add(
                [Buffer(ch.request_gpa, 24), Buffer(ch.response_gpa, 24, write=True)]
            )
            srv.proc.send_signal(signal.SIGTERM)
            while True:
                used = await ch.cmdq.driver.poll_used()
                if used:
                    break
                await trio.sleep(0.01)
            assert [(u.id, u.len) for u in used] == [(head, 24)]
            assert Response.parse(ram.read(ch.response_gpa, 24)).status == Status.ERROR_BUSY
    assert srv.proc.wait(10) == 0
