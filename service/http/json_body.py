"""JSON request bodies, bounded: counted before they are parsed, parsed off the event loop.

``json.loads`` builds every object it reads: 6.9 million ``{}`` (20 MiB) become 600 MiB of
dicts, and a route that checks its image count afterwards has already paid. So a body is first
counted with ``bytes.count`` (C speed, no allocation): objects (``{``), arrays (``[``) and values
(``,`` + 1) against bounds the route gives from what a valid request can hold. Brackets and
commas inside strings count too, so the bounds are generous upper limits, never exact counts.
Then it is parsed in a worker thread (the event loop keeps answering), with every failure a 4xx
naming the problem: nesting past Python's recursion limit (RecursionError), integers past its
4300-digit conversion limit, invalid UTF-8, bad syntax.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any

from service.core.errors import BadRequest, PayloadTooLarge


@dataclass(frozen=True)
class JsonBounds:
    """Most JSON objects, arrays and values one body may hold.

    Args:
        max_objects: ``{`` in the body.
        max_arrays: ``[`` in the body (each level of nesting is one).
        max_values: ``,`` + 1 in the body (values in arrays and members of objects).
    """

    max_objects: int
    max_arrays: int
    max_values: int


def check_json_size(body: bytes, bounds: JsonBounds, what: str) -> None:
    """PayloadTooLarge if ``body`` could hold more objects, arrays or values than ``bounds`` allow."""
    for char, limit, name in (
        (b"{", bounds.max_objects, "objects"),
        (b"[", bounds.max_arrays, "arrays"),
        (b",", bounds.max_values - 1, "values"),
    ):
        found = body.count(char)
        if found > limit:
            raise PayloadTooLarge(
                f"{what}: up to {found + (name == 'values')} JSON {name} ({char.decode()!r} counted), "
                f"more than a valid request holds ({limit + (name == 'values')}); not parsed"
            )


def parse_json(body: bytes, bounds: JsonBounds, what: str) -> Any:
    """``body`` parsed after ``check_json_size``; BadRequest naming the problem for anything malformed."""
    check_json_size(body, bounds, what)
    try:
        return json.loads(body)
    except RecursionError:
        raise BadRequest(f"{what}: JSON nested too deeply to parse") from None
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        if str(exc).startswith("Exceeds the limit"):  # Python's int conversion limit, not a JSONDecodeError
            raise BadRequest(f"{what}: an integer with more than {sys.get_int_max_str_digits()} digits") from None
        raise BadRequest(f"{what} is not valid JSON ({exc})") from None


async def parse_json_off_loop(body: bytes, bounds: JsonBounds, what: str) -> Any:
    """``parse_json`` in a worker thread: a large body never stalls the event loop."""
    return await asyncio.to_thread(parse_json, body, bounds, what)
