"""Every error the service answers with: one ``ServiceError`` tree, pure Python.

Each class carries its HTTP status and a short snake_case code; service/http/errors.py turns them
into JSON (and the gRPC front end into status codes). Undecodable or unusable images are 422 (the
request was well-formed, its content was not); malformed requests (bad base64, broken multipart,
bad parameters) are 400.
"""

from __future__ import annotations

import errno


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

    def to_dict(self) -> dict[str, str]:
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


class RequestTimeout(ServiceError):
    """The client sent its request too slowly (headers or body past their timeout); the connection closes."""

    status_code = 408
    code = "request_timeout"


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


class StorageFull(_RetryLater):
    """The data directory's disk is full (or over quota): nothing was lost, retry once space is freed."""

    status_code = 507
    code = "storage_full"


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL (not imported here: this module stays free of I/O libraries)


def is_storage_full(exc: BaseException) -> bool:
    """True for a write that failed for want of space: ENOSPC/EDQUOT, or SQLite's SQLITE_FULL."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL


class InferenceFailed(ServiceError):
    """The engine raised while running the batch this request was in."""

    status_code = 500
    code = "inference_failed"
