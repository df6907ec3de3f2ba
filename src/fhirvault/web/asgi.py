"""Small ASGI helpers shared by the web modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.fhir.xml import to_xml

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class BodyTooLarge(Exception):
    pass


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes before reading them."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    raise BodyTooLarge
            except ValueError:
                pass
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def header_map(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


async def send_response(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None,
                        head_only: bool = False) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    raw.extend(SECURITY_HEADERS)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head_only else body})


async def send_outcome(send: Send, exc: OperationOutcomeError, head_only: bool = False, *,
                       xml: bool = False) -> None:
    """The error as an OperationOutcome, in FHIR XML when the client asked for XML."""
    if xml:
        body, media = to_xml(exc.outcome()), "application/fhir+xml"
    else:
        body, media = orjson.dumps(exc.outcome()), "application/fhir+json"
    headers = {"Content-Type": f"{media}; charset=utf-8", **exc.headers}
    await send_response(send, exc.status, body, headers, head_only)
