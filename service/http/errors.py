"""The one place that turns errors into JSON responses, in the shape the route's protocol wants.

A route raises a ``ServiceError`` subclass (service/core/errors.py); ``install_error_handlers``
maps it (and FastAPI's own request-validation errors, and Starlette's HTTP errors such as
404/405) to a JSON body with the right status code and headers. The body's shape depends on the
path: ``{"error": {"code": ..., "message": ...}}`` for the service's own API, and the Open Inference
Protocol's ``{"error": "<message>"}`` under /v2 (what Triton's clients parse, exactly that shape).
The request's id is in the ``X-Request-ID`` header of both, and inside the error object on /v1.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.core.errors import ClientClosedRequest, DeadlineExceeded, NotReady, ServiceError
from service.http.request_id import request_id_of

log = logging.getLogger("vitserve.errors")

V2_PREFIX = "/v2"


def uses_v2_errors(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(
    status_code: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    path: str = "",
    request_id: str | None = None,
) -> JSONResponse:
    """The error body for a request to ``path``, in that protocol's shape, naming ``request_id``."""
    body: dict[str, object]
    if uses_v2_errors(path):
        body = {"error": message}
    else:
        body = {"error": {"code": code, "message": message, **({"request_id": request_id} if request_id else {})}}
    if request_id:
        headers = {**(headers or {}), "X-Request-ID": request_id}
    return JSONResponse(body, status_code=status_code, headers=headers)


def service_error_response(exc: ServiceError, path: str, request_id: str | None = None) -> JSONResponse:
    return error_response(exc.status_code, exc.code, exc.message, exc.headers, path=path, request_id=request_id)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    """Register the JSON error shapes for every error the app can raise."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500 and not isinstance(exc, (NotReady, DeadlineExceeded, ClientClosedRequest)):
            log.error("%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code, exc.code, exc.message)
        return service_error_response(exc, request.url.path, request_id_of(request.scope))

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Not an error of ours: one line, no traceback, and 499 in the request metrics (nobody reads the body).
        log.info(
            "%s %s: the client disconnected before its request body was complete", request.method, request.url.path
        )
        gone = ClientClosedRequest("client disconnected before its request body was complete")
        return service_error_response(gone, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The protocol calls a malformed request 400; the service's own API keeps FastAPI's 422.
        if uses_v2_errors(request.url.path):
            message = "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid request"
            return error_response(
                400, "validation_error", message, path=request.url.path, request_id=request_id_of(request.scope)
            )
        return error_response(
            422,
            "validation_error",
            _describe_validation(exc),
            path=request.url.path,
            request_id=request_id_of(request.scope),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(
            exc.status_code,
            code,
            str(exc.detail),
            exc.headers,
            path=request.url.path,
            request_id=request_id_of(request.scope),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            "internal_error",
            f"internal error: {type(exc).__name__}",
            path=request.url.path,
            request_id=request_id_of(request.scope),
        )
