"""One client connection of trioproxy's server: requests read with httptools, one exchange at
a time (``web/http1.py`` for HTTP, ``web/websocket.py`` for an upgrade).

Theory of operation: bytes read from the socket go to ``backlog`` and are parsed from there.
httptools (llhttp) calls back as it parses; the callbacks turn a request into events on a
queue: its :class:`Head`, its body pieces (bytes), :data:`END`, or :class:`Failed` when the
bytes stop making sense or pass a limit. The connection task waits for a head, runs the
exchange, and goes on with the next head if the connection can carry one. After an upgrade
request llhttp stops: the bytes that follow are the new protocol's (``upgraded``).

What a client sends ahead is bounded by what it costs, not by its length on the wire: a
pipelined request of 40 bytes becomes a head of several hundred bytes of Python objects.
So the backlog is parsed only while fewer than ``max_pipelined_requests`` heads wait on the
queue, and in slices that cannot hold many requests (a head or chunked data in small
slices, a body of known length up to its end); the rest waits as raw bytes. While an
exchange runs, the connection reads ahead only while the queue's estimated cost, the raw
backlog and early WebSocket bytes together stay under ``max_pipelined_bytes``.

Limits of a head: ``max_head_bytes`` for the request line and headers (414 when the request
line alone passes it, else 431), ``max_header_count`` headers (431), and ``head_timeout``
from its first byte (from the accept for a connection's first request) to its end (408).

Resource handling: the socket is the connection task's (``Server.handle`` closes it). A
keep-alive connection waits at most ``keep_alive_timeout`` for its next request, and is
closed at once when the server drains while it waits.

Error handling: a request that cannot be parsed is answered 400 (414, 431 or 408 past the
limits above, 505 for HTTP/2) with a JSON error envelope, and the connection is closed;
``linger()`` then keeps the answer from being destroyed by a reset.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

import attrs
import httptools
import trio

from trioproxy.protocol import http1 as wire
from trioproxy.streams import PeerGone, SocketWriter, receive_some
from trioproxy.web.state import ServerConfig, ServerState

ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
Scope = dict[str, Any]
MEMORY_EXTENSION = "trioproxy.request_memory"

# What queued events cost in memory, measured with tracemalloc: a head's objects (the
# record, its method, target and version, the header list) and each header's tuple and
# strings; a body piece's bytes object and its slot on the queue.
HEAD_COST = 300
HEADER_COST = 120
PIECE_COST = 41
# Slices of the backlog parsed at once where requests may start: small enough that one
# slice holds few requests however short they are.
HEAD_SLICE = 1024
CHUNKED_SLICE = 4096


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

    def count(self, name: bytes) -> int:
        return sum(1 for key, _ in self.headers if key == name)

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

    @property
    def content_length(self) -> int | None:
        value = self.header(b"content-length")
        return int(value) if value is not None and value.strip().isdigit() else None

    @property
    def cost(self) -> int:
        return (
            HEAD_COST
            + len(self.target)
            + sum(HEADER_COST + len(k) + len(v) for k, v in self.headers)
        )


@attrs.frozen
class Failed:
    """The request bytes stopped making sense or passed a limit: the answer the client gets."""

    status: int
    message: str
    code: str


HEAD_TIMEOUT = Failed(408, "The request head took too long to arrive.", "request_timeout")
END = object()  # the request's body is complete


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a head that passed a limit."""

    def __init__(self, failed: Failed) -> None:
        super().__init__(failed.message)
        self.failed = failed


class _Requests:
    """httptools callbacks: each request as events on a queue (see the module docstring),
    with what the queue holds: its heads and its estimated cost in bytes."""

    __slots__ = (
        "_config",
        "_headers",
        "_url",
        "body_left",
        "cost",
        "events",
        "head_bytes",
        "head_started",
        "heads",
        "in_body",
        "in_head",
        "parser",
        "url_tail",
    )

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self.events: collections.deque[Any] = collections.deque()
        self.heads = 0  # Head and Failed events on the queue
        self.cost = 0  # what the queued events take in memory, by estimate
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self.in_head = False
        self.in_body = False
        self.body_left: int | None = None  # of a body of known length being parsed
        self.head_bytes = 0  # of the head being received
        self.head_started = 0.0
        self.url_tail: bytes | None = None  # the last piece of URL the last slice gave

    # -- the queue ----------------------------------------------------------------------------
    def push(self, event: Any, cost: int) -> None:
        self.events.append(event)
        self.cost += cost
        if isinstance(event, Head | Failed):
            self.heads += 1

    def pop(self) -> Any:
        event = self.events.popleft()
        if isinstance(event, bytes):
            self.cost -= PIECE_COST + len(event)
        elif isinstance(event, Head):
            self.cost -= event.cost
            self.heads -= 1
        elif isinstance(event, Failed):
            self.heads -= 1
        return event

    def slice_size(self) -> int:
        """How much of the backlog to parse next."""
        if self.in_body:
            if self.body_left is not None:
                return max(self.body_left, 1)
            return CHUNKED_SLICE
        return HEAD_SLICE

    # -- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self.in_head = True
        self.head_bytes = 0
        self.head_started = trio.current_time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self.url_tail = url
        if len(self._url) > self._config.max_head_bytes:
            raise _Refused(Failed(414, "Request line too long.", "uri_too_long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= self._config.max_header_count:
            raise _Refused(
                Failed(
                    431,
                    f"More than {self._config.max_header_count} request headers.",
                    "request_header_fields_too_large",
                )
            )
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.in_head = False
        self.in_body = True
        self.head_bytes = 0
        head = Head(
            parser.get_method(),
            self._url,
            parser.get_http_version().encode("ascii"),
            self._headers,
            parser.should_keep_alive(),
        )
        self.body_left = None if head.header(b"transfer-encoding") else head.content_length
        self.push(head, head.cost)

    def on_body(self, body: bytes) -> None:
        if self.body_left is not None:
            self.body_left -= len(body)
        self.push(body, PIECE_COST + len(body))

    def on_message_complete(self) -> None:
        self.in_body = False
        self.body_left = None
        self.push(END, 0)


def address(sock: trio.socket.SocketType, peer: bool) -> tuple[str, int] | None:
    try:
        found = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if isinstance(found, tuple) and len(found) >= 2:
        return str(found[0]), int(found[1])
    return None


def date_header() -> tuple[bytes, bytes]:
    """``Date`` for a response written now (wall-clock time, as the header says)."""
    return (b"date", wire.http_date(time.time()))


@attrs.define(eq=False)
class Connection:
    """One client connection (see the module docstring)."""

    server: ServerState
    stream: trio.SocketStream
    requests: _Requests = attrs.field(init=False)
    writer: SocketWriter = attrs.field(init=False)
    client: tuple[str, int] | None = attrs.field(init=False)
    local: tuple[str, int] | None = attrs.field(init=False)
    opened_at: float = attrs.field(init=False)
    backlog: bytearray = attrs.field(factory=bytearray)  # read, not parsed yet
    eof: bool = False
    upgraded: bytearray | None = None  # after an upgrade request: the new protocol's bytes
    failed: bool = False  # the parser gave up: nothing more is parsed
    overflowed: bool = False  # the client sent more ahead than is kept: close after this
    heads_served: int = 0

    def __attrs_post_init__(self) -> None:
        self.requests = _Requests(self.server.config)
        self.writer = SocketWriter(self.stream)
        self.client = address(self.stream.socket, peer=True)
        self.local = address(self.stream.socket, peer=False)
        self.opened_at = trio.current_time()

    # -- reading ----------------------------------------------------------------------------
    async def read_more(self) -> int:
        """Read from the socket and parse what may be parsed; the number of bytes read (0 at
        the end). Raises ``PeerGone`` when the connection broke."""
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
        self.backlog += data
        self.parse_backlog()

    def parse_backlog(self) -> None:
        """Parse the backlog while the queue has room for more requests (module docstring)."""
        requests = self.requests
        limit = self.server.config.max_pipelined_requests
        backlog = self.backlog
        while backlog and not self.failed and self.upgraded is None and requests.heads < limit:
            size = requests.slice_size()
            piece = bytes(backlog[:size])
            del backlog[:size]
            requests.url_tail = None
            try:
                requests.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as exc:
                self.upgraded = bytearray(piece[exc.args[0] :]) + backlog
                backlog.clear()
                return
            except httptools.HttpParserCallbackError as exc:
                refused = exc.__context__
                if not isinstance(refused, _Refused):
                    raise
                self._fail(refused.failed)
                return
            except httptools.HttpParserError as exc:
                if "PRI" in str(exc):  # the HTTP/2 connection preface
                    self._fail(
                        Failed(
                            505,
                            "This server speaks HTTP/1.1 (and WebSocket over it).",
                            "http_version_not_supported",
                        )
                    )
                else:
                    self._fail(Failed(400, f"Malformed HTTP request: {exc}", "bad_request"))
                return
            if requests.in_head:
                requests.head_bytes += len(piece)
                if requests.head_bytes > self.server.config.max_head_bytes:
                    # the request line is what passed the limit if the slice ended in it
                    tail = requests.url_tail
                    if tail is not None and piece.endswith(tail):
                        self._fail(Failed(414, "Request line too long.", "uri_too_long"))
                    else:
                        self._fail(
                            Failed(
                                431,
                                "Request headers too large.",
                                "request_header_fields_too_large",
                            )
                        )
                    return

    def _fail(self, failed: Failed) -> None:
        self.failed = True
        self.backlog.clear()
        self.requests.push(failed, 0)

    def read_ahead_cost(self) -> int:
        """What the client's bytes sent ahead hold in memory now (module docstring)."""
        upgraded = len(self.upgraded) if self.upgraded is not None else 0
        return self.requests.cost + len(self.backlog) + upgraded

    async def wait_until_gone(self, *, past_bound: bool = True) -> None:
        """Return when the client closes the connection (or it breaks). What it sends
        meanwhile is kept for later (pipelined requests, early WebSocket frames) while its
        cost stays under ``max_pipelined_bytes``. Past that the connection is
        ``overflowed`` and closes after the exchange (RFC 9112 9.3.2: a client retries the
        pipelined requests left unanswered); with ``past_bound`` what comes after is read
        and dropped, so that the client leaving is still noticed at once, else this returns
        as if the client had left (an upgrade whose early frames would be lost)."""
        limit = self.server.config.max_pipelined_bytes
        while not self.eof and self.read_ahead_cost() < limit:
            try:
                await self.read_more()
            except PeerGone:
                return
        if self.eof:
            return
        self.overflowed = True
        self.backlog.clear()
        if not past_bound:
            return
        while True:
            try:
                data = await receive_some(self.stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self.eof = True
                return

    async def write(self, data: bytes) -> bool:
        """Write ``data``; False when the connection can no longer carry it."""
        try:
            await self.writer.write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def write_error(
        self,
        status: int,
        message: str,
        code: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        type_: str | None = None,
        target: bytes | None = None,
    ) -> bool:
        """An answer of the server's own (an envelope, or the shape the application gives
        answers to ``target``; the connection closes after it)."""
        shape = self.server.config.error_shape
        if shape is not None and target is not None:
            status, body = shape(target, status, message, code, type_)
        else:
            body = wire.error_body(status, message, code, type_)
        head = wire.response_head(
            status,
            wire.reason(status),
            [
                date_header(),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
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
        idle past the keep-alive timeout, or the server draining while it was idle).
        ``HEAD_TIMEOUT`` for a head that did not arrive whole in ``head_timeout``."""
        requests = self.requests
        config = self.server.config
        first = self.heads_served == 0
        idle_deadline = (
            self.opened_at + min(config.head_timeout, config.keep_alive_timeout)
            if first
            else trio.current_time() + config.keep_alive_timeout
        )
        while True:
            while requests.events:
                event = requests.pop()
                if isinstance(event, Head | Failed):
                    self.heads_served += 1
                    return event
                # (a body event or END left by the exchange before: never, as it reads its
                # body to the end or closes the connection)
            if self.backlog:
                self.parse_backlog()
                if requests.events:
                    continue
            if self.eof or self.upgraded is not None:
                return None
            waiting = not requests.in_head  # nothing of a next request yet
            if waiting:
                if self.server.draining:
                    return None
                deadline = idle_deadline
            else:
                started = self.opened_at if first else requests.head_started
                deadline = started + config.head_timeout
            wait = trio.CancelScope(deadline=deadline)
            if waiting:
                self.server.idle_waits.add(wait)
            try:
                with wait:
                    await self.read_more()
            finally:
                self.server.idle_waits.discard(wait)
            if wait.cancelled_caught:
                if requests.in_head:
                    self.failed = True
                    return HEAD_TIMEOUT
                return None  # idle past the keep-alive timeout, or drained

    def scope(self, head: Head, kind: str) -> Scope:
        target = head.target
        headers = head.headers
        authority = wire.absolute_authority(target)
        if authority is not None:
            # absolute form (RFC 9112 3.2.2): the target's authority is the host asked for,
            # whatever a Host header says
            headers = [(b"host", authority), *((k, v) for k, v in headers if k != b"host")]
            after_scheme = target.partition(b"://")[2]
            ends = [i for i in (after_scheme.find(c) for c in (b"/", b"?", b"#")) if i != -1]
            target = after_scheme[min(ends) :] if ends else b"/"
            if not target.startswith(b"/"):
                target = b"/" + target
        elif not target.startswith(b"/"):  # "*"
            target = b"/"
        raw_path, _, query = target.partition(b"?")
        extensions: dict[str, Any] = {MEMORY_EXTENSION: self.server.budget}
        if kind == "websocket":
            extensions["websocket.http.response"] = {}
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
            "headers": headers,
            "client": self.client,
            "server": self.local,
            "state": self.server.state.copy(),
            "extensions": extensions,
        }
