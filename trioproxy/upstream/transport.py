"""A lean HTTP/1.1 transport for the shared upstream httpx client: requests written by
``protocol.http1``, answers parsed by httptools (llhttp, Node's parser), over trio streams,
with a last-in-first-out pool of idle connections per origin.

Why: with httpcore, the connection pool is the largest item after socket I/O in a profile of
the proxy under many concurrent streams (docs/performance.md, section 3.1): every request
start and every response close walks *all* pooled connections (``is_idle``, ``has_expired``, and a
readability syscall per idle one), so the cost per request grows with the pool. Here a
request pops one idle connection (checking only that one) or opens a new one: O(1). Each body
chunk also passes through one async iterator instead of five nested ones.

Two ways in. The shared ``httpx.AsyncClient`` (models, usage polls, token refresh, alerts)
uses it as its transport, unchanged for its callers. The hot path, a Responses turn, calls
:meth:`LeanTransport.stream` directly and gets a :class:`StreamedResponse`: no
``httpx.Request`` to build (URL parsing, header merging), no cookie jar to feed (httpx copies
every response's headers into an ``email.message`` for it), which in a profile of serial
turns are a large part of the proxy's CPU before the first byte (docs/performance.md,
section 3.2). Its failures are the same httpx exception types.

Answers are parsed by :class:`~trioproxy.upstream.response_parser.ResponseParser` (sans-IO;
it says why httptools rather than h11); both of its classes are importable from here too.

Resource handling: a connection is owned by at most one response at a time; the response's
stream returns it to the pool when the body was read to its end and both sides can go on,
and closes it otherwise (a client that left mid-stream, an error, a timeout). Closing is
shielded, so a cancelled handler still closes its upstream socket. ``aclose()`` closes the
idle connections; the pool never holds a connection in use.

Error handling: failures are raised as the httpx exceptions httpcore would raise
(``ConnectError``/``ConnectTimeout``, ``ReadError``/``ReadTimeout``, ``WriteError``/
``WriteTimeout``, ``PoolTimeout``, ``RemoteProtocolError``).
"""

from __future__ import annotations

import functools
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from trioproxy.protocol import http1 as wire
from trioproxy.streams import receive_some, write_now
from trioproxy.upstream.response_parser import ResponseMessage, ResponseParser

__all__ = [
    "LeanTransport",
    "Origin",
    "ResponseMessage",
    "ResponseParser",
    "StreamedResponse",
    "Timeouts",
    "split_url",
]

READ_SIZE = 65536
Origin = tuple[str, str, int]


Timeouts = dict[str, float | None]  # connect, read, write, pool (seconds; None: no limit)


def _timeouts(request: httpx.Request) -> Timeouts:
    timeout = request.extensions.get("timeout") or {}
    return {k: timeout.get(k) for k in ("connect", "read", "write", "pool")}


@functools.lru_cache(maxsize=64)
def split_url(url: str) -> tuple[Origin, bytes, bytes]:
    """(origin, request target, host header) of an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (
        (parts.scheme, parts.hostname, port),
        target.encode("ascii"),
        parts.netloc.encode("ascii"),
    )


def _bound(seconds: float | None) -> float:
    return float("inf") if seconds is None else seconds


@attrs.define(eq=False)
class _Connection:
    origin: Origin
    stream: trio.abc.Stream
    responses: ResponseParser = attrs.field(factory=ResponseParser)  # the current request's
    idle_since: float = 0.0
    closed: bool = False

    def stale(self) -> bool:
        """An idle connection with something to read (a close, or bytes the server should
        not have sent) cannot carry another request."""
        socket = getattr(self.stream, "socket", None)
        if socket is None:
            transport = getattr(self.stream, "transport_stream", None)
            socket = getattr(transport, "socket", None)
        return bool(socket is not None and socket.is_readable())

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


@attrs.define(eq=False)
class _Body(httpx.AsyncByteStream):
    """A response body read from its connection; returns the connection on a clean end.

    Each read's body bytes come out as one piece: when the relay falls behind, several SSE
    events go downstream in one write, with no added latency (nothing waits for more)."""

    transport: LeanTransport
    connection: _Connection
    request: httpx.Request | None  # for the httpx exceptions' context (None on the hot path)
    read_timeout: float | None
    message: ResponseMessage
    until_close: bool  # no length given: the body ends with the connection
    finished: bool = False

    @classmethod
    def after(
        cls,
        transport: LeanTransport,
        connection: _Connection,
        request: httpx.Request | None,
        method: bytes,
        message: ResponseMessage,
        read_timeout: float | None,
    ) -> _Body:
        """The body of the answer whose head was just parsed on ``connection``."""
        if method == b"HEAD":
            message.done = True  # no body, whatever the head says (llhttp cannot be told)
        until_close = not message.framed() and message.status not in (204, 304) and not message.done
        return cls(transport, connection, request, read_timeout, message, until_close)

    def _take(self) -> bytes:
        body = self.message.body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        return data

    def _ended(self) -> None:
        """The connection closed: the end of a body delimited by the close, else an error."""
        if self.until_close:
            self.message.done = True
            return
        raise httpx.RemoteProtocolError(
            "upstream closed the connection mid-body", request=self.request
        )

    async def relay(self, forward: Callable[[bytes], Awaitable[None]]) -> None:
        """Read the body to its end, handing each piece to ``forward``: the loop of a
        relayed stream. Failures raise like iteration does.

        The read timeout here is one cancel scope for the whole body whose deadline moves
        on as bytes arrive (only once it is a tenth of the timeout old): upstream silence
        of nine tenths of ``read_timeout`` is always tolerated and of the whole timeout
        never. A scope per read, as iteration uses, would be a noticeable part of the relay's
        CPU per event (docs/performance.md, section 3.2)."""
        data = self._take()
        if data:
            await forward(data)
        message = self.message
        responses = self.connection.responses
        timeout = self.read_timeout
        slack = timeout / 10 if timeout is not None else math.inf
        first = trio.current_time() + timeout if timeout is not None else math.inf
        with trio.CancelScope(deadline=first) as silence:
            while not message.done:
                if timeout is not None:
                    deadline = trio.current_time() + timeout
                    if deadline - silence.deadline > slack:
                        silence.deadline = deadline
                received = await self.transport.read(self.connection, self.request, None)
                if not received:
                    self._ended()
                    return
                responses.feed(received, self.request)
                data = self._take()
                if data:
                    await forward(data)
        if silence.cancelled_caught:
            await self.transport.close_connection(self.connection)
            raise httpx.ReadTimeout("upstream read timed out", request=self.request)

    # An iterator object, not an async generator: httpx never closes the inner iterators of
    # a stream (PEP 533), and a generator left to the garbage collector is finalized
    # outside any cancel scope. Closing is this object's aclose(), which httpx does call.
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        data = self._take()
        if data:
            return data
        message = self.message
        while not message.done:
            received = await self.transport.read(self.connection, self.request, self.read_timeout)
            if not received:
                self._ended()
                break
            self.connection.responses.feed(received, self.request)
            data = self._take()
            if data:
                return data
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Pool the connection after a body read to its end; close it otherwise."""
        if self.finished:
            return
        self.finished = True
        connection = self.connection
        responses = connection.responses
        if (
            self.message.done
            and not self.until_close
            and not connection.closed
            and responses.messages[-1] is self.message  # nothing came after the answer
            and not responses.spoiled
            and self.message.keep_alive
        ):
            connection.responses = ResponseParser()  # the next exchange starts afresh
            await self.transport.keep_idle(connection)
            return
        await self.transport.close_connection(connection)


@attrs.define(eq=False)
class StreamedResponse:
    """A response head with its body still to read (``LeanTransport.stream``).

    Resource handling: the body owns the connection; ``aclose()`` (idempotent, shielded)
    pools it after a body read to its end and closes it otherwise."""

    status_code: int
    raw_headers: list[tuple[bytes, bytes]]  # names in lower case, as received
    body: _Body

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The headers as text (for the occasional reader; the relay uses ``raw_headers``)."""
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self.body

    async def aclose(self) -> None:
        await self.body.aclose()


@attrs.define(eq=False)
class LeanTransport(httpx.AsyncBaseTransport):
    max_connections: int = 2000
    max_idle_per_origin: int = 200
    keepalive_expiry: float = 60.0
    ssl_context: ssl.SSLContext | None = None
    _idle: dict[Origin, list[_Connection]] = attrs.field(factory=dict)
    _open: int = 0
    _freed: trio.Event = attrs.field(factory=trio.Event)

    def statistics(self) -> dict[str, int]:
        return {"open": self._open, "idle": sum(len(v) for v in self._idle.values())}

    # -- connections ----------------------------------------------------------------------
    async def keep_idle(self, connection: _Connection) -> None:
        """Put a connection whose response was read to its end in the idle pool (called
        only from the response stream's ``aclose``: its one exit)."""
        connection.idle_since = trio.current_time()
        idle = self._idle.setdefault(connection.origin, [])
        idle.append(connection)
        if len(idle) > self.max_idle_per_origin:
            await self.close_connection(idle.pop(0))  # the oldest idle one goes

    async def close_connection(self, connection: _Connection) -> None:
        if not connection.closed:
            self._open -= 1
            self._freed.set()
            self._freed = trio.Event()
        await connection.aclose()

    async def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = trio.current_time()
        while idle:
            connection = idle.pop()
            if now - connection.idle_since > self.keepalive_expiry or connection.stale():
                await self.close_connection(connection)
                continue
            return connection
        return None

    async def _open_connection(
        self, origin: Origin, request: httpx.Request | None, timeouts: Timeouts
    ) -> _Connection:
        with trio.move_on_after(_bound(timeouts["pool"])) as waited:
            while self._open >= self.max_connections:
                await self._freed.wait()
        if waited.cancelled_caught:
            raise httpx.PoolTimeout("no upstream connection free in time", request=request)
        self._open += 1  # counted from here, so that waiting connects respect the limit
        try:
            stream = await self._connect(origin, request, timeouts["connect"])
        except BaseException:
            self._open -= 1
            raise
        return _Connection(origin, stream)

    async def _connect(
        self, origin: Origin, request: httpx.Request | None, limit: float | None
    ) -> trio.abc.Stream:
        """A connected (and for https, handshaken) stream; failures raise httpx's types."""
        scheme, host, port = origin
        try:
            with trio.fail_after(_bound(limit)):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                if scheme == "https":
                    context = self.ssl_context or _default_ssl()
                    tls = trio.SSLStream(
                        stream, context, server_hostname=host, https_compatible=True
                    )
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tls)
                        raise
                    stream = tls
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(
                f"connecting to {host}:{port} timed out", request=request
            ) from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {exc!r}", request=request
            ) from exc
        return stream

    # -- I/O --------------------------------------------------------------------------------
    async def read(
        self, connection: _Connection, request: httpx.Request | None, read_timeout: float | None
    ) -> bytes:
        """The next bytes from ``connection`` (b"" at its end); a failure or a timeout closes
        it and raises ``ReadError`` / ``ReadTimeout``."""
        try:
            if read_timeout is None:
                return await receive_some(connection.stream)
            # a cancel scope with a deadline, not fail_after (a generator-based context
            # manager that costs several times as much)
            with trio.CancelScope(deadline=trio.current_time() + read_timeout):
                return await receive_some(connection.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self.close_connection(connection)
            raise httpx.ReadError(f"upstream read failed: {exc!r}", request=request) from exc
        # the deadline passed
        await self.close_connection(connection)
        raise httpx.ReadTimeout("upstream read timed out", request=request)

    async def _send(
        self,
        connection: _Connection,
        data: bytes,
        request: httpx.Request | None,
        limit: float | None,
    ) -> None:
        # straight to the kernel when it takes it all (a request head and a small body
        # nearly always): no trip through the scheduler before the request is on its way
        written = write_now(connection.stream, data)
        if written == len(data):
            return
        try:
            with trio.fail_after(_bound(limit)):
                await connection.stream.send_all(memoryview(data)[written:])
        except trio.TooSlowError:
            await self.close_connection(connection)
            raise httpx.WriteTimeout("upstream write timed out", request=request) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self.close_connection(connection)
            raise httpx.WriteError(f"upstream write failed: {exc!r}", request=request) from exc

    async def stream(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        content: bytes,
        timeouts: Timeouts,
    ) -> StreamedResponse:
        """Send a request and return its response once the head arrived; the body is read
        as the caller iterates it (the hot path: no httpx objects). The caller closes it."""
        origin, target, host = split_url(url)
        verb = method.encode("ascii")
        head = [(b"host", host)]
        head += [
            (k, v)
            for k, v in headers
            if k not in (b"host", b"content-length", b"transfer-encoding")
        ]
        head.append((b"content-length", str(len(content)).encode()))
        data = wire.request_head(verb, target, head) + content  # checks the headers
        connection = await self._connection_for(origin, None, timeouts)
        try:
            await self._send(connection, data, None, timeouts["write"])
            message = await self._response_head(connection, None, timeouts)
            body = _Body.after(self, connection, None, verb, message, timeouts["read"])
        except BaseException:
            await self.close_connection(connection)
            raise
        return StreamedResponse(message.status, message.headers, body)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        origin: Origin = (url.scheme, url.host, port)
        timeouts = _timeouts(request)
        headers = [(k.lower(), v) for k, v in request.headers.raw]
        if not any(k == b"host" for k, _ in headers):
            headers.insert(0, (b"host", request.url.netloc))
        assert isinstance(request.stream, httpx.AsyncByteStream)
        method = request.method.encode("ascii")
        try:
            head = wire.request_head(method, request.url.raw_path, headers)
        except ValueError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        connection = await self._connection_for(origin, request, timeouts)
        try:
            out = head
            async for piece in request.stream:
                if piece:
                    out += wire.chunk(piece) if chunked else piece
                if len(out) >= READ_SIZE:
                    await self._send(connection, out, request, timeouts["write"])
                    out = b""
            if chunked:
                out += wire.LAST_CHUNK
            await self._send(connection, out, request, timeouts["write"])
            message = await self._response_head(connection, request, timeouts)
            body = _Body.after(self, connection, request, method, message, timeouts["read"])
        except BaseException:
            await self.close_connection(connection)
            raise
        return httpx.Response(
            message.status,
            headers=message.headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": wire.reason(message.status)},
        )

    async def _connection_for(
        self, origin: Origin, request: httpx.Request | None, timeouts: Timeouts
    ) -> _Connection:
        connection = await self._take_idle(origin)
        if connection is None:
            connection = await self._open_connection(origin, request, timeouts)
        return connection

    async def _response_head(
        self, connection: _Connection, request: httpx.Request | None, timeouts: Timeouts
    ) -> ResponseMessage:
        """Read until the answer's head is in (interim 1xx answers are skipped)."""
        responses = connection.responses
        while True:
            message = responses.final()
            if message is not None:
                return message
            data = await self.read(connection, request, timeouts["read"])
            if not data:
                raise httpx.RemoteProtocolError(
                    "upstream disconnected without sending a response", request=request
                )
            responses.feed(data, request)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await self.close_connection(connection)


_SSL: ssl.SSLContext | None = None


def _default_ssl() -> ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = ssl.create_default_context()
    return _SSL
