"""One client connection of trioproxy's server: requests read with httptools, one exchange at
a time (``web/http1.py`` for HTTP, ``web/websocket.py`` for an upgrade).

Theory of operation: httptools (llhttp) calls back as it parses; the callbacks turn a
request into events on a queue: its :class:`Head`, its body pieces (bytes), :data:`END`,
or :class:`Failed` when the bytes stop making sense. The connection task waits for a head,
runs the exchange, and goes on with the next head if the connection can carry one. llhttp
parses pipelined requests as soon as their bytes arrive; their events wait on the queue.
After an upgrade request llhttp stops: the bytes that follow are the new protocol's
(``upgraded``).

Resource handling: the socket is the connection task's (``Server.handle`` closes it). A
keep-alive connection waits at most ``keep_alive_timeout`` for its next request, and is
closed at once when the server drains while it waits.

Error handling: a request that cannot be parsed is answered 400 (431 past
``max_head_bytes`` of head, 505 for HTTP/2) with a JSON error envelope, and the connection is
closed; ``linger()`` then keeps the answer from being destroyed by a reset.
"""

from __future__ import annotations

import collections
import math
from typing import Any
from urllib.parse import unquote

import attrs
import httptools
import trio

from trioproxy.protocol import http1 as wire
from trioproxy.streams import PeerGone, SocketWriter, receive_some
from trioproxy.web.state import ServerState

ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
Scope = dict[str, Any]


@attrs.frozen
class Head:
    """A request line and headers, as parsed."""

    method: bytes
    target: bytes
    http_version: bytes  # b"1.1"
    headers: list[tuple[bytes, bytes]]  # names in lower case
    keep_alive: bool  # llhttp's reading of the version and Connection header

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def wants_close(self) -> bool:
        return not self.keep_alive

    @property
    def is_websocket(self) -> bool:
        upgrade = self.header(b"upgrade")
        return (
            self.method == b"GET"
            and upgrade is not None
            and upgrade.strip().lower() == b"websocket"
        )


@attrs.frozen
class Failed:
    """The request bytes stopped making sense: the answer the client gets."""

    status: int
    message: str
    code: str


END = object()  # the request's body is complete


class _Requests:
    """httptools callbacks: each request as events on a queue (see the module docstring)."""

    __slots__ = ("_headers", "_url", "events", "head_bytes", "in_head", "parser")

    def __init__(self) -> None:
        self.events: collections.deque[Any] = collections.deque()
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self.in_head = False
        self.head_bytes = 0  # of the head being received

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.in_head = False
        self.head_bytes = 0
        self.events.append(
            Head(
                parser.get_method(),
                self._url,
                parser.get_http_version().encode("ascii"),
                self._headers,
                parser.should_keep_alive(),
            )
        )

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(END)


def address(sock: trio.socket.SocketType, peer: bool) -> tuple[str, int] | None:
    try:
        found = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if isinstance(found, tuple) and len(found) >= 2:
        return str(found[0]), int(found[1])
    return None


@attrs.define(eq=False)
class Connection:
    """One client connection (see the module docstring)."""

    server: ServerState
    stream: trio.SocketStream
    requests: _Requests = attrs.field(factory=_Requests)
    writer: SocketWriter = attrs.field(init=False)
    client: tuple[str, int] | None = attrs.field(init=False)
    local: tuple[str, int] | None = attrs.field(init=False)
    eof: bool = False
    upgraded: bytearray | None = None  # after an upgrade request: the new protocol's bytes
    failed: bool = False  # the parser gave up: nothing more is parsed
    read_ahead: int = 0  # bytes read while the current exchange waits for the client to go

    def __attrs_post_init__(self) -> None:
        self.writer = SocketWriter(self.stream)
        self.client = address(self.stream.socket, peer=True)
        self.local = address(self.stream.socket, peer=False)

    # -- reading ----------------------------------------------------------------------------
    async def read_more(self) -> int:
        """Read from the socket and parse; the number of bytes read (0 at the end). Raises
        ``PeerGone`` when the connection broke."""
        try:
            data = await receive_some(self.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.eof = True
            raise PeerGone() from exc
        if not data:
            self.eof = True
            return 0
        self.feed(data)
        return len(data)

    def feed(self, data: bytes) -> None:
        if self.upgraded is not None:
            self.upgraded += data
            return
        if self.failed:
            return
        requests = self.requests
        try:
            requests.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = bytearray(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self.failed = True
            if "PRI" in str(exc):  # the HTTP/2 connection preface
                requests.events.append(
                    Failed(
                        505,
                        "This server speaks HTTP/1.1 (and WebSocket over it).",
                        "http_version_not_supported",
                    )
                )
            else:
                requests.events.append(Failed(400, f"Malformed HTTP request: {exc}", "bad_request"))
            return
        if requests.in_head:
            requests.head_bytes += len(data)
            if requests.head_bytes > self.server.config.max_head_bytes:
                self.failed = True
                requests.events.append(
                    Failed(431, "Request headers too large.", "request_header_fields_too_large")
                )

    async def wait_until_gone(self) -> None:
        """Return when the client closes the connection (or it breaks). What it sends
        meanwhile is parsed and kept (pipelined requests, early WebSocket frames), up to
        ``max_pipelined_bytes`` per exchange however often this is called in it (a waiter
        may be interrupted and come back); past that it is not read until the exchange is
        over."""
        limit = self.server.config.max_pipelined_bytes
        while not self.eof and self.read_ahead < limit:
            try:
                self.read_ahead += await self.read_more()
            except PeerGone:
                return
        if not self.eof:
            await trio.sleep(math.inf)

    async def write(self, data: bytes) -> bool:
        """Write ``data``; False when the connection can no longer carry it."""
        try:
            await self.writer.write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def write_error(self, status: int, message: str, code: str) -> bool:
        """An answer of the server's own (an envelope; the connection closes after it)."""
        body = wire.error_body(status, message, code)
        head = wire.response_head(
            status,
            wire.reason(status),
            [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        )
        return await self.write(head + body)

    async def linger(self) -> None:
        """Close our side first, then read (and drop) what the client still sends until it
        closes too, briefly: closing a socket with unread bytes makes the kernel send a
        reset, which can destroy the answer we just wrote (a 400, a 431, a 429 to a request
        whose body was never read) before the client reads it."""
        if self.eof or self.writer.broken:
            return
        with trio.move_on_after(self.server.config.linger):
            try:
                await self.stream.send_eof()
                dropped = 0
                while dropped < self.server.config.max_pipelined_bytes:
                    data = await receive_some(self.stream)
                    if not data:
                        return
                    dropped += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    # -- the exchanges ----------------------------------------------------------------------
    async def next_head(self) -> Head | Failed | None:
        """The next request's head; ``None`` when the connection ends (closed by the client,
        idle past the keep-alive timeout, or the server draining while it was idle)."""
        events = self.requests.events
        idle = trio.CancelScope(
            deadline=trio.current_time() + self.server.config.keep_alive_timeout
        )
        try:
            with idle:
                while True:
                    while events:
                        event = events.popleft()
                        if isinstance(event, Head | Failed):
                            self.read_ahead = 0
                            return event
                        # (a body event or END left by the exchange before: never, as it
                        # reads its body to the end or closes the connection)
                    if self.eof or self.upgraded is not None:
                        return None
                    waiting = not self.requests.in_head  # nothing of a next request yet
                    if waiting:
                        if self.server.draining:
                            return None
                        self.server.idle_waits.add(idle)
                    await self.read_more()
                    self.server.idle_waits.discard(idle)
        finally:
            self.server.idle_waits.discard(idle)
        return None  # idle past the keep-alive timeout, or drained

    def scope(self, head: Head, kind: str) -> Scope:
        target = head.target
        if not target.startswith(b"/"):  # absolute form (or "*")
            after_scheme = target.partition(b"://")[2]
            target = b"/" + after_scheme.partition(b"/")[2] if after_scheme else b"/"
        raw_path, _, query = target.partition(b"?")
        return {
            "type": kind,
            "asgi": ASGI_VERSION,
            "http_version": head.http_version.decode("ascii"),
            "method": head.method.decode("ascii"),
            "scheme": "ws" if kind == "websocket" else "http",
            "path": unquote(raw_path.decode("ascii", "replace")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": head.headers,
            "client": self.client,
            "server": self.local,
            "state": self.server.state.copy(),
            "extensions": {"websocket.http.response": {}} if kind == "websocket" else {},
        }
