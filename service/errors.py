"""Every error the service answers with, and the one place that turns them into JSON.

A route raises a ``ServiceError`` subclass; ``install_error_handlers`` maps it (and FastAPI's
own request-validation errors, and Starlette's HTTP errors such as 404/405) to
``{"error": {"code": ..., "message": ...}}`` with the right status code and headers.
Undecodable or unusable images are 422 (the request was well-formed, its content was not);
malformed requests (bad base64, broken multipart, bad parameters) are 400.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vitserve.errors")


class ServiceError(Exception):
    """Base class: an HTTP status, a short snake_case code and a human-readable message.

    Args:
        message: what went wrong, naming the offending input.
        headers: extra response headers (e.g. Retry-After).
    """

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid API key; send 'Authorization: Bearer <key>'") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidImage(ServiceError):
    """The bytes are not an image we can classify (not an image, truncated, too many pixels...)."""

    status_code = 422
    code = "invalid_image"


class _RetryLater(ServiceError):
    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        # Retry-After takes whole seconds; never advertise 0 (clients would hammer us).
        super().__init__(message, headers={"Retry-After": str(max(1, int(round(retry_after_s))))})
        self.retry_after_s = retry_after_s


class Overloaded(_RetryLater):
    status_code = 429
    code = "overloaded"


class NotReady(_RetryLater):
    status_code = 503
    code = "not_ready"


class DeadlineExceeded(ServiceError):
    status_code = 504
    code = "deadline_exceeded"


class ClientClosedRequest(ServiceError):
    """The client disconnected before its answer was ready; its work was dropped (nginx's 499)."""

    status_code = 499
    code = "client_closed_request"


class InferenceFailed(ServiceError):
    """The engine raised while running the batch this request was in."""

    status_code = 500
    code = "inference_failed"


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    """Register the single JSON error shape for every error the app can raise."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500 and not isinstance(exc, (NotReady, DeadlineExceeded, ClientClosedRequest)):
            log.error("%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code, exc.code, exc.message)
        return error_response(exc.status_code, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")
