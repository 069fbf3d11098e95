"""The per-request plumbing that runs before any route: request id, API key, draining gate, the body
limit, the in-flight count, request metrics by route template and status, and the access log.

The access log (logger ``vitserve.access``, INFO) has one line per request: method, route template
(never the raw path: bounded, and free of client-chosen text), status, response bytes, duration
and request id, also as ``extra`` fields for JSON logs (service/core/logs.py).

Pure ASGI (no BaseHTTPMiddleware overhead, and the body is never buffered here). The body limit
lives here alone: a declared Content-Length over it is refused from the header, and a streamed
body (chunked, or lying about its length) is counted as it arrives and stopped at the limit.
"""

from __future__ import annotations

import hmac
import logging
import re
import time

from fastapi import FastAPI
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import PayloadTooLarge, Unauthorized
from service.core.settings import Settings
from service.http import docs
from service.http.deps import state_of
from service.http.errors import error_response, service_error_response
from service.http.request_id import bind_request_id
from service.serving.state import ServiceState

auth_log = logging.getLogger("vitserve.auth")
access_log = logging.getLogger("vitserve.access")
# Reachable without the API key and while draining: probes and scrapers must always get through;
# so must the web page and its two files (the key is typed into the page), the v2 health probes,
# and the API docs with /openapi.json (the key is typed into Swagger's Authorize dialog).
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/",
        "/static/app.js",
        "/static/style.css",
        *docs.PAGE_PATHS,
        *docs.ASSET_PATHS,
    }
)
# Scoring jobs upload whole archives: their one route gets its own, larger body limit.
JOB_UPLOAD_PATH = "/v1/jobs"


def body_limit(settings: Settings, path: str) -> tuple[int, str]:
    """The largest body a request to ``path`` may send, and the setting that says so."""
    if path == JOB_UPLOAD_PATH:
        return settings.max_job_upload_bytes, "max_job_upload_bytes"
    return settings.max_upload_bytes, "max_upload_bytes"


class ServiceMiddleware:
    """API key, draining gate, body limit, in-flight count and request metrics.

    Args:
        app: the ASGI app it wraps.
        service: the FastAPI app whose state (``state_of(service)``) it guards.
    """

    def __init__(self, app: ASGIApp, *, service: FastAPI) -> None:
        self.app = app
        self.service = service
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = state_of(self.service)
        started = time.perf_counter()
        status = 500
        sent_bytes = 0
        path = scope["path"]
        guarded = path not in OPEN_PATHS
        request_id = bind_request_id(scope)
        id_header = (b"x-request-id", request_id.encode())

        async def send_tracking(message: Message) -> None:
            nonlocal status, sent_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append(id_header)
                if state.draining and not any(k.lower() == b"connection" for k, _ in headers):
                    # While draining, no connection is kept alive: a client's next request then opens
                    # a new connection (503, or refused once we stop listening) instead of being sent
                    # on one that the shutdown closes under it.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        if not guarded:
            try:
                await self.app(scope, receive, send_tracking)
            finally:
                self._observe(scope, state, status, started, sent_bytes)
            return
        state.in_flight_requests += 1
        state.metrics.in_flight_requests.inc()
        try:
            rejection = self._reject(scope, state)
            if rejection is not None:
                await rejection(scope, receive, send_tracking)
            else:
                limit, setting = body_limit(state.settings, path)
                await self.app(scope, _limited_receive(receive, limit, setting), send_tracking)
        finally:
            state.in_flight_requests -= 1
            state.metrics.in_flight_requests.dec()
            self._observe(scope, state, status, started, sent_bytes)

    def _observe(self, scope: Scope, state: ServiceState, status: int, started: float, sent_bytes: int) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or self._route_template(scope)
        seconds = time.perf_counter() - started
        state.metrics.observe_request(template, scope["method"], status, seconds)
        if access_log.isEnabledFor(logging.INFO):
            request_id = scope["state"]["request_id"]
            access_log.info(
                "%s %s %d %dB %.1fms %s",
                scope["method"],
                template,
                status,
                sent_bytes,
                seconds * 1000.0,
                request_id,
                extra={
                    "method": scope["method"],
                    "route": template,
                    "status": status,
                    "bytes": sent_bytes,
                    "duration_ms": round(seconds * 1000.0, 3),
                    "request_id": request_id,
                },
            )

    def _reject(self, scope: Scope, state: ServiceState) -> Response | None:
        """The answer to a request refused before it reaches a route, or None to let it through."""
        path = scope["path"]
        request_id = scope["state"]["request_id"]
        settings = state.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if settings.api_key:
            presented = headers.get("authorization")
            scheme, _, token = (presented or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                # Say why, never what was presented: a near-miss key in a log is a leaked key.
                reason = (
                    "no Authorization header"
                    if presented is None
                    else "not a Bearer token"
                    if scheme.lower() != "bearer"
                    else "wrong key"
                )
                client = scope.get("client") or ("?", 0)
                auth_log.warning("401 %s %s from %s: %s", scope["method"], path, client[0], reason)
                return service_error_response(Unauthorized(), path, request_id)
        if state.draining:
            return error_response(
                503,
                "not_ready",
                "server is shutting down; retry on another instance",
                {"Retry-After": "1", "Connection": "close"},
                path=path,
                request_id=request_id,
            )
        length = headers.get("content-length")
        if length is None:
            return None
        try:
            declared = int(length)
        except ValueError:
            return error_response(
                400, "bad_request", f"invalid Content-Length header {length!r}", path=path, request_id=request_id
            )
        limit, setting = body_limit(settings, path)
        if declared > limit:
            # Answer from the header alone: the body is never read.
            return error_response(
                413,
                "payload_too_large",
                f"request body of {declared} bytes is over the limit of {limit} bytes ({setting})",
                {"Connection": "close"},
                path=path,
                request_id=request_id,
            )
        return None

    def _route_template(self, scope: Scope) -> str:
        # Early rejections never reached the router; label them by the documented route they were
        # meant for (a bounded label set: never the raw path, which a client could vary at will).
        if self._templates is None:
            # The documented routes, then the app's own top-level ones: /docs and /openapi.json are
            # not in the schema but get their own label too.
            paths = list(self.service.openapi().get("paths", {}))
            paths += [route.path for route in self.service.routes if isinstance(getattr(route, "path", None), str)]
            self._templates = [(compile_path(path)[0], path) for path in paths]
        for regex, template in self._templates:
            if regex.match(scope["path"]):
                return template
        return "unmatched"


def _limited_receive(receive: Receive, limit: int, setting: str) -> Receive:
    """Count body bytes as they stream in (chunked bodies have no Content-Length) and stop at the limit."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes ({setting}); stopped reading")
        return message

    return wrapped
