"""A small client for the management API over its unix socket (httpx's UDS transport).

Synchronous, because its users are the operator CLI commands; :meth:`ApiClient.events`
streams ``GET /events`` line by line. Errors come back as :class:`protocol.errors.ApiError`
(the same class the server raises) carrying the server's ``{"error": ...}`` message. Names
are escaped into the URL (``vm0/../vm1`` stays one path segment).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from protocol.errors import ApiError

__all__ = ["ApiClient", "ApiError"]


def _seg(name: str) -> str:
    """One URL path segment: ``/``, ``..`` and the like cannot leave it."""
    return quote(name, safe="")


def _setting(path: str) -> str:
    """A setting path (``Mem/CtlMaxPercent``): each part escaped, slashes kept."""
    return "/".join(_seg(p) for p in path.strip("/").split("/"))


class ApiClient:
    def __init__(self, socket_path: str, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=socket_path),
            base_url="http://vdev",
            timeout=timeout,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        try:
            response = self._client.request(
                method,
                path,
                json=body,
                params={k: v for k, v in params.items() if v is not None} or None,
            )
        except httpx.TransportError as e:
            raise ApiError(0, f"cannot reach the vdev API at {self.socket_path}: {e}") from e
        return self._decode(response)

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        content_type = response.headers.get("content-type", "")
        data: Any = (
            response.json() if content_type.startswith("application/json") else response.text
        )
        if response.is_error:
            message = data.get("error") if isinstance(data, dict) else None
            raise ApiError(response.status_code, str(message or data or response.reason_phrase))
        return data

    # -- endpoints ------------------------------------------------------------------------

    def vms(self) -> list[dict[str, Any]]:
        vms: list[dict[str, Any]] = self.request("GET", "/vms")["vms"]
        return vms

    def vm(self, name: str) -> dict[str, Any]:
        vm: dict[str, Any] = self.request("GET", f"/vms/{_seg(name)}")
        return vm

    def set_target(self, name: str, **body: Any) -> dict[str, Any]:
        """``set_target("vm0", target_mib=512)``, ``target_pages=``, ``target=``, ``policy=True``."""
        vm: dict[str, Any] = self.request("PUT", f"/vms/{_seg(name)}/target", body)
        return vm

    def reset(self, name: str) -> dict[str, Any]:
        vm: dict[str, Any] = self.request("POST", f"/vms/{_seg(name)}/reset")
        return vm

    def history(self, name: str, last: int | None = None) -> dict[str, Any]:
        h: dict[str, Any] = self.request("GET", f"/vms/{_seg(name)}/history", last=last)
        return h

    def host(self) -> dict[str, Any]:
        h: dict[str, Any] = self.request("GET", "/host")
        return h

    def set_simulated_free(self, **body: Any) -> dict[str, Any]:
        h: dict[str, Any] = self.request("PUT", "/host/simulated", body)
        return h

    def pools(self) -> list[dict[str, Any]]:
        pools: list[dict[str, Any]] = self.request("GET", "/pools")["pools"]
        return pools

    def settings(self) -> dict[str, int]:
        settings: dict[str, int] = self.request("GET", "/settings")["settings"]
        return settings

    def setting(self, path: str) -> int:
        value: int = self.request("GET", f"/settings/{_setting(path)}")["value"]
        return value

    def set_setting(self, path: str, value: int) -> int:
        result: int = self.request("PUT", f"/settings/{_setting(path)}", {"value": value})["value"]
        return result

    def metrics(self) -> str:
        text: str = self.request("GET", "/metrics")
        return text

    def openapi(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.request("GET", "/openapi.json")
        return doc

    def events(self, vm: str | None = None) -> Iterator[dict[str, Any]]:
        """Events as they happen (the first is ``{"type": "hello"}``); runs until closed."""
        params = {"vm": vm} if vm else None
        started = False
        try:
            with self._client.stream("GET", "/events", params=params, timeout=None) as response:
                if response.is_error:
                    response.read()
                    self._decode(response)
                started = True
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as e:
            if started:
                raise ApiError(0, f"the event stream ended (vdev serve stopped?): {e}") from e
            raise ApiError(0, f"cannot reach the vdev API at {self.socket_path}: {e}") from e
