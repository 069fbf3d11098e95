"""Slow clients: a request's headers and body must arrive in bounded time, so dribbling bytes
(slowloris) cannot hold connections, file descriptors or memory.

- Headers: uvicorn times out idle keep-alive connections but not a request whose headers trickle
  in (nor a connection that sends nothing at all). ``header_deadline_protocol`` wraps uvicorn's
  HTTP protocol class: from the moment a connection opens, or a keep-alive connection receives
  the first byte of its next request, the request line and headers must be complete within
  ``header_timeout_s``; otherwise the server answers 408 and closes the connection.
- Body: ``BodyDeadline`` (pure ASGI) gives a body ``body_timeout_s``, extended by one second per
  ``min_body_rate_bytes_per_s`` bytes received (Apache mod_reqtimeout's MinRate rule): a fast
  upload of gigabytes is never cut, a body sent at a few bytes per second is, with a 408.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import RequestTimeout


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": {"code": RequestTimeout.code, "message": message}}).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(body) + body
    )


def header_deadline_protocol(base: type[Any], header_timeout_s: float) -> type[Any]:
    """A subclass of uvicorn's HTTP protocol ``base`` (httptools or h11) enforcing the header timeout.

    Works on what both uvicorn protocols share: ``data_received`` feeds the parser and a request
    whose headers are complete becomes a new ``self.cycle``.
    """

    class HeaderDeadlineProtocol(base):  # type: ignore[misc,valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm_header_timer()
            elif self._header_timer is None and (cycle is None or cycle.response_complete):
                self._arm_header_timer()  # the first bytes of the next request on a keep-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow, self.cycle)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self, cycle_when_armed: object) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.cycle is not cycle_when_armed:
                return
            if cycle_when_armed is not None and not self.cycle.response_complete:
                return  # a response is still being produced: not a slow header
            self.transport.write(
                _timeout_response(f"request headers did not arrive within {header_timeout_s:g} s (header_timeout_s)")
            )
            self.transport.close()

    HeaderDeadlineProtocol.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadlineProtocol


def uvicorn_protocol(header_timeout_s: float) -> type[Any]:
    """uvicorn's own choice of HTTP protocol (httptools when installed, else h11), with the header timeout."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base: type[Any] = HttpToolsProtocol
    except ImportError:  # uvicorn without its [standard] extras
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    return header_deadline_protocol(base, header_timeout_s)


class BodyDeadline:
    """ASGI middleware: a request body must keep arriving at ``min_rate`` bytes/s after a grace of ``timeout_s``.

    Args:
        app: the ASGI app it wraps.
        timeout_s: seconds a body may take before its size counts (body_timeout_s).
        min_rate: each of this many bytes received buys one more second (min_body_rate_bytes_per_s).
    """

    def __init__(self, app: ASGIApp, *, timeout_s: float, min_rate: int) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        received = 0
        done = False

        async def timed_receive() -> Message:
            nonlocal received, done
            if done:
                return await receive()  # the body is complete: what follows is http.disconnect
            deadline = started + self.timeout_s + received / self.min_rate
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"request body too slow: {received} bytes in {time.monotonic() - started:.1f} s "
                    f"(body_timeout_s={self.timeout_s:g}, min_body_rate_bytes_per_s={self.min_rate})",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, timed_receive, send)
