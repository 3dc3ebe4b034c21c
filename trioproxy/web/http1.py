"""trioproxy's HTTP/1.1 server: ASGI over trio, h11 and wsproto (WebSockets in websocket.py).

Why not hypercorn (docs/performance.md, section 4): the proxy runs on one trio thread, and
time to first byte under load is set by how many trips through the scheduler a request takes
and by how long each trip waits behind every other stream's relay work. hypercorn spends
both generously: a task spawned per request, a queue between the connection and the app, a
lock and a shielded ``send_all`` per write, a response head written apart from its first
chunk, several protocol layers per relayed chunk. Here a connection is one task that calls
the app itself, ``receive()`` reads the socket when the app asks, and ``send()`` encodes with
h11 and hands the bytes to the kernel without a checkpoint (``trioproxy.streams``).

Theory of operation:

* ``serve_asgi`` owns the lifespan task and a nursery of connection tasks fed by
  ``trio.serve_listeners``. Each connection reads request heads with h11 and runs one
  request at a time (an :class:`HTTPCycle`) or, for an upgrade, one WebSocket.
* ``receive()`` returns the request body as it is read; after the body it waits for the
  client to go away (``http.disconnect``), so an app's disconnect watcher is told at once
  (hypercorn, by contrast, never cancels the app). Bytes a client pipelines meanwhile are
  kept for the next request (up to a bound).
* A response head is held until the first body message and written with it (the ASGI spec
  allows this); every write goes to the kernel directly, and only what it does not take
  waits (``SocketWriter``). Writes are not shielded: a handler that is cancelled is not
  pinned by a client that stopped reading, and ``TCP_USER_TIMEOUT`` on the listening socket
  (server.py) cuts such a client off.

Resource handling: the socket belongs to its connection task and is closed when the task
ends, whatever ends it. Nothing outlives the connection: an app's tasks live in its own
nurseries inside the connection task. A keep-alive connection waits at most
``keep_alive_timeout`` for its next request; while the server drains, idle connections close
at once and busy ones after their current request, and ``graceful_timeout`` later whatever
is left is cancelled.

Error handling: a malformed request is answered 400 (431 for an oversized head) with a JSON
error envelope and the connection is closed. An exception from the app is logged; the client
gets a 500 envelope if nothing was sent yet, else the connection is closed mid-response. An
exception anywhere in a connection's code is logged and closes that connection only: it
never reaches the listener.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any
from urllib.parse import unquote

import attrs
import h11
import trio

from trioproxy.logs import get_logger
from trioproxy.protocol import http1 as wire
from trioproxy.streams import PeerGone, SocketWriter, receive_some
from trioproxy.web.websocket import serve_websocket

log = get_logger("trioproxy.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

READ_SIZE = 65536
ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
NO_BODY_STATUS = frozenset({204, 304})
LINGER_SECONDS = 1.0  # after our FIN, how long a client may take to close its side


@attrs.frozen
class ServerConfig:
    """Limits of the HTTP server (server.py sets them from the proxy's settings)."""

    keep_alive_timeout: float = 75.0  # idle keep-alive connection, or an unfinished head
    body_timeout: float = 60.0  # longest silence while a request body is being read
    max_head_bytes: int = 1024 * 1024  # request line and headers
    max_ws_message_bytes: int = 16 * 1024 * 1024
    # bytes a client may send ahead (pipelined requests, early frames) while it is served
    max_pipelined_bytes: int = 1024 * 1024
    ws_close_timeout: float = 1.0  # wait for the peer's close frame after ours
    graceful_timeout: float = 30.0  # drain: in-flight requests get this long
    lifespan_timeout: float = 30.0


@attrs.frozen
class ServerStatistics:
    connections_open: int
    connections_total: int
    requests_total: int
    websockets_open: int
    draining: bool


def _address(sock: trio.socket.SocketType, peer: bool) -> tuple[str, int] | None:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


@attrs.define(eq=False)
class Server:
    """The state shared by every connection of one ``serve_asgi`` call."""

    app: ASGIApp
    config: ServerConfig
    state: dict[str, Any] = attrs.field(factory=dict)  # the lifespan state (ASGI "state")
    draining: bool = False
    idle_waits: set[trio.CancelScope] = attrs.field(factory=set)  # connections between requests
    connections_open: int = 0
    connections_total: int = 0
    requests_total: int = 0
    websockets_open: int = 0

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            connections_open=self.connections_open,
            connections_total=self.connections_total,
            requests_total=self.requests_total,
            websockets_open=self.websockets_open,
            draining=self.draining,
        )

    def start_draining(self) -> None:
        """New requests are no longer read; idle keep-alive connections close now."""
        self.draining = True
        for scope in self.idle_waits:
            scope.cancel(reason="server draining")

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection until it ends. Never raises (but Cancelled)."""
        self.connections_open += 1
        self.connections_total += 1
        try:
            conn = Connection(self, stream)
            await conn.run()
            await conn.linger()
        except Exception:
            # a bug in one connection must never reach the listener (and every other client)
            log.exception("connection handler failed; closing that connection")
        finally:
            self.connections_open -= 1
            await trio.aclose_forcefully(stream)


@attrs.define(eq=False)
class Connection:
    """One client connection: request heads read with h11, one exchange at a time."""

    server: Server
    stream: trio.SocketStream
    parser: h11.Connection = attrs.field(init=False)
    writer: SocketWriter = attrs.field(init=False)
    client: tuple[str, int] | None = attrs.field(init=False)
    local: tuple[str, int] | None = attrs.field(init=False)
    eof: bool = False

    def __attrs_post_init__(self) -> None:
        self.parser = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.server.config.max_head_bytes
        )
        self.writer = SocketWriter(self.stream)
        self.client = _address(self.stream.socket, peer=True)
        self.local = _address(self.stream.socket, peer=False)

    async def read_more(self) -> None:
        """Read from the socket into h11 (EOF included); raise ``PeerGone`` on failure."""
        try:
            data = await receive_some(self.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.eof = True
            raise PeerGone() from exc
        if not data:
            self.eof = True
        self.parser.receive_data(bytes(data))

    async def write(self, data: bytes) -> bool:
        """Write ``data``; False when the connection can no longer carry it."""
        try:
            await self.writer.write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def linger(self) -> None:
        """Close our side first, then read (and drop) what the client still sends until it
        closes too, briefly: closing a socket with unread bytes makes the kernel send a
        reset, which can destroy the answer we just wrote (a 400, a 431, a 429 to a request
        whose body was never read) before the client reads it."""
        if self.eof or self.writer.broken:
            return
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await self.stream.send_eof()
                dropped = 0
                while dropped < self.server.config.max_pipelined_bytes:
                    data = await self.stream.receive_some(READ_SIZE)
                    if not data:
                        return
                    dropped += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return

    async def run(self) -> None:
        while True:
            try:
                request = await self._next_request()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc)
                return
            except PeerGone:
                return
            if request is None:
                return
            self.server.requests_total += 1
            if request.http_version not in (b"1.0", b"1.1"):  # HTTP/2 with prior knowledge
                await self._refuse_version()
                return
            if _is_upgrade(request):
                await serve_websocket(self, request)
                return
            cycle = HTTPCycle(self, request)
            await cycle.run()
            if not cycle.reusable() or self.server.draining:
                return
            self.parser.start_next_cycle()

    async def _next_request(self) -> h11.Request | None:
        """The next request head; ``None`` when the connection ends (closed by the client,
        idle past the keep-alive timeout, or the server draining while it was idle)."""
        idle = trio.CancelScope(
            deadline=trio.current_time() + self.server.config.keep_alive_timeout
        )
        waiting = False
        try:
            with idle:
                while True:
                    event = self.parser.next_event()
                    if isinstance(event, h11.Request):
                        return event
                    if event is not h11.NEED_DATA:  # ConnectionClosed, or PAUSED after a
                        return None  # close the client asked for
                    if self.eof:
                        return None
                    if not waiting and not self.parser.trailing_data[0]:
                        if self.server.draining:
                            return None
                        self.server.idle_waits.add(idle)
                        waiting = True
                    await self.read_more()
                    if waiting:
                        self.server.idle_waits.discard(idle)
                        waiting = False
        finally:
            self.server.idle_waits.discard(idle)
        return None  # idle past the keep-alive timeout, or drained

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a request that cannot be parsed, then close."""
        status = exc.error_status_hint or 400
        if status == 431:
            body = wire.error_body(
                431, "Request headers too large.", "request_header_fields_too_large"
            )
        else:
            body = wire.error_body(status, f"Malformed HTTP request: {exc}", "bad_request")
        with contextlib.suppress(h11.LocalProtocolError):
            if self.parser.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self.write(self.response_bytes(status, [], body, close=True))

    async def _refuse_version(self) -> None:
        body = wire.error_body(
            505,
            "This server speaks HTTP/1.1 (and WebSocket over it).",
            "http_version_not_supported",
        )
        with contextlib.suppress(h11.LocalProtocolError):
            await self.write(self.response_bytes(505, [], body, close=True))

    def response_bytes(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool
    ) -> bytes:
        """A whole response of our own (errors), as bytes."""
        head = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ]
        if close:
            head.append((b"connection", b"close"))
        return (
            self.parser.send(
                h11.Response(status_code=status, headers=head, reason=wire.reason(status))
            )
            + self.parser.send(h11.Data(data=body))
            + self.parser.send(h11.EndOfMessage())
        )

    def scope(self, request: h11.Request, kind: str) -> Scope:
        target = request.target
        if not target.startswith(b"/"):  # absolute form (or "*")
            after_scheme = target.partition(b"://")[2]
            target = b"/" + after_scheme.partition(b"/")[2] if after_scheme else b"/"
        raw_path, _, query = target.partition(b"?")
        return {
            "type": kind,
            "asgi": ASGI_VERSION,
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": "ws" if kind == "websocket" else "http",
            "path": unquote(raw_path.decode("ascii", "replace")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": wire.header_list(request.headers),
            "client": self.client,
            "server": self.local,
            "state": self.server.state.copy(),
            "extensions": {"websocket.http.response": {}} if kind == "websocket" else {},
        }


def _wants_close(request: h11.Request, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the client ends the connection after this request (h11 decides the same)."""
    if request.http_version != b"1.1":
        return True
    return any(name == b"connection" and wire.has_token(value, b"close") for name, value in headers)


def _is_upgrade(request: h11.Request) -> bool:
    if request.method != b"GET":
        return False
    for name, value in request.headers:
        if name == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


@attrs.define(eq=False)
class HTTPCycle:
    """One HTTP request and its response, as ASGI ``receive``/``send``."""

    conn: Connection
    request: h11.Request
    scope: Scope = attrs.field(init=False)
    body_done: bool = False
    head: tuple[int, list[tuple[bytes, bytes]]] | None = None  # held until the first body
    head_sent: bool = False
    complete: bool = False  # the whole response went out
    closed: bool = False  # the client is gone or a write failed: sends are dropped
    bad_body: bool = False  # the request body could not be parsed
    suppress_body: bool = False
    chunked: bool = False  # the body is written in chunks (by us, not h11)
    _ahead: list[Any] = attrs.field(factory=list)  # request body events taken out of h11

    def __attrs_post_init__(self) -> None:
        self.scope = self.conn.scope(self.request, "http")

    def reusable(self) -> bool:
        if not self.complete or self.closed or self.conn.writer.broken:
            return False
        h = self.conn.parser
        if h.their_state is h11.SEND_BODY:
            # the app answered without reading the whole body: what is already here is
            # skipped; a body still on its way costs the connection
            with contextlib.suppress(h11.RemoteProtocolError):
                while isinstance(h.next_event(), h11.Data):
                    pass
        return h.our_state is h11.DONE and h.their_state is h11.DONE

    async def run(self) -> None:
        try:
            await self.conn.server.app(self.scope, self.receive, self.send)
        except Exception:
            log.exception("application error", path=self.scope["path"])
            await self._fail(500, "Internal server error.", "internal_error")
            return
        if self.bad_body and not self.head_sent:
            await self._fail(400, "Malformed request body.", "bad_request")
        elif not self.head_sent and not self.closed:
            await self._fail(500, "The application sent no response.", "internal_error")
        # a response left unfinished: the connection is closed (reusable() says no), and the
        # client sees the body end early

    async def _fail(self, status: int, message: str, code: str) -> None:
        if self.head_sent or self.closed:
            return
        self.head_sent = True
        self.complete = True
        with contextlib.suppress(h11.LocalProtocolError):
            data = self.conn.response_bytes(
                status, [], wire.error_body(status, message, code), close=True
            )
            await self.conn.write(data)

    # -- receive ------------------------------------------------------------------------------
    async def receive(self) -> Message:
        if self.closed or self.complete:
            return {"type": "http.disconnect"}
        if not self.body_done:
            try:
                return await self._read_body()
            except PeerGone:
                self.closed = True
                return {"type": "http.disconnect"}
            except h11.RemoteProtocolError:
                self.bad_body = True  # answered 400 if the app does not answer
                return {"type": "http.disconnect"}
        await self._wait_for_disconnect()
        return {"type": "http.disconnect"}

    def _body_event(self) -> Any:
        """The next h11 event of the request body (one taken ahead by ``_head`` first)."""
        if self._ahead:
            return self._ahead.pop(0)
        return self.conn.parser.next_event()

    def _take_body_ahead(self) -> bool:
        """Move the body events already received out of h11 (for ``receive()`` to return
        later); whether that was the whole body."""
        h = self.conn.parser
        try:
            while h.their_state is h11.SEND_BODY:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    return False
                self._ahead.append(event)
        except h11.RemoteProtocolError:
            self.bad_body = True
            return False
        return True

    async def _read_body(self) -> Message:
        conn, h = self.conn, self.conn.parser
        if h.they_are_waiting_for_100_continue and not self.head_sent:
            await conn.write(h.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            event = self._body_event()
            if isinstance(event, h11.Data):
                body = bytes(event.data)
                following = self._body_event()  # often the end, already received
                if isinstance(following, h11.EndOfMessage):
                    self.body_done = True
                    return {"type": "http.request", "body": body, "more_body": False}
                if isinstance(following, h11.Data):  # chunked: several chunks arrived
                    body += bytes(following.data)
                return {"type": "http.request", "body": body, "more_body": True}
            if isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if event is h11.NEED_DATA:
                if conn.eof:
                    raise PeerGone()
                with trio.move_on_after(conn.server.config.body_timeout) as waited:
                    await conn.read_more()
                if waited.cancelled_caught:
                    raise PeerGone()
                continue
            raise PeerGone()  # ConnectionClosed

    async def _wait_for_disconnect(self) -> None:
        """Return when the client goes away; bytes it sends meanwhile are kept for the next
        request (reading stops past ``max_pipelined_bytes`` until this request is done)."""
        conn = self.conn
        limit = conn.server.config.max_pipelined_bytes
        while not conn.eof and len(conn.parser.trailing_data[0]) < limit:
            try:
                await conn.read_more()
            except PeerGone:
                break
            if conn.parser.their_state is h11.ERROR:
                break
        if not conn.eof:
            await trio.sleep(math.inf)
        self.closed = True

    # -- send ---------------------------------------------------------------------------------
    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.head is not None:
                raise RuntimeError("http.response.start sent twice")
            status = int(message["status"])
            self.head = (status, list(message.get("headers", [])))
            self.suppress_body = (
                self.request.method == b"HEAD" or status in NO_BODY_STATUS or status < 200
            )
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an HTTP request")
        if self.head is None:
            raise RuntimeError("http.response.body before http.response.start")
        if self.closed or self.complete:
            return
        h = self.conn.parser
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out = b"" if self.head_sent else self._head()
        if body and not self.suppress_body:
            out += wire.chunk(body) if self.chunked else h.send(h11.Data(data=body))
        if not more:
            end = h.send(h11.EndOfMessage())
            out += wire.LAST_CHUNK if self.chunked else end
            self.complete = True
        if out and not await self.conn.write(out):
            self.closed = True

    def _head(self) -> bytes:
        """The response head as bytes (protocol/http1.py writes it; h11 is shown only the
        framing headers). The body is chunked when its length is not given to an HTTP/1.1
        client, and ends with the connection for an HTTP/1.0 one."""
        assert self.head is not None
        status, headers = self.head
        out: list[tuple[bytes, bytes]] = []
        framing: list[tuple[bytes, bytes]] = []
        close = self.conn.server.draining or _wants_close(self.request, self.scope["headers"])
        if self.conn.parser.their_state is h11.SEND_BODY:
            # answered before the whole body arrived (a 401, a 413, a 429 before reading):
            # the client must not send its next request on this connection, whose unread
            # bytes we cannot tell from that request
            close = close or not self._take_body_ahead()
        length = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                continue  # the body's framing is decided here
            if lowered == b"connection":
                close = close or wire.has_token(value, b"close")
                continue  # written once, below
            if lowered == b"content-length":
                length = True
                framing.append((b"content-length", value))
            out.append((name, value))
        if not length and not self.suppress_body:
            if self.request.http_version == b"1.1":
                self.chunked = True
                out.append((b"transfer-encoding", b"chunked"))
            else:
                close = True
        if close:
            out.append((b"connection", b"close"))
            framing.append((b"connection", b"close"))
        head = wire.response_head(status, wire.reason(status), out)
        self.conn.parser.send(h11.Response(status_code=status, headers=framing, reason=b""))
        self.head_sent = True
        return head


# -- lifespan ----------------------------------------------------------------------------------
@attrs.define(eq=False)
class Lifespan:
    """The ASGI lifespan protocol: the app's startup before the first connection, its
    shutdown after the last. An app that does not speak it (it raises) is served anyway."""

    app: ASGIApp
    state: dict[str, Any]
    timeout: float
    _to_app: trio.MemorySendChannel[Message] = attrs.field(init=False)
    _app_receive: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)
    _from_app: trio.MemorySendChannel[Message] = attrs.field(init=False)
    _replies: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)
    supported: bool = True

    def __attrs_post_init__(self) -> None:
        self._to_app, self._app_receive = trio.open_memory_channel[Message](1)
        self._from_app, self._replies = trio.open_memory_channel[Message](1)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the app's lifespan task (its own nursery, quart-trio's background tasks among
        them, lives as long as it). Reports started once startup is done."""
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}

        async def app_task() -> None:
            try:
                await self.app(scope, self._app_receive.receive, self._from_app.send)
            except Exception:
                log.debug("the app does not support the ASGI lifespan protocol")
            finally:
                self.supported = False  # from now on there is nobody to tell
                self._from_app.close()
                self._app_receive.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(app_task)
            await self._exchange("startup")
            task_status.started()
            await trio.sleep(math.inf)

    async def _exchange(self, phase: str) -> None:
        with trio.move_on_after(self.timeout) as waited:
            try:
                await self._to_app.send({"type": f"lifespan.{phase}"})
                reply = await self._replies.receive()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                return  # the app finished (or refused the protocol)
        if waited.cancelled_caught:
            raise RuntimeError(f"the app's lifespan {phase} took more than {self.timeout} s")
        if reply["type"] == f"lifespan.{phase}.failed":
            raise RuntimeError(f"the app's lifespan {phase} failed: {reply.get('message', '')}")

    async def shutdown(self) -> None:
        if self.supported:
            await self._exchange("shutdown")


# -- listening ---------------------------------------------------------------------------------
async def open_listeners(
    host: str, port: int, *, backlog: int, user_timeout_ms: int | None
) -> list[trio.SocketListener]:
    """Listening sockets for ``host:port`` (one per address of ``host``; with port 0 only the
    first, so the port reported is the one every client reaches). Accepted sockets inherit
    ``TCP_USER_TIMEOUT`` (milliseconds) from them."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    if port == 0 and len(listeners) > 1:
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    if user_timeout_ms is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        for listener in listeners:
            if listener.socket.family in (socket.AF_INET, socket.AF_INET6):
                listener.socket.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms
                )
    return listeners


async def serve_asgi(
    server: Server,
    listeners: list[trio.SocketListener],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``server.app`` on ``listeners`` until ``shutdown_trigger`` returns, then drain:
    stop accepting, close idle connections, give busy ones ``graceful_timeout``. Reports the
    bound addresses once the app's lifespan startup is done.

    Resource handling: the listeners are closed on the way out, and every connection task
    has ended by the time this returns."""
    lifespan = Lifespan(server.app, server.state, server.config.lifespan_timeout)
    try:
        async with trio.open_nursery() as outer:
            await outer.start(lifespan.run)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    await accepting.start(
                        partial(
                            trio.serve_listeners,
                            server.handle,
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    task_status.started(
                        [a for a in (_address(x.socket, peer=False) for x in listeners) if a]
                    )
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel(reason="server draining")
                for listener in listeners:
                    await listener.aclose()
                server.start_draining()
                connections.cancel_scope.deadline = (
                    trio.current_time() + server.config.graceful_timeout
                )
            with trio.CancelScope(shield=True):
                await lifespan.shutdown()
            outer.cancel_scope.cancel(reason="server stopped")
    finally:
        for listener in listeners:
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await trio.aclose_forcefully(listener)
