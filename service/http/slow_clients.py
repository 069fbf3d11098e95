"""Slow bodies: a request body must arrive in bounded time, so dribbling bytes (slowloris) cannot
hold connections or memory (the request head has its own timeout: service/http/connection.py).

``BodyDeadline`` (pure ASGI) gives a body ``body_timeout_s``, extended by one second per
  ``min_body_rate_bytes_per_s`` bytes received (Apache mod_reqtimeout's MinRate rule): a fast
  upload of gigabytes is never cut, a body sent at a few bytes per second is, with a 408.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import RequestTimeout


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
