"""ASGI types and the small readings of a scope that apps of this server need."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def scope_headers(scope: Scope) -> list[tuple[str, str]]:
    """The request headers as text, names in lower case."""
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]


def client_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None
