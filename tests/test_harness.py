"""The conformance harness: it passes against vdev, and it fails -- in the right cases --
against back-ends that break one rule.

Broken back-ends come in two kinds, neither of which needs a hook inside vdev:

* a proxy (:class:`FlagProxy`) that relays vhost-user between the harness and a real vdev,
  fds included, and corrupts one thing on the way back (reply flags 0xd instead of 0x5);
* "mutant" vdevs: this file, run as a script, patches one rule of vdev's code in its own
  process and then runs ``vdev serve`` (``python tests/test_harness.py MUTANT serve ...``).
"""

from __future__ import annotations

import array
import dataclasses
import re
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from conformance import cases as catalogue
from conformance.__main__ import main as harness_main
from conformance.backend import BackendSpawner
from conformance.runner import FAIL, PASS, SKIP, Result, run_all, write_junit
from protocol import vhost_user as vu

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# mutants: one rule of vdev inverted, in a child process


def _mutant_no_batch_pin() -> None:
    from vdev.balloon import BalloonModel

    orig = BalloonModel._pinned_mask

    def patched(self, pfns, npages, batch_pfn):  # type: ignore[no-untyped-def]
        return orig(self, pfns, npages, None)

    BalloonModel._pinned_mask = patched  # type: ignore[method-assign]


def _mutant_no_reclaim() -> None:
    from vdev.memory import GuestMemory

    GuestMemory._punch = staticmethod(lambda pieces: 0)  # type: ignore[method-assign]


def _mutant_unlocked_is_success() -> None:
    from protocol.vmw import Status
    from vdev.balloon import BalloonModel

    orig = BalloonModel.handle

    def patched(self, request, ram):  # type: ignore[no-untyped-def]
        out = orig(self, request, ram)
        if out.response.status == Status.ERROR_PPN_UNLOCKED:
            resp = dataclasses.replace(out.response, status=int(Status.SUCCESS))
            out = dataclasses.replace(out, response=resp)
        return out

    BalloonModel.handle = patched  # type: ignore[method-assign]


MUTANTS: dict[str, Callable[[], None]] = {
    "no-batch-pin": _mutant_no_batch_pin,
    "no-reclaim": _mutant_no_reclaim,
    "unlocked-is-success": _mutant_unlocked_is_success,
}


def _mutant_cmd(name: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), name]


# --------------------------------------------------------------------------------------
# a relaying proxy that corrupts reply flags


class FlagProxy:
    """Listen on ``path``; relay every connection to ``upstream``; rewrite reply flags."""

    def __init__(self, path: str, upstream: str, reply_flags: int) -> None:
        self.path = path
        self.upstream = upstream
        self.reply_flags = reply_flags

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(self.path)
        listener.listen(8)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                client, _ = await listener.accept()
                nursery.start_soon(self._pair, client)

    async def _pair(self, client: trio.socket.SocketType) -> None:
        server = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await server.connect(self.upstream)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, False, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, True, nursery.cancel_scope)
        finally:
            client.close()
            server.close()

    async def _pump(
        self,
        src: trio.socket.SocketType,
        dst: trio.socket.SocketType,
        replies: bool,
        scope: trio.CancelScope,
    ) -> None:
        try:
            while True:
                head, anc, _, _ = await src.recvmsg(vu.HEADER_SIZE, socket.CMSG_SPACE(32))
                if not head:
                    break
                while len(head) < vu.HEADER_SIZE:
                    more = await src.recv(vu.HEADER_SIZE - len(head))
                    if not more:
                        return
                    head += more
                fds = array.array("i")
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(data[: len(data) - len(data) % 4])
                h = vu.parse_header(head)
                body = b""
                while len(body) < h.size:
                    more = await src.recv(min(65536, h.size - len(body)))
                    if not more:
                        return
                    body += more
                flags = self.reply_flags if replies and h.flags & vu.FLAG_REPLY else h.flags
                out = vu.build_header(h.request, flags, h.size) + body
                ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fds else []
                await dst.sendmsg([out], ancdata)
                for fd in fds:
                    import os

                    os.close(fd)
        except OSError:
            pass
        finally:
            scope.cancel()


# --------------------------------------------------------------------------------------
# helpers


def _by_name(results: list[Result]) -> dict[str, str]:
    return {r.case.name: r.outcome for r in results}


def _failed(results: list[Result]) -> set[str]:
    return {r.case.name for r in results if r.failed}


async def _run(
    device: str, pattern: str | None = None, vdev_cmd: list[str] | None = None
) -> list[Result]:
    spawner = BackendSpawner(device, vdev_cmd)
    async with spawner.running():
        return await run_all(
            catalogue.select(device, pattern),
            device=device,
            spawner=spawner,
            target_hook=spawner.target_hook,
        )


def _explain(results: list[Result]) -> str:
    return "\n".join(f"{r.case.name}: {r.outcome} {r.message}" for r in results if r.failed)


# --------------------------------------------------------------------------------------
# the catalogue itself


def test_catalogue_is_well_formed() -> None:
    names = [c.name for c in catalogue.CASES]
    assert len(names) == len(set(names))
    for c in catalogue.CASES:
        assert c.spec and ("PROTOCOL.md" in c.spec or "ref §" in c.spec or "vhost-user" in c.spec)
        assert c.checks
        assert set(c.devices) <= {"vmw", "virtio-balloon"}
    assert len(catalogue.select("vmw")) >= 40
    assert len(catalogue.select("virtio-balloon")) >= 15
    assert [c.name for c in catalogue.select("vmw", "vmw.lock-unlock")] == ["vmw.lock-unlock"]


def test_list_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert harness_main(["--list", "--device", "virtio-balloon"]) == 0
    out = capsys.readouterr().out
    assert "vb.inflate-reclaims" in out and "vmw.lock-unlock" not in out


def test_usage_error_without_socket() -> None:
    assert harness_main(["--device", "vmw"]) == 2


# --------------------------------------------------------------------------------------
# against vdev: everything passes


@pytest.mark.timeout(90)
async def test_vmw_conformance_against_vdev(tmp_path: Path) -> None:
    with trio.fail_after(60):
        results = await _run("vmw")
    assert not _failed(results), _explain(results)
    outcomes = _by_name(results)
    assert outcomes["vmw.lock-unlock"] == PASS
    assert outcomes["vmw.doorbell-target-change"] == PASS  # the API hook works when spawned
    junit = tmp_path / "h.xml"
    write_junit(results, junit, "harness.vmw")
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == str(len(results)) and suite.get("failures") == "0"


@pytest.mark.timeout(60)
async def test_virtio_balloon_conformance_against_vdev() -> None:
    with trio.fail_after(40):
        results = await _run("virtio-balloon")
    assert not _failed(results), _explain(results)
    assert _by_name(results)["vb.inflate-reclaims"] == PASS


@pytest.mark.timeout(60)
async def test_target_cases_skip_with_reason_without_hook(tmp_path: Path) -> None:
    with trio.fail_after(30):
        spawner = BackendSpawner("vmw")
        async with spawner.running():
            path = await spawner.socket_for(None)
            results = await run_all(
                catalogue.select("vmw", "vmw.doorbell-target-change,vmw.guest-id"),
                device="vmw",
                socket=path,
            )
    outcomes = {r.case.name: (r.outcome, r.message) for r in results}
    assert outcomes["vmw.guest-id"][0] == PASS
    assert outcomes["vmw.doorbell-target-change"][0] == SKIP
    assert "--target-hook" in outcomes["vmw.doorbell-target-change"][1]


# --------------------------------------------------------------------------------------
# against broken back-ends: the RIGHT cases fail

NEIGHBOURS = "vmw.lock-unlock,vmw.batch-statuses,vmw.guest-id,vu.reply-ack,vmw.bad-frames"


@pytest.mark.timeout(60)
async def test_proxy_with_reply_flags_0xd_fails_exactly_the_flags_case(tmp_path: Path) -> None:
    with trio.fail_after(40):
        spawner = BackendSpawner("vmw")
        async with spawner.running(), trio.open_nursery() as nursery:
            upstream = await spawner.socket_for(T := catalogue.T)
            proxy = FlagProxy(str(tmp_path / "proxy.sock"), upstream, reply_flags=0xD)
            await nursery.start(proxy.serve)
            results = await run_all(
                catalogue.select("vmw", f"vu.reply-flags-0x5,{NEIGHBOURS}"),
                device="vmw",
                socket=proxy.path,
                target_hook=spawner.target_hook.replace("{socket}", upstream),
            )
            nursery.cancel_scope.cancel()
    assert T == catalogue.T
    assert _failed(results) == {"vu.reply-flags-0x5"}, _explain(results)
    msg = next(r.message for r in results if r.failed)
    assert "0xd" in msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mutant", "device", "pattern", "must_fail"),
    [
        (
            "no-batch-pin",
            "vmw",
            f"vmw.pinned-ring-pages,{NEIGHBOURS},vmw.2m-alignment-and-overlap",
            {"vmw.pinned-ring-pages"},
        ),
        (
            "no-reclaim",
            "vmw",
            f"vmw.reclaim-punches-ram,vmw.zeros-after-unlock,{NEIGHBOURS}",
            {"vmw.reclaim-punches-ram", "vmw.zeros-after-unlock"},
        ),
        (
            "no-reclaim",
            "virtio-balloon",
            "vb.inflate-reclaims,vb.pfns-split-across-descriptors,vb.config-and-features,"
            "vb.hostile-inflate",
            {"vb.inflate-reclaims", "vb.pfns-split-across-descriptors"},
        ),
        (
            "unlocked-is-success",
            "vmw",
            f"{NEIGHBOURS},vmw.pfn-32bit,vmw.start-forgets,vmw.reclaim-punches-ram",
            {"vmw.lock-unlock", "vmw.pfn-32bit"},
        ),
    ],
)
async def test_mutant_vdev_fails_the_right_cases(
    mutant: str, device: str, pattern: str, must_fail: set[str]
) -> None:
    with trio.fail_after(45):
        results = await _run(device, pattern, _mutant_cmd(mutant))
    assert _failed(results) == must_fail, _explain(results)
    assert all(r.outcome in (PASS, FAIL) for r in results), _explain(results)


def test_cli_exit_status_and_junit_against_a_mutant(tmp_path: Path) -> None:
    junit = tmp_path / "out.xml"
    cmd = [
        sys.executable, "-m", "conformance", "--spawn-vdev", "--device", "vmw",
        "--vdev", " ".join(_mutant_cmd("no-batch-pin")),
        "-k", "vmw.pinned-ring-pages,vmw.guest-id", "--junit", str(junit),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed, 1 failed" in proc.stdout
    root = ET.parse(junit).getroot()
    failing = [tc.get("name") for tc in root.iter("testcase") if tc.find("failure") is not None]
    assert failing == ["vmw.pinned-ring-pages"]


def test_cli_spawns_any_backend_from_a_command_line(tmp_path: Path) -> None:
    """``--spawn CMD``: the harness starts whatever back-end the command line names (here
    vdev without its API, so nothing of the default is used) and waits for ``{socket}``;
    without ``--target-hook`` the cases that change the target are skipped with the reason."""
    backend = (
        f"{sys.executable} -m vdev serve --device {{device}} --socket-path {{socket}} --no-api "
        f"--target {{bytes}}"
    )
    cmd = [
        sys.executable, "-m", "conformance", "--spawn", backend, "--device", "vmw",
        "-k", "vmw.guest-id,vmw.doorbell-target-change",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 0 failed, 1 skipped" in proc.stdout, proc.stdout
    assert "spawned back-end" in proc.stdout


@pytest.mark.timeout(120)
def test_clamp_case_holds_when_vdev_reapplies_its_cap_at_every_tick() -> None:
    """``vmw.target-32bit-clamp`` tests the 32-bit clamp, not vdev's policy: with a policy
    step every millisecond (vdev re-applies its Mem/CtlMaxPercent cap to the manual target at
    each), the case passes every time. With 16 TiB of guest RAM the cap (65 %) bound, and
    the verdict depended on whether a step fell between START and GET_TARGET."""
    backend = (
        f"{sys.executable} -m vdev serve --device {{device}} --socket-path {{socket}} "
        f"--no-api --target {{bytes}} --policy-period 0.001"
    )
    cmd = [
        sys.executable, "-m", "conformance", "--spawn", backend, "--device", "vmw",
        "-k", "vmw.target-32bit-clamp",
    ]  # fmt: skip
    for _ in range(3):
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=REPO, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "1 passed, 0 failed, 0 skipped" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------
# the harness's own set-up: checked before any case runs, or a failure (never a skip)


def _stale_socket(path: Path) -> Path:
    """A socket file nothing listens on (its process is gone)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return path


#: (command line, what the error says); {tmp} is a fresh directory
BAD_COMMAND_LINES = [
    (["--socket", "{tmp}/missing.sock"], "nothing listens at {tmp}/missing.sock"),
    (["--socket", "{tmp}/regular"], "is not a unix socket"),
    (["--socket", "{tmp}/stale.sock"], "nothing listens at {tmp}/stale.sock"),
    (["--spawn-vdev", "--junit", "/nonexistent/dir/j.xml"], "--junit /nonexistent/dir/j.xml"),
    (["--spawn-vdev", "--vdev", "/nonexistent/vdev"], "--vdev: /nonexistent/vdev: no such file"),
    (["--spawn-vdev", "--vdev", "no-such-vdev-here"], "command not found"),
    (["--spawn-vdev", "--socket", "{tmp}/x.sock"], "--socket and --spawn-vdev exclude"),
    (["--spawn", "true {socket}", "--socket", "{tmp}/x.sock"], "--socket and --spawn exclude"),
    (["--spawn", "true {socket}", "--spawn-vdev"], "exclude each other"),
    (["--spawn", "no-such-backend-here {socket}"], "--spawn: no-such-backend-here: command"),
    (["--spawn", "true {sock}"], "--spawn: unknown placeholder {sock}"),
    (["--spawn", "true 'unclosed"], "cannot split the command line"),
    (["--spawn-vdev", "--target-hook", "set {target}"], "unknown placeholder {target}"),
    (["--spawn-vdev", "--target-hook", "echo ${HOME}"], "unknown placeholder {HOME}"),
    (["--socket", "{tmp}/stale.sock", "--vdev", "x"], "--vdev goes with --spawn-vdev"),
]


@pytest.mark.parametrize(("args", "says"), BAD_COMMAND_LINES)
def test_bad_command_lines_are_usage_errors_before_any_case(
    args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "regular").write_text("")
    _stale_socket(tmp_path / "stale.sock")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert harness_main(argv) == 2
    out = capsys.readouterr()
    assert says.replace("{tmp}", str(tmp_path)) in out.err, out.err
    assert "harness: " in out.err and "Traceback" not in out.err
    assert "passed" not in out.out  # no case ran
    assert not Path("/nonexistent/dir").exists()


def _harness(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "conformance", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def test_a_failing_target_hook_fails_the_run_naming_it(tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    hook = "echo no such guest >&2; exit 4; : {vm} {bytes}"
    proc = _harness(
        "--spawn-vdev", "--target-hook", hook, "--junit", str(junit),
        "-k", "vmw.guest-id,vmw.doorbell-target-change,vmw.doorbell-unregister",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "skipped" not in proc.stderr
    assert "--target-hook failed: `echo no such guest >&2; exit 4; : vm0 " in proc.stderr
    assert "exited with status 4; its stderr: no such guest" in proc.stderr
    assert "run stopped (1 cases not run)" in proc.stderr  # doorbell-unregister never ran
    errors = [
        tc.get("name") for tc in ET.parse(junit).iter("testcase") if tc.find("error") is not None
    ]
    assert errors == ["vmw.doorbell-target-change"]


def test_a_backend_that_never_starts_fails_the_run() -> None:
    proc = _harness("--spawn", "false {socket}", "-k", "vmw.guest-id,vmw.lock-unlock")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "the back-end did not start (`false " in proc.stderr
    assert "exited 1 before listening" in proc.stderr


async def test_a_backend_that_never_listens_is_a_setup_error() -> None:
    from conformance.context import SetupError

    spawner = BackendSpawner("vmw", command="sleep 100", start_timeout=0.5)
    with trio.fail_after(10):
        async with spawner.running():
            with pytest.raises(SetupError, match="did not listen on") as info:
                await run_all(
                    catalogue.select("vmw", "vmw.guest-id"), device="vmw", spawner=spawner
                )
    assert [(r.case.name, r.outcome) for r in info.value.results] == [("vmw.guest-id", "error")]


#: listens, takes one connection, exits 1
DYING = (
    f'{sys.executable} -c "import socket, sys; s = socket.socket(socket.AF_UNIX); '
    f's.bind(sys.argv[1]); s.listen(); s.accept(); sys.exit(1)" {{socket}}'
)


def test_a_backend_that_dies_fails_the_cases_after_it_without_a_traceback(
    tmp_path: Path,
) -> None:
    junit = tmp_path / "j.xml"
    cases = "vu.reply-flags-0x5,vu.reply-ack,vu.features-offered"
    proc = _harness("--spawn", DYING, "-k", cases, "--junit", str(junit))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "0 passed, 3 failed" in proc.stdout, proc.stdout
    failures = [tc.find("failure") for tc in ET.parse(junit).iter("testcase")]
    messages = [f.get("message", "") for f in failures if f is not None]
    assert len(messages) == 3
    # the first case met it alive; the next two find it gone and say so
    assert all("exited with 1 during an earlier case" in m for m in messages[1:]), messages


def test_conformance_imports_nothing_of_vdev() -> None:
    """The harness runs in a process where importing vdev is impossible."""
    code = (
        "import sys; sys.modules['vdev'] = None\n"
        "import conformance.__main__, conformance.backend, conformance.runner\n"
        "assert not [m for m in sys.modules if m.startswith('vdev.')]"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# --------------------------------------------------------------------------------------
# what the docs tell the user to type works


def test_documented_target_hooks_use_real_placeholders_and_bytes_for_vdev() -> None:
    """``vdev set-target`` reads a bare number as bytes (``{pages}p`` would be PiB): every
    ``--target-hook`` the README and ``--help`` show names only placeholders the harness
    substitutes, and one for vdev passes ``{bytes}``."""
    import conformance.__main__ as entry

    text = " ".join(((REPO / "README.md").read_text() + (entry.__doc__ or "")).split())
    hooks = re.findall(r"--target-hook '([^']*)'", text)
    assert len(hooks) >= 3, hooks
    for hook in hooks:
        hook.format(**entry.HOOK_FIELDS)  # KeyError: a placeholder that is not substituted
        if "set-target" in hook:
            assert hook.endswith("{vm} {bytes}"), hook
    spawns = re.findall(r"--spawn '([^']*)'", text)
    assert spawns
    for cmd in spawns:
        cmd.format(**entry.SPAWN_FIELDS)


def test_readme_guest_console_command_is_one_the_console_knows() -> None:
    """The in-guest harness is started at the guest's console: its first word must be a
    command of the console loop (the init script's ``case $cmd``), else the console answers
    "unknown command"."""
    from lab.linux_image import init_script

    script = init_script([])
    known = set(re.findall(r"^ {8}(\w+)\) ", script, re.M))
    assert {"run", "report", "poweroff"} <= known
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The harness inside a guest") :]
    block = re.search(r"```\n(.*?)\n```", section, re.S)
    assert block is not None
    line = block.group(1).strip()
    assert line.split()[0] in known, line
    assert "python3 -m conformance --in-guest" in line
    assert line.split(None, 1)[1].startswith("chroot /mnt/root env PYTHONPATH=/opt/vballoon ")


# --------------------------------------------------------------------------------------
# which cases run inside a guest (conformance --in-guest; run for real by
# tests/test_vmw_linux_guest.py)

#: the vmw cases that need nothing but a guest's cmdq: they run over the in-guest transport
GUEST_LEVEL = {
    "vmw.reset-until-start", "vmw.start-capabilities", "vmw.start-withdraw", "vmw.guest-id",
    "vmw.unknown-command", "vmw.bad-frames", "vmw.chains-split", "vmw.lock-unlock",
    "vmw.lock-not-needed", "vmw.ppn-outside-ram", "vmw.pfn-32bit", "vmw.capability-gating",
    "vmw.batch-statuses", "vmw.batch-count", "vmw.pinned-ring-pages",
    "vmw.zeros-after-unlock", "vmw.start-forgets",
}  # fmt: skip


def test_guest_level_cases_are_declared_and_use_only_the_session() -> None:
    import inspect

    from conformance.context import Need

    guest = {c.name for c in catalogue.select("vmw") if not c.needs}
    assert guest == GUEST_LEVEL
    for c in catalogue.CASES:
        src = inspect.getsource(c.fn)
        if c.name in GUEST_LEVEL:
            # what reaches past a guest driver (vhost-user, the harness's RAM, raw rings)
            for past in ("ctx.vmw(", "ctx.frontend(", ".fe.", "_handshake_vmw(", "touch("):
                assert past not in src, (c.name, past)
        else:
            assert c.needs, c.name
    assert all(Need.VHOST_USER in c.needs for c in catalogue.select("virtio-balloon"))


async def test_in_guest_transport_skips_with_the_reason() -> None:
    """Without opening any device: what it cannot run is skipped, naming what is missing."""
    from conformance.inguest import run_in_guest

    chosen = catalogue.select("vmw", "vu.reply-ack,vmw.reclaim-punches-ram,vmw.lock-not-needed,"
                              "vmw.doorbell-unregister,ring.descriptor-loop")  # fmt: skip
    with trio.fail_after(5):
        results = await run_in_guest(chosen, initial_target=4096)
    out = {r.case.name: r for r in results}
    assert {r.outcome for r in results} == {SKIP}
    assert "needs vhost-user" in out["vu.reply-ack"].message
    assert "in-guest transport" in out["vu.reply-ack"].message
    assert "ram-file" in out["vmw.reclaim-punches-ram"].message
    assert "target-change" in out["vmw.doorbell-unregister"].message
    assert "raw-ring" in out["ring.descriptor-loop"].message
    assert out["vmw.lock-not-needed"].message == "needs target 0 pages; the host set 4096"


def test_in_guest_helpers() -> None:
    from conformance.inguest import parse_result_line, ram_end_pfn, result_line

    iomem = (
        "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n"
        "00100000-1ffdefff : System RAM\n  01000000-01ffffff : Kernel code\n"
        "1ffdf000-1fffffff : Reserved\nb0000000-bfffffff : PCI MMCONFIG 0000 [bus 00-ff]\n"
    )
    assert ram_end_pfn(iomem) == (512 << 20) // 4096
    r = Result(catalogue.select("vmw", "vmw.guest-id")[0], FAIL, 'status "X"', 0.25)
    assert parse_result_line(result_line(r)) == {
        "case": "vmw.guest-id", "outcome": FAIL, "message": 'status "X"', "seconds": 0.25
    }  # fmt: skip
    assert parse_result_line("@vbg out hello") is None


def test_in_guest_without_the_function_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """On a machine with no vmw function (here), --in-guest changes nothing and says why."""
    assert harness_main(["--in-guest", "--initial-target", "4096", "-k", "vmw.guest-id"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the guest's vmw function:" in err
    assert "1af4:1069" in err or "cannot list PCI functions" in err
    assert harness_main(["--in-guest", "--device", "virtio-balloon"]) == 2


def test_list_shows_what_each_case_needs(capsys: pytest.CaptureFixture[str]) -> None:
    assert harness_main(["--list", "-k", "vmw.guest-id,vu.reply-ack"]) == 0
    out = capsys.readouterr().out
    assert "needs: guest-level (any transport)" in out and "needs: vhost-user" in out


if __name__ == "__main__":
    # python tests/test_harness.py MUTANT vdev-args...: vdev with one rule inverted
    MUTANTS[sys.argv[1]]()
    from vdev.cli.main import main

    sys.argv = ["vdev", *sys.argv[2:]]
    main()
