"""The management API: JSON over HTTP/1.1 on a unix socket (Firecracker / Cloud Hypervisor
style), served by hypercorn's trio worker with a starlette app.

Endpoints (the OpenAPI 3.1 document is :data:`OPENAPI`, served at ``/openapi.json``):

    GET  /vms                       every guest (esxtop MCTL?, MCTLSZ, MCTLTGT, MCTLMAX, rates...)
    GET  /vms/{name}                one guest
    PUT  /vms/{name}/target         {"target_mib": N} | {"target_pages": N} | {"target_bytes": N}
                                    | {"target": "1.5G"} (manual override) | {"policy": true}
    POST /vms/{name}/reset          demand a balloon reset (the guest pops every page)
    POST /vms/{name}/stats          ask the guest for fresh guest_stats now (202; virtio-balloon;
                                    vdev serve --stats-interval also refreshes them periodically)
    GET  /vms/{name}/history        the in-memory history ring (for `vdev plot`)
    GET  /host                      host state high/clear/soft/hard/low, total/free/minFree, PSI
    PUT  /host/simulated            {"free_bytes": N} | {"free_mib": N} | {"free": "2G"}
    GET  /pools                     resource pools and their VMs
    GET  /settings                  every advanced setting (ESXi-style paths)
    GET  /settings/{path}           one setting, e.g. /settings/Mem/CtlMaxPercent
    PUT  /settings/{path}           {"value": N}
    GET  /events                    a stream of events: NDJSON, or SSE with
                                    "Accept: text/event-stream"; ?vm=NAME filters
    GET  /metrics                   Prometheus text format
    GET  /openapi.json              this API's OpenAPI document

Errors are ``{"error": "..."}`` with 400 (bad body), 404 (unknown VM, setting or path),
405 (method), 409 (``PUT /host/simulated`` on a real host; ``POST /vms/{name}/stats`` on a
guest that is not connected or whose personality keeps no statistics).

The socket is created with mode 0600 (``api_socket_mode`` in the config file): whoever can
connect can change every guest's balloon. It is bound, chmod-ed and only then listened on,
so there is no window in which it is reachable with looser permissions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from protocol.errors import ConfigError
from protocol.units import PAGE_SIZE
from vdev.config import parse_size
from vdev.metrics import render_metrics
from vdev.policy.control import ControlPlane, NotSimulated, driver_active, failures, jsonable
from vdev.policy.model import SharesLevel

log = logging.getLogger(__name__)

MIB = 1 << 20
#: A keep-alive is written on an idle event stream this often (also how fast a vanished
#: client is noticed if the server never gets a disconnect).
HEARTBEAT_S = 15.0


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Views of the state


def vm_info(control: ControlPlane, name: str) -> dict[str, Any]:
    view = control.registry.view(name)  # KeyError: unknown guest
    ram = int(view.ram_pages)
    size = int(view.size_pages)
    target = int(view.target_pages)
    max_pages = control.max_pages(name, view)
    inflate, deflate = control.rates(name)
    counters = {str(k): int(v) for k, v in dict(getattr(view, "counters", {}) or {}).items()}
    active = driver_active(view)
    manual = control.manual.get(name)
    if not view.connected:
        state = "disconnected"
    elif getattr(view, "reset_demanded", False):
        state = "resetting"
    else:
        state = "active" if active else "inactive"
    guest_type = getattr(view, "guest_type", None)
    return {
        "name": name,
        "socket_path": str(getattr(view, "socket_path", "")),
        "personality": str(getattr(view, "personality", "")),
        "connected": bool(view.connected),
        "driver_active": active,
        "state": state,
        "control": "manual" if manual is not None else "policy",
        "manual_target_pages": manual,
        "reason": control.reason(name),
        "pool": control.config.vm(name).pool,
        "ram_pages": ram,
        "ram_bytes": ram * PAGE_SIZE,
        "target_pages": target,
        "target_bytes": target * PAGE_SIZE,
        "size_pages": size,
        "size_bytes": size * PAGE_SIZE,
        "max_pages": max_pages,
        "max_bytes": max_pages * PAGE_SIZE,
        "rates": {
            "inflate_pages_per_s": inflate,
            "deflate_pages_per_s": deflate,
            "window_s": control.config.rate_window,
        },
        "failures": failures(counters),
        "capabilities": jsonable(getattr(view, "capabilities", None)),
        "guest_type": jsonable(guest_type),
        "doorbell_registered": bool(getattr(view, "doorbell_registered", False)),
        "counters": counters,
        "gauges": sorted(str(g) for g in getattr(view, "gauges", ()) or () if str(g) in counters),
        "guest_stats": {
            str(k): int(v) for k, v in dict(getattr(view, "guest_stats", {}) or {}).items()
        },
        "ram_allocated_bytes": int(getattr(view, "ram_allocated_bytes", 0) or 0),
        "reclaimed_bytes_total": int(getattr(view, "reclaimed_bytes_total", 0) or 0),
    }


def pools_info(control: ControlPlane) -> list[dict[str, Any]]:
    members: dict[str | None, list[str]] = {}
    for name in control.registry.names():
        members.setdefault(control.config.vm(name).pool, []).append(name)
    out = []
    for pool in control.engine.pools.values():
        shares = pool.shares
        out.append(
            {
                "name": pool.name,
                "parent": pool.parent,
                "reservation_bytes": pool.reservation_pages * PAGE_SIZE,
                "limit_bytes": None if pool.limit_pages is None else pool.limit_pages * PAGE_SIZE,
                "shares": shares.name.lower() if isinstance(shares, SharesLevel) else shares,
                "share_count": pool.share_count,
                "expandable_reservation": pool.expandable_reservation,
                "vms": sorted(members.get(pool.name, [])),
            }
        )
    return out


def settings_info(control: ControlPlane) -> dict[str, int]:
    settings = control.engine.settings
    return {path: settings.get(path) for path in settings.paths()}


def history_info(control: ControlPlane, name: str, last: int | None) -> dict[str, Any]:
    points = control.history(name)
    if last is not None:
        points = points[-last:] if last > 0 else []
    return {
        "name": name,
        "page_size": PAGE_SIZE,
        "points": [jsonable(p) for p in points],
    }


# --------------------------------------------------------------------------------------------
# Request helpers


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _only_one(body: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any]:
    present = [k for k in keys if k in body]
    unknown = sorted(set(body) - set(keys))
    if unknown:
        raise ApiError(
            400, f"unknown field(s) {', '.join(unknown)}; expected one of {', '.join(keys)}"
        )
    if len(present) != 1:
        raise ApiError(400, f"expected exactly one of {', '.join(keys)}")
    return present[0], body[present[0]]


def _number(value: Any, field: str, *, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{field} must be a number, got {json.dumps(value)}")
    if integer and not isinstance(value, int):
        raise ApiError(400, f"{field} must be an integer, got {value}")
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, f"{field} must be >= 0, got {value}")
    return value


def _size_bytes(key: str, value: Any) -> int:
    """Bytes from one of *_bytes / *_mib / *_pages / a size string."""
    if key.endswith("_pages"):
        return int(_number(value, key, integer=True)) * PAGE_SIZE
    if key.endswith("_bytes"):
        return int(_number(value, key, integer=True))
    if key.endswith("_mib"):
        return int(_number(value, key, integer=False) * MIB)
    if not isinstance(value, str):
        raise ApiError(400, f'{key} must be a size string such as "512M", got {json.dumps(value)}')
    try:
        return parse_size(value, key)
    except ConfigError as e:
        raise ApiError(400, str(e)) from None


def _vm_name(request: Request, control: ControlPlane) -> str:
    name = str(request.path_params["name"])
    if name not in control.registry.names():
        raise ApiError(
            404, f"no VM named {name!r}; known: {', '.join(control.registry.names()) or 'none'}"
        )
    return name


def _setting_path(request: Request, control: ControlPlane) -> str:
    raw = str(request.path_params["path"]).strip("/")
    path = "/" + raw.replace(".", "/") if "/" not in raw else "/" + raw
    known = control.engine.settings.paths()
    if path not in known:
        raise ApiError(404, f"no setting {path!r}; known: {', '.join(known)}")
    return path


# --------------------------------------------------------------------------------------------
# The app


def create_app(control: ControlPlane) -> Starlette:
    async def list_vms(request: Request) -> Response:
        return JSONResponse({"vms": [vm_info(control, n) for n in control.registry.names()]})

    async def get_vm(request: Request) -> Response:
        return JSONResponse(vm_info(control, _vm_name(request, control)))

    async def put_target(request: Request) -> Response:
        name = _vm_name(request, control)
        body = await _json_body(request)
        if "policy" in body:
            if set(body) != {"policy"} or body["policy"] is not True:
                raise ApiError(400, 'to return control to the policy send exactly {"policy": true}')
            control.clear_manual_target(name)
            control.step()  # so the answer already shows the policy's target and reason
        else:
            key, value = _only_one(body, ("target_mib", "target_pages", "target_bytes", "target"))
            pages = _size_bytes(key, value) // PAGE_SIZE
            try:
                control.set_manual_target(name, pages)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
        return JSONResponse(vm_info(control, name))

    async def reset_vm(request: Request) -> Response:
        name = _vm_name(request, control)
        try:
            control.reset(name)
        except ConfigError as e:  # the personality has no operator reset (virtio-balloon)
            raise ApiError(409, str(e)) from None
        return JSONResponse(vm_info(control, name))

    async def request_vm_stats(request: Request) -> Response:
        name = _vm_name(request, control)
        request_stats = getattr(control.registry, "request_stats", None)
        if request_stats is None or not request_stats(name):
            raise ApiError(
                409,
                f"{name}: no guest statistics to refresh (not connected, or its personality "
                "keeps none)",
            )
        # the guest answers asynchronously: guest_stats change once it refilled the buffer
        return JSONResponse(vm_info(control, name), status_code=202)

    async def get_history(request: Request) -> Response:
        name = _vm_name(request, control)
        last_raw = request.query_params.get("last")
        last = None
        if last_raw is not None:
            try:
                last = int(last_raw)
            except ValueError:
                raise ApiError(400, f"last must be an integer, got {last_raw!r}") from None
        return JSONResponse(history_info(control, name, last))

    async def get_host(request: Request) -> Response:
        return JSONResponse(control.host_info())

    async def put_simulated(request: Request) -> Response:
        body = await _json_body(request)
        key, value = _only_one(body, ("free_bytes", "free_mib", "free"))
        try:
            control.set_simulated_free(_size_bytes(key, value))
        except NotSimulated as e:
            raise ApiError(409, str(e)) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        control.step()  # so the answer already shows the new state
        return JSONResponse(control.host_info())

    async def get_pools(request: Request) -> Response:
        return JSONResponse({"pools": pools_info(control)})

    async def get_settings(request: Request) -> Response:
        return JSONResponse({"settings": settings_info(control)})

    async def get_setting(request: Request) -> Response:
        path = _setting_path(request, control)
        return JSONResponse({"path": path, "value": control.engine.settings.get(path)})

    async def put_setting(request: Request) -> Response:
        path = _setting_path(request, control)
        body = await _json_body(request)
        _, value = _only_one(body, ("value",))
        try:
            control.set_setting(path, value)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        return JSONResponse({"path": path, "value": control.engine.settings.get(path)})

    async def events(request: Request) -> Response:
        vm = request.query_params.get("vm")
        if vm is not None and vm not in control.registry.names():
            raise ApiError(404, f"no VM named {vm!r}")
        sse = "text/event-stream" in request.headers.get("accept", "")
        receive = control.subscribe()

        def encode(event: dict[str, Any]) -> bytes:
            data = json.dumps(event, separators=(",", ":"))
            if sse:
                return f"event: {event.get('type', 'message')}\ndata: {data}\n\n".encode()
            return data.encode() + b"\n"

        async def stream() -> AsyncIterator[bytes]:
            async with receive:
                yield encode(
                    {"type": "hello", "vms": control.registry.names(), "time": control.wall()}
                )
                while True:
                    with trio.move_on_after(HEARTBEAT_S) as idle:
                        try:
                            event = await receive.receive()
                        except trio.EndOfChannel:  # we fell too far behind: dropped
                            return
                    if idle.cancelled_caught:
                        yield (
                            b": keep-alive\n\n"
                            if sse
                            else encode({"type": "heartbeat", "time": control.wall()})
                        )
                        continue
                    if vm is None or event.get("name") in (None, vm):
                        yield encode(event)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream" if sse else "application/x-ndjson",
            headers={"cache-control": "no-cache"},
        )

    async def metrics(request: Request) -> Response:
        return Response(render_metrics(control), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = exc.detail
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def key_error(request: Request, exc: Exception) -> Response:
        # A guest vanished between the name check and the read.
        return JSONResponse({"error": f"no such VM: {exc}"}, status_code=404)

    routes = [
        Route("/vms", list_vms, methods=["GET"]),
        Route("/vms/{name}", get_vm, methods=["GET"]),
        Route("/vms/{name}/target", put_target, methods=["PUT"]),
        Route("/vms/{name}/reset", reset_vm, methods=["POST"]),
        Route("/vms/{name}/stats", request_vm_stats, methods=["POST"]),
        Route("/vms/{name}/history", get_history, methods=["GET"]),
        Route("/host", get_host, methods=["GET"]),
        Route("/host/simulated", put_simulated, methods=["PUT"]),
        Route("/pools", get_pools, methods=["GET"]),
        Route("/settings", get_settings, methods=["GET"]),
        Route("/settings/{path:path}", get_setting, methods=["GET"]),
        Route("/settings/{path:path}", put_setting, methods=["PUT"]),
        Route("/events", events, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={ApiError: api_error, HTTPException: http_error, KeyError: key_error},
    )


# --------------------------------------------------------------------------------------------
# Serving on a unix socket


def default_api_socket(vhost_user_sockets: list[str]) -> str:
    """``<first vhost-user socket>.api`` (e.g. ``/run/vm0.sock`` -> ``/run/vm0.sock.api``)."""
    if not vhost_user_sockets:
        raise ConfigError("no vhost-user socket to put the API socket next to; give --api-socket")
    return str(vhost_user_sockets[0]) + ".api"


def check_socket_path(path: str) -> None:
    """ConfigError unless ``path`` is free or a stale socket (which is then removed).

    A live socket (someone accepts on it) or any other kind of file is an error rather than
    something we delete."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"API socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"API socket path {path}: {e.strerror}") from e
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        raise ConfigError(f"API socket {path} is in use by another process")
    finally:
        probe.close()


def bind_unix_socket(path: str, mode: int = 0o600) -> socket.socket:
    """A bound (not yet listening) unix stream socket at ``path`` with permissions ``mode``
    (see :func:`check_socket_path` for what may already be there)."""
    check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)  # before listen(): nobody can connect yet
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot bind API socket {path}: {e.strerror}") from e
    return sock


async def serve_api(
    control: ControlPlane,
    path: str,
    *,
    mode: int = 0o600,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on ``path`` until cancelled; the socket file is removed on the way out."""
    sock = bind_unix_socket(path, mode)
    inode = os.stat(path).st_ino
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 0.5
    app = create_app(control)

    def started(_binds: object = None) -> None:
        log.info("management API on %s (mode %04o)", path, mode)
        task_status.started(path)

    try:
        await hypercorn_serve(app, config, task_status=_Started(started))  # type: ignore[arg-type]
    finally:
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass


class _Started:
    """Adapts hypercorn's ``task_status.started(binds)`` to ours (which reports the path)."""

    def __init__(self, callback: Callable[[object], None]) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback(value)


# --------------------------------------------------------------------------------------------
# OpenAPI 3.1


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = _json(_ref("Error"), "Error")
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_PATH = {
    "name": "path",
    "in": "path",
    "required": True,
    "description": "setting path without the leading slash, e.g. Mem/CtlMaxPercent",
    "schema": {"type": "string"},
}
_INT = {"type": "integer", "minimum": 0}
_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_NUM = {"type": ["number", "null"]}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "vballoon vdev management API",
        "version": "1",
        "description": "Control plane of a vmmemctl-style balloon served as a vhost-user "
        "back-end. Sizes are 4 KiB pages and bytes; columns follow esxtop (MCTL?, MCTLSZ, "
        "MCTLTGT, MCTLMAX).",
    },
    "paths": {
        "/vms": {"get": {"summary": "List VMs", "responses": {"200": _json(_ref("VmList"))}}},
        "/vms/{name}": {
            "get": {
                "summary": "One VM",
                "parameters": [_NAME],
                "responses": {"200": _json(_ref("Vm")), "404": _ERR},
            }
        },
        "/vms/{name}/target": {
            "put": {
                "summary": "Set a manual balloon target, or return the VM to the policy",
                "parameters": [_NAME],
                "requestBody": _body(_ref("TargetRequest")),
                "responses": {"200": _json(_ref("Vm")), "400": _ERR, "404": _ERR},
            }
        },
        "/vms/{name}/reset": {
            "post": {
                "summary": "Demand a balloon reset (vmw; a virtio-balloon device has none: 409)",
                "parameters": [_NAME],
                "responses": {"200": _json(_ref("Vm")), "404": _ERR, "409": _ERR},
            }
        },
        "/vms/{name}/stats": {
            "post": {
                "summary": "Ask the guest for fresh statistics (guest_stats; virtio-balloon). "
                "They arrive asynchronously; vdev serve --stats-interval also refreshes them",
                "parameters": [_NAME],
                "responses": {
                    "202": _json(_ref("Vm"), "Requested (the current state)"),
                    "404": _ERR,
                    "409": _ERR,
                },
            }
        },
        "/vms/{name}/history": {
            "get": {
                "summary": "In-memory history of target, size, max and host free memory",
                "parameters": [
                    _NAME,
                    {"name": "last", "in": "query", "required": False, "schema": _INT},
                ],
                "responses": {"200": _json(_ref("History")), "400": _ERR, "404": _ERR},
            }
        },
        "/host": {
            "get": {"summary": "Host memory state", "responses": {"200": _json(_ref("Host"))}}
        },
        "/host/simulated": {
            "put": {
                "summary": "Set the simulated host's free memory (simulated mode only)",
                "requestBody": _body(_ref("SimulatedRequest")),
                "responses": {"200": _json(_ref("Host")), "400": _ERR, "409": _ERR},
            }
        },
        "/pools": {
            "get": {"summary": "Resource pools", "responses": {"200": _json(_ref("PoolList"))}}
        },
        "/settings": {
            "get": {"summary": "Advanced settings", "responses": {"200": _json(_ref("Settings"))}}
        },
        "/settings/{path}": {
            "get": {
                "summary": "One advanced setting",
                "parameters": [_PATH],
                "responses": {"200": _json(_ref("Setting")), "404": _ERR},
            },
            "put": {
                "summary": "Change one advanced setting",
                "parameters": [_PATH],
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["value"],
                        "additionalProperties": False,
                        "properties": {"value": {"type": "integer"}},
                    }
                ),
                "responses": {"200": _json(_ref("Setting")), "400": _ERR, "404": _ERR},
            },
        },
        "/events": {
            "get": {
                "summary": "Event stream (no polling): NDJSON, or SSE with Accept: text/event-stream",
                "parameters": [
                    {"name": "vm", "in": "query", "required": False, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "one JSON Event per line (or per SSE data field); the "
                        "first is {type: hello}",
                        "content": {
                            "application/x-ndjson": {"schema": _ref("Event")},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    "404": _ERR,
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"})},
            }
        },
    },
    "components": {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "Vm": {
                "type": "object",
                "required": [
                    "name",
                    "socket_path",
                    "personality",
                    "connected",
                    "driver_active",
                    "state",
                    "control",
                    "manual_target_pages",
                    "reason",
                    "pool",
                    "ram_pages",
                    "ram_bytes",
                    "target_pages",
                    "target_bytes",
                    "size_pages",
                    "size_bytes",
                    "max_pages",
                    "max_bytes",
                    "rates",
                    "failures",
                    "capabilities",
                    "guest_type",
                    "doorbell_registered",
                    "counters",
                    "gauges",
                    "guest_stats",
                    "ram_allocated_bytes",
                    "reclaimed_bytes_total",
                ],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "socket_path": {"type": "string"},
                    "personality": {"type": "string"},
                    "connected": {"type": "boolean"},
                    "driver_active": {
                        "type": "boolean",
                        "description": "esxtop MCTL?: the balloon driver runs (vmw: START "
                        "granted capabilities, no reset pending; virtio-balloon: DRIVER_OK, "
                        "its rings started). Only active drivers are given policy targets",
                    },
                    "state": {"enum": ["disconnected", "resetting", "active", "inactive"]},
                    "control": {"enum": ["policy", "manual"]},
                    "manual_target_pages": _NULLABLE_INT,
                    "reason": {
                        "type": "string",
                        "description": "what decided the target: manual, pressure:soft, "
                        "capped:CtlMaxPercent, rate-limited, hysteresis, limit, none...",
                    },
                    "pool": {"type": ["string", "null"]},
                    "ram_pages": _INT,
                    "ram_bytes": _INT,
                    "target_pages": {**_INT, "description": "esxtop MCTLTGT"},
                    "target_bytes": _INT,
                    "size_pages": {**_INT, "description": "esxtop MCTLSZ"},
                    "size_bytes": _INT,
                    "max_pages": {**_INT, "description": "esxtop MCTLMAX"},
                    "max_bytes": _INT,
                    "rates": {
                        "type": "object",
                        "required": ["inflate_pages_per_s", "deflate_pages_per_s", "window_s"],
                        "properties": {
                            "inflate_pages_per_s": {"type": "number", "minimum": 0},
                            "deflate_pages_per_s": {"type": "number", "minimum": 0},
                            "window_s": {"type": "number"},
                        },
                    },
                    "failures": {
                        **_INT,
                        "description": "the FAIL column: times the guest did something wrong, "
                        "each counted once: bad frames and bad chains, commands answered "
                        "ERROR_CMD_INVALID, pages refused PPN_INVALID / PPN_LOCKED / "
                        "PPN_UNLOCKED (virtio-balloon: inflated PFNs not RAM or already in "
                        "the balloon). Normal balloon flow is not counted: ERROR_RESET, "
                        "ERROR_BUSY, PPN_NOTNEEDED, PPN_PINNED (vdev.policy.control.failures)",
                    },
                    "capabilities": {},
                    "guest_type": {},
                    "doorbell_registered": {"type": "boolean"},
                    "counters": {
                        "type": "object",
                        "additionalProperties": {"type": "integer"},
                        "description": "device counters (debugfs vocabulary); the names "
                        "listed in gauges are current levels, every other one only grows",
                    },
                    "gauges": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "the names in counters that are gauges (e.g. "
                        "events pending), exported to Prometheus as gauges",
                    },
                    "guest_stats": {
                        "type": "object",
                        "additionalProperties": {"type": "integer"},
                        "description": "QEMU guest-stats keys; -1 = not reported. "
                        "Refreshed every vdev serve --stats-interval seconds and on "
                        "POST /vms/{name}/stats",
                    },
                    "ram_allocated_bytes": _INT,
                    "reclaimed_bytes_total": _INT,
                },
            },
            "VmList": {
                "type": "object",
                "required": ["vms"],
                "properties": {"vms": {"type": "array", "items": _ref("Vm")}},
            },
            "TargetRequest": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": [key],
                        "additionalProperties": False,
                        "properties": {key: schema},
                    }
                    for key, schema in (
                        ("target_mib", {"type": "number", "minimum": 0}),
                        ("target_pages", _INT),
                        ("target_bytes", _INT),
                        ("target", {"type": "string", "examples": ["512M", "1.5G"]}),
                        ("policy", {"const": True}),
                    )
                ]
            },
            "SimulatedRequest": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": [key],
                        "additionalProperties": False,
                        "properties": {key: schema},
                    }
                    for key, schema in (
                        ("free_bytes", _INT),
                        ("free_mib", {"type": "number", "minimum": 0}),
                        ("free", {"type": "string"}),
                    )
                ]
            },
            "Host": {
                "type": "object",
                "required": [
                    "source",
                    "simulated",
                    "state",
                    "total_bytes",
                    "free_bytes",
                    "min_free_bytes",
                    "psi",
                    "pressure_pages",
                    "unmet_pages",
                    "capped_pages",
                    "capped",
                    "policy_period_s",
                    "steps",
                    "last_step",
                    "error",
                ],
                "properties": {
                    "source": {"type": "string", "description": "simulated, proc or cgroup:DIR"},
                    "simulated": {"type": "boolean"},
                    "state": {"enum": ["high", "clear", "soft", "hard", "low", None]},
                    "total_bytes": _NULLABLE_INT,
                    "free_bytes": _NULLABLE_INT,
                    "min_free_bytes": _NULLABLE_INT,
                    "psi": {
                        "type": "object",
                        "properties": {"some_avg10": _NULLABLE_NUM, "full_avg10": _NULLABLE_NUM},
                    },
                    "pressure_pages": {
                        "type": "integer",
                        "description": "host pressure reclamation placed on balloons",
                    },
                    "unmet_pages": {
                        "type": "integer",
                        "description": "host pressure demand the caps kept from any balloon "
                        "(soft/hard/low only; ESXi would compress or swap it). Limits and "
                        "manual targets never count here: see capped_pages",
                    },
                    "capped_pages": {
                        "type": "integer",
                        "description": "limits and manual targets cut by the caps "
                        "(MCTLMAX), per VM and per pool, summed",
                    },
                    "capped": {
                        "type": "object",
                        "required": ["vms", "pools"],
                        "additionalProperties": False,
                        "properties": {
                            "vms": {"type": "object", "additionalProperties": _INT},
                            "pools": {"type": "object", "additionalProperties": _INT},
                        },
                        "description": "capped_pages by VM (its limit or manual target) "
                        "and by pool (its limit); only non-zero entries",
                    },
                    "policy_period_s": {"type": "number"},
                    "steps": {"type": "integer"},
                    "last_step": {
                        **_NULLABLE_NUM,
                        "description": "Unix time of the last policy step",
                    },
                    "error": {"type": ["string", "null"]},
                },
            },
            "Pool": {
                "type": "object",
                "required": [
                    "name",
                    "parent",
                    "reservation_bytes",
                    "limit_bytes",
                    "shares",
                    "share_count",
                    "expandable_reservation",
                    "vms",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "parent": {"type": ["string", "null"]},
                    "reservation_bytes": _INT,
                    "limit_bytes": _NULLABLE_INT,
                    "shares": {"type": ["string", "integer"]},
                    "share_count": {"type": "number"},
                    "expandable_reservation": {"type": "boolean"},
                    "vms": {"type": "array", "items": {"type": "string"}},
                },
            },
            "PoolList": {
                "type": "object",
                "required": ["pools"],
                "properties": {"pools": {"type": "array", "items": _ref("Pool")}},
            },
            "Settings": {
                "type": "object",
                "required": ["settings"],
                "properties": {
                    "settings": {"type": "object", "additionalProperties": {"type": "integer"}}
                },
            },
            "Setting": {
                "type": "object",
                "required": ["path", "value"],
                "properties": {"path": {"type": "string"}, "value": {"type": "integer"}},
            },
            "HistoryPoint": {
                "type": "object",
                "required": [
                    "t",
                    "target_pages",
                    "size_pages",
                    "max_pages",
                    "host_free_bytes",
                    "host_state",
                ],
                "properties": {
                    "t": {"type": "number", "description": "Unix time, seconds"},
                    "target_pages": _INT,
                    "size_pages": _INT,
                    "max_pages": _INT,
                    "host_free_bytes": _INT,
                    "host_state": {"type": "string"},
                    "connected": {
                        "type": "boolean",
                        "description": "a front-end was connected (false: no guest yet or "
                        "any more; size and max mean nothing then)",
                    },
                },
            },
            "History": {
                "type": "object",
                "required": ["name", "page_size", "points"],
                "properties": {
                    "name": {"type": "string"},
                    "page_size": {"type": "integer"},
                    "points": {"type": "array", "items": _ref("HistoryPoint")},
                },
            },
            "Event": {
                "type": "object",
                "required": ["type", "time"],
                "properties": {
                    "type": {
                        "enum": [
                            "hello",
                            "heartbeat",
                            "guest",
                            "control",
                            "host",
                            "setting",
                            "resync",
                        ],
                        "description": "guest: the registry's target/size/state event (with "
                        "the reason of the last target set); control: manual/policy switch or "
                        "reset; host: host state change or simulated free memory; setting: a "
                        "setting changed; resync: guest events were lost, re-read the VMs. A "
                        "client that falls 4096 events behind is disconnected.",
                    },
                    "time": {"type": "number"},
                    "monotonic": {
                        "type": "number",
                        "description": "time.monotonic() of the vdev process (CLOCK_MONOTONIC: "
                        "comparable with any process's monotonic clock on the same Linux host). "
                        "Guest events: when the registry published them; a size event is "
                        "published once the device has finished the batch that moved the size "
                        "(its reclaim done and its completion given to the guest). Other "
                        "events: when the control plane published them.",
                    },
                    "name": {"type": "string"},
                },
            },
        }
    },
}
