"""A lean HTTP/1.1 transport for the shared upstream httpx client: h11 over trio streams, with
a last-in-first-out pool of idle connections per origin.

Why: profiling the proxy under 50 concurrent SSE streams (``trioproxy bench --profile sse``)
put about a quarter of its CPU in httpcore, most of it in the connection pool: every request
start and every response close walks *all* pooled connections (``is_idle``, ``has_expired``,
and a readability syscall per idle one), so the cost per request grows with the pool. Here a
request pops one idle connection (checking only that one) or opens a new one: O(1). Each body
chunk also passes through one async iterator instead of five nested ones.

Two ways in. The shared ``httpx.AsyncClient`` (models, usage polls, token refresh, alerts)
uses it as its transport, unchanged for its callers. The hot path, a Responses turn, calls
:meth:`LeanTransport.stream` directly and gets a :class:`StreamedResponse`: no
``httpx.Request`` to build (URL parsing, header merging), no cookie jar to feed (httpx copies
every response's headers into an ``email.message`` for it), about a third of the proxy's CPU
before the first byte in a profile of serial turns (docs/performance.md). Its failures are
the same httpx exception types.

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
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import attrs
import h11
import httpx
import trio

from trioproxy.protocol import http1 as wire
from trioproxy.streams import receive_some, write_now

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
    h11: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
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

    h11 parsed the head; the body is decoded by ``protocol.http1.BodyDecoder`` (per relayed
    event, h11's chunked reader cost about as much as the rest of the relay). Each read's
    complete chunks come out as one piece: when the relay falls behind, several SSE events
    go downstream in one write, with no added latency (nothing waits for more)."""

    transport: LeanTransport
    connection: _Connection
    request: httpx.Request | None  # for the httpx exceptions' context (None on the hot path)
    read_timeout: float | None
    decoder: wire.BodyDecoder
    keep_alive: bool  # the response lets the connection carry another request
    headers: list[tuple[bytes, bytes]]  # the response's, names in lower case
    pending: bytes = b""  # body bytes that came with the head
    finished: bool = False

    @classmethod
    def after(
        cls,
        transport: LeanTransport,
        connection: _Connection,
        request: httpx.Request | None,
        method: bytes,
        head: h11.Response,
        read_timeout: float | None,
    ) -> _Body:
        """The body of the response whose head h11 just parsed on ``connection``."""
        headers = wire.header_list(head.headers)  # kept: the response's raw headers
        try:
            mode, length = wire.body_framing(head.status_code, method, headers)
        except (wire.BodyError, ValueError) as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        keep_alive = head.http_version == b"1.1" and not any(
            name == b"connection" and wire.has_token(value, b"close") for name, value in headers
        )
        decoder = wire.BodyDecoder(mode, length)
        body = cls(transport, connection, request, read_timeout, decoder, keep_alive, headers)
        received, _ = connection.h11.trailing_data
        if received:
            body.pending = body._decode(received)
        return body

    def _decode(self, data: bytes) -> bytes:
        try:
            return self.decoder.feed(data)
        except wire.BodyError as exc:
            raise httpx.RemoteProtocolError(f"upstream body: {exc}", request=self.request) from exc

    # An iterator object, not an async generator: httpx never closes the inner iterators of
    # a stream (PEP 533), and a generator left to the garbage collector is finalized
    # outside any cancel scope. Closing is this object's aclose(), which httpx does call.
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def relay(self, forward: Callable[[bytes], Awaitable[None]]) -> None:
        """Read the body to its end, handing each decoded piece to ``forward``: the loop of
        a relayed stream. Failures raise like iteration does.

        The read timeout here is one cancel scope for the whole body whose deadline moves
        on as bytes arrive (only once it is a tenth of the timeout old): upstream silence
        of 90 % of ``read_timeout`` is always tolerated and of the whole timeout never. A
        scope per read, as iteration uses, cost a tenth of the relay's CPU per event."""
        if self.pending:
            data, self.pending = self.pending, b""
            await forward(data)
        decoder = self.decoder
        timeout = self.read_timeout
        slack = timeout / 10 if timeout is not None else math.inf
        first = trio.current_time() + timeout if timeout is not None else math.inf
        with trio.CancelScope(deadline=first) as silence:
            while not decoder.done:
                if timeout is not None:
                    deadline = trio.current_time() + timeout
                    if deadline - silence.deadline > slack:
                        silence.deadline = deadline
                data = await self.transport.read(self.connection, self.request, None)
                if not data:
                    self._end_at_eof()
                    return
                out = self._decode(data)
                if out:
                    await forward(out)
        if silence.cancelled_caught:
            await self.transport.close_connection(self.connection)
            raise httpx.ReadTimeout("upstream read timed out", request=self.request)

    def _end_at_eof(self) -> None:
        try:
            self.decoder.feed_eof()
        except wire.BodyError:
            raise httpx.RemoteProtocolError(
                "upstream closed the connection mid-body", request=self.request
            ) from None

    async def __anext__(self) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        decoder = self.decoder
        while not decoder.done:
            data = await self.transport.read(self.connection, self.request, self.read_timeout)
            if not data:
                self._end_at_eof()
                break
            out = self._decode(data)
            if out:
                return out
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Pool the connection after a body read to its end; close it otherwise."""
        if self.finished:
            return
        self.finished = True
        connection = self.connection
        decoder = self.decoder
        if (
            decoder.done
            and not decoder.leftover
            and self.keep_alive
            and decoder.mode != "close"
            and not connection.closed
        ):
            connection.h11 = h11.Connection(h11.CLIENT)  # the next exchange starts afresh
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
        scheme, host, port = origin
        self._open += 1
        try:
            with trio.fail_after(_bound(timeouts["connect"])):
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
            self._open -= 1
            raise httpx.ConnectTimeout(
                f"connecting to {host}:{port} timed out", request=request
            ) from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            self._open -= 1
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {exc!r}", request=request
            ) from exc
        except BaseException:
            self._open -= 1
            raise
        return _Connection(origin, stream)

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

    async def receive(
        self, connection: _Connection, request: httpx.Request | None, read_timeout: float | None
    ) -> None:
        """Read into the connection's h11 (a response head)."""
        connection.h11.receive_data(await self.read(connection, request, read_timeout))

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
        length = str(len(content)).encode()
        head = [(b"host", host)]
        head += [
            (k, v)
            for k, v in headers
            if k not in (b"host", b"content-length", b"transfer-encoding")
        ]
        head.append((b"content-length", length))
        data = wire.request_head(verb, target, head) + content  # checks the headers
        connection = await self._connection_for(origin, None, timeouts)
        try:
            # h11 is shown the framing only (protocol/http1.py says why); it reads the answer
            conn = connection.h11
            conn.send(
                h11.Request(
                    method=verb,
                    target=target,
                    headers=[(b"host", host), (b"content-length", length)],
                )
            )
            if content:
                conn.send(h11.Data(data=content))
            conn.send(h11.EndOfMessage())
            await self._send(connection, data, None, timeouts["write"])
            event = await self._response_head(connection, None, timeouts)
            body = _Body.after(self, connection, None, verb, event, timeouts["read"])
        except BaseException:
            await self.close_connection(connection)
            raise
        return StreamedResponse(event.status_code, body.headers, body)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        origin: Origin = (url.scheme, url.host, port)
        timeouts = _timeouts(request)
        headers = list(request.headers.raw)
        if not any(k.lower() == b"host" for k, _ in headers):
            headers.insert(0, (b"host", request.url.netloc))
        assert isinstance(request.stream, httpx.AsyncByteStream)
        connection = await self._connection_for(origin, request, timeouts)
        method = request.method.encode("ascii")
        try:
            event = await self._exchange(
                connection,
                method,
                request.url.raw_path,
                headers,
                request.stream,
                request,
                timeouts,
            )
            body = _Body.after(self, connection, request, method, event, timeouts["read"])
        except BaseException:
            await self.close_connection(connection)
            raise
        return httpx.Response(
            event.status_code,
            headers=list(event.headers),
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(event.reason)},
        )

    async def _connection_for(
        self, origin: Origin, request: httpx.Request | None, timeouts: Timeouts
    ) -> _Connection:
        connection = await self._take_idle(origin)
        if connection is None:
            connection = await self._open_connection(origin, request, timeouts)
        return connection

    async def _exchange(
        self,
        connection: _Connection,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes],
        request: httpx.Request | None,
        timeouts: Timeouts,
    ) -> h11.Response:
        """Send the request on ``connection`` and read the response head."""
        conn = connection.h11
        try:
            out = conn.send(h11.Request(method=method, target=target, headers=headers))
            if isinstance(body, bytes):
                if body:
                    out += conn.send(h11.Data(data=body))
            else:
                async for chunk in body:
                    out += conn.send(h11.Data(data=chunk))
                    if len(out) >= READ_SIZE:
                        await self._send(connection, out, request, timeouts["write"])
                        out = b""
            out += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        await self._send(connection, out, request, timeouts["write"])
        return await self._response_head(connection, request, timeouts)

    async def _response_head(
        self, connection: _Connection, request: httpx.Request | None, timeouts: Timeouts
    ) -> h11.Response:
        conn = connection.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if event is h11.NEED_DATA:
                await self.receive(connection, request, timeouts["read"])
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError(
                    "upstream disconnected without sending a response", request=request
                )
            # an InformationalResponse (100 Continue): read on

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
