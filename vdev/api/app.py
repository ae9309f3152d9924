"""The management API's routes: a FastAPI app over the control plane.

Endpoints (the OpenAPI 3.1 document, generated from :mod:`vdev.api.models`, is served at
``/openapi.json``: :func:`openapi_document`):

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

Every error is ``{"error": "..."}`` (:class:`vdev.api.models.Error`): 400 (the body is not
JSON, or the control plane refused the value: above the guest's RAM, a setting out of its
range), 403 (the peer may not do this: :mod:`vdev.api.serve`), 404 (unknown VM, setting or
path), 405 (method), 408/413/431 (too slow, body or headers too large: the HTTP server), 409
(``PUT /host/simulated`` on a real host; ``POST /vms/{name}/stats`` on a guest that is not
connected or whose personality keeps no statistics), 422 (the body or a query parameter does
not fit its model; the message names the field), 503 (too many API connections or event
subscribers).

Changes (target, reset, stats request, setting, simulated host) are audited: a ``vdev.audit``
log line and an ``audit`` event naming the peer (uid, pid, command line).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import trio
from fastapi import Body, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from protocol.errors import ApiError, ConfigError
from protocol.units import PAGE_SIZE
from vdev import logs
from vdev.api import models
from vdev.api.limits import DEFAULT_MAX_SUBSCRIBERS
from vdev.api.models import describe_validation_error
from vdev.metrics import render_metrics
from vdev.policy.control import ControlPlane, NotSimulated, driver_active, failures, jsonable
from vdev.policy.model import SharesLevel

log = logging.getLogger(__name__)
audit_log = logging.getLogger("vdev.audit")

#: A keep-alive is written on an idle event stream this often (also how fast a vanished
#: client is noticed if the server never gets a disconnect).
HEARTBEAT_S = 15.0

TITLE = "vballoon vdev management API"
DESCRIPTION = (
    "Control plane of a vmmemctl-style balloon served as a vhost-user back-end. Sizes are "
    "4 KiB pages and bytes; columns follow esxtop (MCTL?, MCTLSZ, MCTLTGT, MCTLMAX). Every "
    "error is {error: message}."
)

#: The scope key under which :mod:`vdev.api.serve` puts the peer's credentials.
PEER_SCOPE_KEY = "vdev.peer"


# --------------------------------------------------------------------------------------------
# Views of the state


def vm_info(control: ControlPlane, name: str) -> models.Vm:
    view = control.registry.view(name)  # KeyError: unknown guest
    ram = int(view.ram_pages)
    size = int(view.size_pages)
    target = int(view.target_pages)
    max_pages = control.max_pages(name, view)
    inflate, deflate = control.rates(name)
    counters = {str(k): int(v) for k, v in dict(getattr(view, "counters", {}) or {}).items()}
    active = driver_active(view)
    manual = control.manual.get(name)
    state: Literal["disconnected", "resetting", "active", "inactive"]
    if not view.connected:
        state = "disconnected"
    elif view.reset_demanded:
        state = "resetting"
    else:
        state = "active" if active else "inactive"
    return models.Vm(
        name=name,
        socket_path=str(view.socket_path),
        personality=str(view.personality),
        connected=bool(view.connected),
        driver_active=active,
        state=state,
        control="manual" if manual is not None else "policy",
        manual_target_pages=manual,
        reason=control.reason(name),
        pool=control.config.vm(name).pool,
        ram_pages=ram,
        ram_bytes=ram * PAGE_SIZE,
        target_pages=target,
        target_bytes=target * PAGE_SIZE,
        size_pages=size,
        size_bytes=size * PAGE_SIZE,
        max_pages=max_pages,
        max_bytes=max_pages * PAGE_SIZE,
        rates=models.Rates(
            inflate_pages_per_s=inflate,
            deflate_pages_per_s=deflate,
            window_s=control.config.rate_window,
        ),
        failures=failures(counters),
        capabilities=jsonable(view.capabilities),
        guest_type=jsonable(view.guest_type),
        doorbell_registered=bool(view.doorbell_registered),
        counters=counters,
        gauges=sorted(str(g) for g in view.gauges or () if str(g) in counters),
        guest_stats={str(k): int(v) for k, v in dict(view.guest_stats or {}).items()},
        ram_allocated_bytes=int(view.ram_allocated_bytes or 0),
        reclaimed_bytes_total=int(view.reclaimed_bytes_total or 0),
    )


def pools_info(control: ControlPlane) -> list[models.Pool]:
    members: dict[str | None, list[str]] = {}
    for name in control.registry.names():
        members.setdefault(control.config.vm(name).pool, []).append(name)
    out = []
    for pool in control.engine.pools.values():
        shares = pool.shares
        out.append(
            models.Pool(
                name=pool.name,
                parent=pool.parent,
                reservation_bytes=pool.reservation_pages * PAGE_SIZE,
                limit_bytes=None if pool.limit_pages is None else pool.limit_pages * PAGE_SIZE,
                shares=shares.name.lower() if isinstance(shares, SharesLevel) else shares,
                share_count=pool.share_count,
                expandable_reservation=pool.expandable_reservation,
                vms=sorted(members.get(pool.name, [])),
            )
        )
    return out


def settings_info(control: ControlPlane) -> dict[str, int]:
    settings = control.engine.settings
    return {path: settings.get(path) for path in settings.paths()}


def history_info(control: ControlPlane, name: str, last: int | None) -> models.History:
    points = control.history(name)
    if last is not None:
        points = points[-last:] if last > 0 else []
    return models.History(
        name=name,
        page_size=PAGE_SIZE,
        points=[models.HistoryPoint(**jsonable(p)) for p in points],
    )


# --------------------------------------------------------------------------------------------
# Request helpers


def _query_names(dependant: Any) -> frozenset[str]:
    """The query parameters a route (its dependant, with its sub-dependencies) declares."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


async def known_query(request: Request) -> None:
    """Refuse query parameters the path does not take, as unknown body fields are refused:
    a misspelt one (``?since=``) must not silently answer as if it were not there."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    allowed = _query_names(dependant)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
        raise ApiError(422, f"unknown query parameter(s) {', '.join(unknown)}: {takes}")


def _vm_name(control: ControlPlane, name: str) -> str:
    if name not in control.registry.names():
        raise ApiError(
            404, f"no VM named {name!r}; known: {', '.join(control.registry.names()) or 'none'}"
        )
    return name


def _setting_path(control: ControlPlane, raw: str) -> str:
    raw = raw.strip("/")
    path = "/" + raw.replace(".", "/") if "/" not in raw else "/" + raw
    known = control.engine.settings.paths()
    if path not in known:
        raise ApiError(404, f"no setting {path!r}; known: {', '.join(known)}")
    return path


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _err(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": models.Error, "description": _WHY[code]} for code in codes}


_WHY = {
    400: "The body is not JSON, or the control plane refused the value",
    403: "The peer may not do this (not the owner or root; read-only group: GET only)",
    404: "Unknown VM, setting or path",
    408: "The request's headers or body were not received in time",
    409: "Not possible in this state",
    413: "The request body is larger than the limit",
    422: "The body or a query parameter does not fit its model (the message names the field)",
    503: "Too many API connections or event subscribers",
}
Name = Annotated[str, Path(description="VM name (vm0.. or vdev serve --name)")]
SettingPath = Annotated[
    str, Path(description="setting path without the leading slash, e.g. Mem/CtlMaxPercent")
]
TargetBody = Annotated[models.TargetRequest, Body()]
SimulatedBody = Annotated[models.SimulatedRequest, Body()]
SettingBody = Annotated[models.SettingRequest, Body()]


# --------------------------------------------------------------------------------------------
# The app


class JsonBodies:
    """ASGI middleware: every request body is JSON, whatever Content-Type the client sent
    (``curl -d`` says form-urlencoded); the API speaks nothing else."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("PUT", "POST", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class Audit:
    """Writes who changed what: a ``vdev.audit`` log line and an ``audit`` event."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def __call__(self, request: Request, action: str, **details: Any) -> None:
        peer = request.scope.get(PEER_SCOPE_KEY)
        who: dict[str, Any] = (
            peer.describe() if peer is not None else {"uid": None, "pid": None, "cmdline": None}
        )
        subject = details.get("name", details.get("path"))
        logs.event(
            audit_log,
            logging.INFO,
            "audit",
            "%s%s by uid=%s pid=%s cmdline=%s %s",
            action,
            "" if subject is None else f" {subject}",
            who["uid"],
            who["pid"],
            json.dumps(who["cmdline"]),
            json.dumps(details, separators=(",", ":"), default=str),
            vm=details.get("name"),
            action=action,
            **{k: v for k, v in details.items() if k != "name"},
            **who,
        )
        self.control.publish({"type": "audit", "action": action, **details, "peer": who})


def create_app(control: ControlPlane, *, max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS) -> FastAPI:
    app = FastAPI(
        title=TITLE,
        version="1",
        description=DESCRIPTION,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        responses=_err(403, 422, 503),
        dependencies=[Depends(known_query)],
    )
    app.add_middleware(JsonBodies)
    audit = Audit(control)
    subscribers = 0

    @app.get("/vms", summary="List VMs", response_model=models.VmList)
    async def list_vms() -> models.VmList:
        return models.VmList(vms=[vm_info(control, n) for n in control.registry.names()])

    @app.get("/vms/{name}", summary="One VM", response_model=models.Vm, responses=_err(404))
    async def get_vm(name: Name) -> models.Vm:
        return vm_info(control, _vm_name(control, name))

    @app.put(
        "/vms/{name}/target",
        summary="Set a manual balloon target, or return the VM to the policy",
        response_model=models.Vm,
        responses=_err(400, 404, 413, 422),
    )
    async def put_target(request: Request, name: Name, body: TargetBody) -> models.Vm:
        name = _vm_name(control, name)
        try:
            pages = models.target_pages(body)
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        if pages is None:
            control.clear_manual_target(name)
            control.step()  # so the answer already shows the policy's target and reason
            audit(request, "target", name=name, policy=True)
        else:
            try:
                applied, reason = control.set_manual_target(name, pages)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            audit(
                request,
                "target",
                name=name,
                target_pages=pages,
                applied_pages=applied,
                reason=reason,
            )
        return vm_info(control, name)

    @app.post(
        "/vms/{name}/reset",
        summary="Demand a balloon reset (vmw; a virtio-balloon device has none: 409)",
        response_model=models.Vm,
        responses=_err(404, 409),
    )
    async def reset_vm(request: Request, name: Name) -> models.Vm:
        name = _vm_name(control, name)
        try:
            control.reset(name)
        except ConfigError as e:  # the personality has no operator reset (virtio-balloon)
            raise ApiError(409, str(e)) from None
        audit(request, "reset", name=name)
        return vm_info(control, name)

    @app.post(
        "/vms/{name}/stats",
        summary="Ask the guest for fresh statistics (guest_stats; virtio-balloon). "
        "They arrive asynchronously; vdev serve --stats-interval also refreshes them",
        status_code=202,
        response_model=models.Vm,
        responses={202: {"description": "Requested (the current state)"}, **_err(404, 409)},
    )
    async def request_vm_stats(request: Request, name: Name) -> models.Vm:
        name = _vm_name(control, name)
        request_stats = getattr(control.registry, "request_stats", None)
        if request_stats is None or not request_stats(name):
            raise ApiError(
                409,
                f"{name}: no guest statistics to refresh (not connected, or its personality "
                "keeps none)",
            )
        audit(request, "stats", name=name)
        # the guest answers asynchronously: guest_stats change once it refilled the buffer
        return vm_info(control, name)

    @app.get(
        "/vms/{name}/history",
        summary="In-memory history of target, size, max and host free memory",
        response_model=models.History,
        responses=_err(404, 422),
    )
    async def get_history(
        name: Name,
        last: Annotated[int | None, Query(ge=0, le=1 << 31, description="newest points")] = None,
    ) -> models.History:
        return history_info(control, _vm_name(control, name), last)

    @app.get("/host", summary="Host memory state", response_model=models.Host)
    async def get_host() -> models.Host:
        return models.Host(**control.host_info())

    @app.put(
        "/host/simulated",
        summary="Set the simulated host's free memory (simulated mode only)",
        response_model=models.Host,
        responses=_err(400, 409, 413, 422),
    )
    async def put_simulated(request: Request, body: SimulatedBody) -> models.Host:
        try:
            free = models.free_bytes(body)
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        try:
            control.set_simulated_free(free)
        except NotSimulated as e:
            raise ApiError(409, str(e)) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        audit(request, "simulated-host", free_bytes=free)
        control.step()  # so the answer already shows the new state
        return models.Host(**control.host_info())

    @app.get("/pools", summary="Resource pools", response_model=models.PoolList)
    async def get_pools() -> models.PoolList:
        return models.PoolList(pools=pools_info(control))

    @app.get("/settings", summary="Advanced settings", response_model=models.Settings)
    async def get_settings() -> models.Settings:
        return models.Settings(settings=settings_info(control))

    @app.get(
        "/settings/{path:path}",
        summary="One advanced setting",
        response_model=models.Setting,
        responses=_err(404),
    )
    async def get_setting(path: SettingPath) -> models.Setting:
        path = _setting_path(control, path)
        return models.Setting(path=path, value=control.engine.settings.get(path))

    @app.put(
        "/settings/{path:path}",
        summary="Change one advanced setting",
        response_model=models.Setting,
        responses=_err(400, 404, 413, 422),
    )
    async def put_setting(
        request: Request,
        path: SettingPath,
        body: SettingBody,
    ) -> models.Setting:
        path = _setting_path(control, path)
        try:
            control.set_setting(path, body.value)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        audit(request, "setting", path=path, value=body.value)
        return models.Setting(path=path, value=control.engine.settings.get(path))

    @app.get(
        "/events",
        summary="Event stream (no polling): NDJSON, or SSE with Accept: text/event-stream",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "one JSON Event per line (or per SSE data field); the first is "
                "{type: hello}",
                "content": {
                    "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/Event"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **_err(404),
        },
    )
    async def events(
        request: Request,
        vm: Annotated[str | None, Query(max_length=256, description="only this VM")] = None,
    ) -> Response:
        nonlocal subscribers
        if vm is not None and vm not in control.registry.names():
            raise ApiError(404, f"no VM named {vm!r}")
        if subscribers >= max_subscribers:
            raise ApiError(
                503,
                f"too many event subscribers ({max_subscribers}, --api-max-subscribers); "
                "try again later",
            )
        sse = "text/event-stream" in request.headers.get("accept", "")
        receive = control.subscribe()
        subscribers += 1

        def encode(event: dict[str, Any]) -> bytes:
            data = json.dumps(event, separators=(",", ":"))
            if sse:
                return f"event: {event.get('type', 'message')}\ndata: {data}\n\n".encode()
            return data.encode() + b"\n"

        async def stream() -> AsyncIterator[bytes]:
            nonlocal subscribers
            try:
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
            finally:
                subscribers -= 1

        return StreamingResponse(
            stream(),
            media_type="text/event-stream" if sse else "application/x-ndjson",
            headers={"cache-control": "no-cache"},
        )

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        return Response(render_metrics(control), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/openapi.json",
        summary="This document",
        response_model=dict[str, Any],
    )
    async def openapi() -> dict[str, Any]:
        return openapi_document(app)

    # ---------------------------------------------------------------------- errors

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                why = (e.get("ctx") or {}).get("error", "")
                return _error(400, f"request body is not valid JSON: {why}")
        if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
            return _error(400, "request body is empty; expected a JSON object")
        return _error(422, describe_validation_error(errors))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        elif exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "There was an error parsing the body": say why (too deep, too many
            # digits...)
            message = f"request body is not valid JSON: {_reason(exc.__cause__)}"
        return _error(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("API: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.exception_handler(KeyError)
    async def key_error(request: Request, exc: KeyError) -> Response:
        # A guest vanished between the name check and the read.
        return _error(404, f"no such VM: {exc}")

    return app


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).splitlines()[0][:200] or type(exc).__name__


@functools.cache
def _document() -> dict[str, Any]:
    return _generate(create_app(_SchemaOnly()))  # type: ignore[arg-type]


class _SchemaOnly:
    """Stands in for the control plane when only the document is wanted (never called)."""


def _generate(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(
        title=TITLE,
        version="1",
        openapi_version="3.1.0",
        description=DESCRIPTION,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    event = models.Event.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(event.pop("$defs", {}))
    schemas["Event"] = event
    return doc


def openapi_document(app: FastAPI | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document, generated from the routes and :mod:`vdev.api.models`."""
    return _document() if app is None else _generate(app)


def __getattr__(name: str) -> Any:
    if name == "OPENAPI":  # the document as a module constant, built on first use
        return _document()
    raise AttributeError(name)
