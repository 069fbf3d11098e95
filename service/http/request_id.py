"""The request id: the client's ``X-Request-ID`` when it is a sane token, else a new one.

It is echoed in every response (header and error bodies) and logged with the request, so a client
that reports a failure hands over the id that finds its log line. A client-chosen id is kept only
if it is short and plain (letters, digits, ``._:+/=-``): log lines and headers never carry
arbitrary bytes a client sent.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, MutableMapping
from typing import Any

HEADER = "x-request-id"
_SANE = re.compile(r"^[A-Za-z0-9._:+/=-]{1,128}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


def choose_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The incoming X-Request-ID if it is a sane token, else a fresh one (ASGI raw headers)."""
    for key, value in headers:
        if key.lower() == HEADER.encode():
            text = value.decode("latin-1").strip()
            return text if _SANE.match(text) else new_request_id()
    return new_request_id()


def bind_request_id(scope: MutableMapping[str, Any]) -> str:
    """Choose the request's id and keep it in the ASGI scope's per-request state."""
    request_id = choose_request_id(scope.get("headers", ()))
    scope.setdefault("state", {})["request_id"] = request_id
    return request_id


def request_id_of(scope: MutableMapping[str, Any]) -> str | None:
    state = scope.get("state")
    return state.get("request_id") if isinstance(state, dict) else None
