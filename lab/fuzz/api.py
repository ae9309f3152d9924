"""Fuzz target ``api``: a live ``vdev serve`` attacked over its management API socket.

:func:`session` starts ``vdev serve`` (a simulated host, short API timeouts so that stalled
attacks end quickly). Each input drives one to three connections of hostile HTTP: any
method, paths with ``..``, ``%2F``, NULs and long names, lying or duplicated
``Content-Length``, broken chunked framing, oversized headers, missing ``Host``, HTTP/1.0,
pipelined requests, bodies from JSON templates with hostile values (huge and deep numbers,
NaN, wrong types, unknown keys) or raw bytes, sent in random pieces, with early closes and
half-closes. Oracle, after every input:

* the process is still running;
* every response vdev wrote is well-formed HTTP/1.1 (parsed by h11 as a client), with a
  2xx or 4xx status (never 5xx), and every non-stream body is JSON (``{"error": ...}`` for
  every 4xx);
* a fresh ``GET /vms`` is answered 200 within a deadline, and vdev's fds return to the
  baseline (no connection leaks).

The attack is out of process: the built-in engine mutates structure-aware inputs blind
(``GUIDED = False``), as for ``wire``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11

from lab.fuzz.corpus import Draw, Finding
from lab.vdev_process import VdevProcess, start_vdev

ENGINE = "builtin"
GUIDED = False
INSTRUMENT = ("vdev",)
DEADLINE = 3.0
FD_SLACK = 8

METHODS = [b"GET", b"PUT", b"POST", b"DELETE", b"HEAD", b"PATCH", b"OPTIONS", b"G\x00T", b""]
PATHS = [
    b"/vms", b"/vms/vm0", b"/vms/vm0/target", b"/vms/vm0/reset", b"/vms/vm0/stats",
    b"/vms/vm0/history?last=3", b"/vms/vm0/history?last=-1", b"/host", b"/host/simulated",
    b"/pools", b"/settings", b"/settings/Mem/CtlMaxPercent", b"/settings/Mem.IdleTax",
    b"/events", b"/events?vm=vm0", b"/metrics", b"/openapi.json", b"/vms/vm0%2F..%2Fvm1",
    b"/vms/../settings/target", b"/vms/%00/target", b"//vms", b"*", b"http://x/vms",
    b"/vms/" + b"a" * 300, b"/settings/" + b"%2e%2e/" * 20, b"/vms?x=" + b"%" * 10,
]  # fmt: skip
VALUES = [
    b"1", b"0", b"-1", b"1.5", b"1e308", b"1e400", b"-1e400", b"NaN", b"Infinity", b"true",
    b"null", b'"5"', b'"512M"', b'"1.5G"', b'"999999999P"', b'"-5"', b'"1e3"', b"[]", b"{}",
    b"9" * 400, b"9" * 5000, b"[" * 1000 + b"]" * 1000, b'"\\ud800"', b'"' + b"x" * 200 + b'"',
]  # fmt: skip
KEYS = [
    b"target_mib", b"target_pages", b"target_bytes", b"target", b"policy", b"free_bytes",
    b"free_mib", b"free", b"value", b"val", b"", b"target_mib\x00",
]  # fmt: skip


@dataclass
class Live:
    vdev: VdevProcess
    api: str
    base_fds: int = 0


_LIVE: Live | None = None


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def session(vdev_cmd: list[str] | None = None) -> Iterator[Live]:
    """Start ``vdev serve`` with its API for a campaign."""
    global _LIVE
    with (
        tempfile.TemporaryDirectory(prefix="vballoon-api-") as tmp,
        start_vdev(
            Path(tmp) / "vm", api_socket=Path(tmp) / "vdev.api", verbose=0,
            vdev_cmd=vdev_cmd, log_path=Path(tmp) / "vdev.log",
            extra=["--host-memory", "16G", "--api-header-timeout", "0.5",
                   "--api-body-timeout", "0.5", "--api-max-subscribers", "4"],
        ) as vdev,
    ):  # fmt: skip
        live = Live(vdev, str(Path(tmp) / "vdev.api"))
        _wait_api(live.api)
        live.base_fds = _fd_count(vdev.pid)
        _LIVE = live
        try:
            yield live
        finally:
            _LIVE = None


def _wait_api(path: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"vdev never created its API socket {path}")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------
# the attack


def _body(d: Draw) -> bytes:
    kind = d.below(4)
    if kind == 0:
        return d.blob(64)
    if kind == 1:
        return b'{"' + d.choice(KEYS) + b'":' + d.choice(VALUES) + b"}"
    if kind == 2:
        pairs = [b'"' + d.choice(KEYS) + b'":' + d.choice(VALUES) for _ in range(d.between(0, 3))]
        return b"{" + b",".join(pairs) + b"}"
    return b""


def _request(d: Draw) -> tuple[bytes, bytes]:
    """(the bytes of one hostile request, its method)."""
    method = d.choice(METHODS)
    path = d.choice(PATHS)
    version = d.choice([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b""])
    body = _body(d)
    headers = []
    if d.chance(7, 8):
        headers.append(b"Host: x")
    framing = d.below(8)
    if framing <= 3:
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == 4:  # a lie: more or less than sent
        headers.append(b"Content-Length: %d" % max(0, len(body) + d.between(-8, 100)))
    elif framing == 5:
        headers.append(b"Transfer-Encoding: chunked")
        size = len(body) + d.between(-4, 4)
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (max(0, size), body)
    elif framing == 6:
        headers.append(d.choice([b"Content-Length: -1", b"Content-Length: 1e3",
                                 b"Content-Length: 5\r\nContent-Length: 6",
                                 b"Content-Length: 99999999999999999999"]))  # fmt: skip
    if d.chance(1, 8):
        headers.append(b"X-Big: " + b"a" * d.between(1000, 20000))
    if d.chance(1, 8):
        headers.append(d.blob(40).replace(b"\r", b"").replace(b"\n", b""))
    if d.chance(1, 4):
        headers.append(b"Content-Type: " + d.choice([b"application/json", b"text/plain", b"x"]))
    if d.chance(1, 6):
        headers.append(b"Accept: text/event-stream")
    line = b" ".join(p for p in (method, path, version) if p)
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body, method


def _send_pieces(d: Draw, s: socket.socket, data: bytes) -> None:
    pos = 0
    while pos < len(data):
        n = d.between(1, 4096) if d.chance(1, 3) else len(data) - pos
        s.sendall(data[pos : pos + n])
        pos += n


def _read_all(s: socket.socket, deadline: float, expected: int = 1) -> bytes:
    """What vdev writes until it closes, the deadline passes, or (after a short silence) the
    ``expected`` answers are complete (a kept-alive connection waits for more)."""
    out = b""
    s.settimeout(0.05)
    while time.monotonic() < deadline and len(out) < 1 << 20:
        try:
            data = s.recv(65536)
        except TimeoutError:
            if out:
                try:
                    if check_responses(out) >= expected:
                        break
                except Finding:
                    break  # the caller's check will say what is wrong
                if b"\r\n\r\n" in out and (b"ndjson" in out or b"event-stream" in out):
                    break  # an event stream: its first lines are enough
            continue
        except OSError:
            break
        if not data:
            break
        out += data
    return out


def check_responses(raw: bytes, methods: list[bytes] | None = None) -> int:
    """Every response in ``raw`` (answers to ``methods`` in order) is well-formed, 2xx/4xx,
    JSON where it must be (Finding otherwise); returns how many were complete."""
    complete = 0
    methods = list(methods or [])
    while raw:
        method = methods.pop(0) if methods else b"GET"
        conn = h11.Connection(h11.CLIENT)
        conn.send(
            h11.Request(
                method=b"HEAD" if method == b"HEAD" else b"GET", target="/", headers=[("Host", "x")]
            )
        )
        conn.send(h11.EndOfMessage())
        conn.receive_data(raw)
        conn.receive_data(b"")  # whatever is cut short is the end of the connection
        status, ctype, body = 0, "", b""
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    status = event.status_code
                    ctype = dict(event.headers).get(b"content-type", b"").decode()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    complete += 1
                    break
                elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError as e:
            streaming = ctype.startswith(("application/x-ndjson", "text/event-stream"))
            if not (status == 200 and streaming):
                raise Finding(f"malformed HTTP response from vdev: {e}: {raw[:200]!r}") from None
        if status >= 500 or (status and status < 200):
            raise Finding(f"vdev answered {status}: {body[:300]!r}")
        if method != b"HEAD" and (status >= 400 or ctype.startswith("application/json")):
            if not body and status:
                raise Finding(f"vdev answered {status} without a JSON body")
            try:
                doc = json.loads(body) if body else {}
            except ValueError:
                raise Finding(f"vdev answered {status} with a body that is not JSON: "
                              f"{body[:200]!r}") from None  # fmt: skip
            if status >= 400 and not (isinstance(doc, dict) and isinstance(doc.get("error"), str)):
                raise Finding(f"vdev's {status} is not {{'error': ...}}: {body[:200]!r}")
        if not isinstance(event, h11.EndOfMessage) or conn.their_state is not h11.DONE:
            break
        raw = conn.trailing_data[0]
    return complete


def _attack(d: Draw, path: str) -> None:
    for _ in range(d.between(1, 3)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        try:
            s.connect(path)
            methods = []
            with contextlib.suppress(OSError):
                for _ in range(d.between(1, 3)):  # pipelined
                    request, method = _request(d)
                    methods.append(method)
                    _send_pieces(d, s, request)
                ending = d.below(4)
                if ending == 0:
                    s.close()  # gone before any answer: nothing to check
                    continue
                if ending == 1:
                    s.shutdown(socket.SHUT_WR)
            raw = _read_all(s, time.monotonic() + DEADLINE, len(methods))
            check_responses(raw, methods)
        finally:
            s.close()


def _healthy(path: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        try:
            s.connect(path)
            s.sendall(b"GET /vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = _read_all(s, deadline)
        except OSError as e:
            raw = repr(e).encode()
        finally:
            s.close()
        if raw.startswith(b"HTTP/1.1 200 "):
            return
        if not raw.startswith(b"HTTP/1.1 503 ") or time.monotonic() > deadline:
            raise Finding(f"healthy GET /vms not answered 200 after the attack: {raw[:200]!r}")
        time.sleep(0.05)


def one_input(data: bytes) -> None:
    live = _LIVE
    if live is None:
        with session() as _:
            one_input(data)
        return
    _attack(Draw(data), live.api)
    if not live.vdev.alive():
        raise Finding(f"vdev exited with {live.vdev.returncode}: {live.vdev.log_tail()}")
    _healthy(live.api)
    for _ in range(100):  # the attack's connections are gone: so are their fds
        fds = _fd_count(live.vdev.pid)
        if fds <= live.base_fds + FD_SLACK:
            break
        time.sleep(0.01)
    else:
        raise Finding(f"fd leak: vdev holds {fds} fds, {live.base_fds} at start")


def seeds() -> list[bytes]:
    return [
        bytes([0, 1, 2, 3, 1, 1, 0, 2]) + b'{"target_mib": 5}',
        bytes([1, 2, 2, 0, 1, 4, 0, 1, 2]) + bytes(range(40)),
        bytes([2, 7, 3, 5, 2, 5, 9, 9]) + bytes(60),
        bytes(range(255, 0, -3)),
    ]
