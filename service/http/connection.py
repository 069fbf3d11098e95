"""Per-connection limits uvicorn's httptools protocol lacks: head size, head deadline, open connections.

Without them a client can send an unterminated 128 MiB header (the parser buffers all of it, at
seconds of event-loop CPU), open a connection and send nothing or trickle header lines for ever,
or open a thousand such connections until the process runs out of file descriptors and a real
client is refused. ``GuardedHttpProtocol`` adds, per connection:

- a size limit on the request line and headers, counted on the raw bytes as they arrive (so an
  unterminated header is stopped too): 431 and close;
- a deadline for the request head, before the first request and between requests (uvicorn's
  keep-alive timeout only covers silence, not a trickle): 408 and close (silently, if nothing
  was sent at all);
- a cap on open connections: the connection over it is answered 503 at once and closed.

Refusals are our JSON error shape (``{"error": {"code", "message"}}``), with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("vitserve.connections")


@dataclass(frozen=True)
class ConnectionLimits:
    """Args:
    max_connections: open connections; the next one is answered 503 and closed.
    max_head_bytes: request line and headers of one request.
    head_timeout_s: time to send a complete request head, from the connection or the previous response.
    """

    max_connections: int
    max_head_bytes: int
    head_timeout_s: float


def _response(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with ``ConnectionLimits`` (set by ``guarded_protocol``)."""

    limits: ConnectionLimits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._awaiting_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            log.warning("refused a connection: %d open (max_connections)", len(self.connections) - 1)
            self._refuse(
                503,
                "Service Unavailable",
                "overloaded",
                f"too many open connections (max_connections={self.limits.max_connections}); retry later",
                "retry-after: 1\r\n",
            )
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._awaiting_head:
            super().data_received(data)
            return
        room = self.limits.max_head_bytes - self._head_bytes
        head, rest = data[:room], data[room:]
        self._head_bytes += len(head)
        if head:
            super().data_received(head)
        if not rest or self.transport.is_closing():
            return
        if self._awaiting_head:  # the limit was reached and the head is still not complete
            self._refuse(
                431,
                "Request Header Fields Too Large",
                "request_header_fields_too_large",
                f"request line and headers are over {self.limits.max_head_bytes} bytes (max_request_head_bytes)",
            )
            return
        super().data_received(rest)  # the head ended inside the allowance: the rest is body (or the next request)

    # Parser callbacks and the response cycle: where a head starts and ends.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head = True

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # kept alive, nothing pipelined: the next head is awaited
            self._awaiting_head = True
            self._head_bytes = 0
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            return
        if not self._head_bytes:  # nothing sent: just close (between requests, this is an idle keep-alive)
            self.transport.close()
            return
        self._refuse(
            408,
            "Request Timeout",
            "request_timeout",
            f"no complete request line and headers within {self.limits.head_timeout_s:g} s (request_head_timeout_s)",
        )

    def _refuse(self, status: int, reason: str, code: str, message: str, extra: str = "") -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(_response(status, reason, code, message, extra))
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpProtocol]:
    """A ``GuardedHttpProtocol`` class carrying ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits})
