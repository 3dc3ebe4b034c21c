"""Raw ASGI plumbing for the proxy routes: reading bodies and answering (a request's client
watcher is ``sessions/http_turn.watch_client``).

The proxy routes are plain ASGI handlers, not Quart views: a handler then owns a nursery for
the request's whole life (body, upstream stream, disconnect watcher), and the hot path does
not pay for the framework on every request. Everything else goes to the Quart app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio

from trioproxy.protocol.errors import error_envelope
from trioproxy.sessions.context import ProxyError
from trioproxy.sessions.upstream_turn import json_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected."""


def scope_headers(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]


def client_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; ``ProxyError(413)`` past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProxyError(
                413,
                error_envelope(
                    f"Request body larger than {limit} bytes.",
                    "invalid_request_error",
                    "payload_too_large",
                ),
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


@attrs.define(eq=False)
class Downstream:
    """The response side of one HTTP request."""

    send: Send
    started: bool = False
    finished: bool = False
    status: int | None = None
    first_byte_at: float | None = None

    async def start(
        self,
        status: int,
        headers: list[tuple[str, str]],
        raw: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """The response head: ``headers`` as text, and ``raw`` ones passed on as they came."""
        if self.started:
            return
        self.started = True
        self.status = status
        encoded = _encode(headers)
        if raw:
            encoded += raw
        await self.send({"type": "http.response.start", "status": status, "headers": encoded})

    async def body(self, data: bytes, *, more: bool = True) -> None:
        if data and self.first_byte_at is None:
            self.first_byte_at = trio.current_time()
        await self.send({"type": "http.response.body", "body": data, "more_body": more})
        if not more:
            self.finished = True

    async def finish(self) -> None:
        if not self.finished:
            await self.body(b"", more=False)

    async def json(
        self, status: int, value: Any, headers: list[tuple[str, str]] | None = None
    ) -> None:
        data = json_bytes(value)
        await self.start(
            status,
            [
                ("content-type", "application/json"),
                ("content-length", str(len(data))),
                *(headers or []),
            ],
        )
        await self.body(data, more=False)

    async def error(self, exc: ProxyError, request_id: str) -> None:
        await self.json(exc.status, exc.body, [*exc.headers, ("x-request-id", request_id)])
