"""The dashboard's way to its data: the management API, called in process.

A page handler asks the management app (the Quart app it is mounted on) for
``GET /api/accounts`` and the like exactly as the browser could: an ASGI request made from
the page request's own scope (its client address, scheme and headers, so the session cookie
and the same authorization apply), with the session's CSRF token added for a change. The
answer is what the API answers; the dashboard has no other way to the proxy's state.

Resource handling: a call runs the app in the calling task (the app's own nursery inside),
the request body whole up front; it returns when the app has answered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import attrs
import trio
from quart_trio import QuartTrio

from trioproxy.web.asgi import Scope

CSRF_HEADER = "x-csrf-token"
#: request headers a call does not pass on from the page's request
_DROPPED = frozenset(
    {b"content-type", b"content-length", b"transfer-encoding", b"accept", b"x-csrf-token"}
)


@attrs.frozen
class Answer:
    """What the API answered."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def error(self) -> str:
        """The error envelope's message (or the status)."""
        try:
            message = self.json()["error"]["message"]
        except (ValueError, TypeError, KeyError):
            return f"status {self.status}"
        return str(message)

    def error_code(self) -> str | None:
        try:
            return str(self.json()["error"]["code"])
        except (ValueError, TypeError, KeyError):
            return None


@attrs.define(eq=False)
class ManagementAPI:
    """Calls into ``app`` on behalf of the request whose scope is ``scope``."""

    app: QuartTrio
    scope: Scope
    csrf_token: str | None = None

    async def get(self, path: str, params: Mapping[str, object] | None = None) -> Answer:
        return await self.call("GET", path, params=params)

    async def get_json(self, path: str, params: Mapping[str, object] | None = None) -> Any:
        """The answer's JSON; an answer that is not 2xx raises :class:`APIError`."""
        answer = await self.get(path, params)
        if not answer.ok:
            raise APIError(answer)
        return answer.json()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, object] | None = None,
        body: object = None,
    ) -> Answer:
        """``method path?params`` with ``body`` as JSON (None: no body)."""
        data = b"" if body is None else json.dumps(body).encode()
        headers = [(k, v) for k, v in self.scope.get("headers", []) if k not in _DROPPED]
        headers.append((b"accept", b"application/json"))
        if body is not None:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(data)),
            ]
        if method not in ("GET", "HEAD") and self.csrf_token is not None:
            headers.append((CSRF_HEADER.encode(), self.csrf_token.encode()))
        query = urlencode({k: str(v) for k, v in (params or {}).items() if v not in (None, "")})
        scope = {
            **self.scope,
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": headers,
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        status = 500
        answer_headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, answer_headers
            if message["type"] == "http.response.start":
                status = int(message["status"])
                answer_headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        await self.app(scope, receive, send)  # type: ignore[arg-type]
        return Answer(status, tuple(answer_headers), b"".join(chunks))


class APIError(Exception):
    """The management API refused a dashboard's call."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.error())
        self.answer = answer
