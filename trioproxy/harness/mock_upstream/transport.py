"""A lean HTTP/1.1 + WebSocket server on trio, h11 and wsproto, for the mock backend.

Why not hypercorn: the mock is the baseline of every benchmark, so it must cost as little as
possible per event, and fault injection needs control below any framework (drop a
connection before the status line, stall without a byte, close a socket with 1011).

Resource handling: each accepted connection is served by one task; while a handler runs, a
watcher task reads the socket so a client that goes away cancels its handler at once (no
stalled handler outlives its client). A WebSocket upgrade has no watcher (the socket becomes
the WebSocket's once accepted), so a handler that stalls before answering one waits with
``Exchange.pause``, which reads the socket itself. A WebSocket has one reader task (pings,
close frames, message reassembly) feeding a bounded channel, and a ``StrictFIFOLock`` for
writes; a handler may add a keep-alive task (``run_websocket``'s ``keepalive``: pings). ``serve_listeners`` can count open connections (``track``): a client that leaks its
sockets (a proxy that never closes an upstream socket) shows there.
"""

from __future__ import annotations

import contextlib
import http
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.utilities import generate_accept_token

from trioproxy.harness.mock_upstream.segmentation import WsWrite
from trioproxy.logs import get_logger

MAX_BODY = 256 * 1024 * 1024
MAX_WS_MESSAGE = 256 * 1024 * 1024
READ_SIZE = 65536

Headers = list[tuple[str, str]]


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class ConnectionGone(Exception):
    """The peer went away (or the exchange was aborted); the connection is finished."""


@attrs.frozen
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: Headers
    body: bytes
    peer: str

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def is_websocket(self) -> bool:
        upgrade = (self.header("upgrade") or "").lower()
        return self.method == "GET" and upgrade == "websocket"


Handler = Callable[[Request, "Exchange"], Awaitable[None]]
log = get_logger("trioproxy.mock")


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(READ_SIZE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


@attrs.define(eq=False)
class Exchange:
    """One request's response side: a unary answer, a stream, an abort or a WebSocket."""

    stream: trio.SocketStream
    conn: h11.Connection
    request: Request
    started: bool = False
    finished: bool = False
    closed: bool = False
    websocket: WebSocket | None = None
    watched: bool = False  # a watcher task reads the socket (HTTP requests, not upgrades)

    async def pause(self, seconds: float) -> None:
        """Wait up to ``seconds`` before answering; raise ``ConnectionGone`` at once if the
        peer goes away meanwhile (with a watcher, the watcher cancels the handler instead)."""
        if self.watched:
            await trio.sleep(seconds)
            return
        with trio.move_on_after(seconds):
            while True:
                data = await _receive(self.stream)
                if not data:
                    self.closed = True
                    raise ConnectionGone()
                self.conn.receive_data(data)  # early bytes: kept for after the answer

    def encode(self, event: Any) -> bytes:
        """``event`` (an h11 event) as bytes for the wire; nothing is written yet."""
        return self.conn.send(event) or b""

    def encode_head(self, status: int, headers: Headers) -> bytes:
        self.started = True
        return self.encode(
            h11.Response(status_code=status, headers=headers, reason=_reason(status))
        )

    async def write(self, pieces: Sequence[bytes]) -> None:
        """Write ``pieces`` in order, one ``send_all`` each. Between two pieces the task
        yields, so that a reader on the other end can take the first before the second
        arrives (how a network delivers an answer in several segments)."""
        for index, piece in enumerate(pieces):
            if index:
                await trio.lowlevel.checkpoint()
            if not piece:
                continue
            try:
                await self.stream.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = True
                raise ConnectionGone() from exc

    async def _send(self, event: Any) -> None:
        await self.write([self.encode(event)])

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        await self.start(status, [*headers, ("content-length", str(len(body)))])
        if body:
            await self.send(body)
        await self.end()

    async def start(self, status: int, headers: Headers) -> None:
        await self.write([self.encode_head(status, headers)])

    async def send(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())
        self.finished = True

    async def abort(self) -> None:
        """Drop the TCP connection without a (complete) response."""
        self.closed = True
        await trio.aclose_forcefully(self.stream)
        raise ConnectionGone()

    async def accept_websocket(self, headers: Headers) -> WebSocket:
        key = self.request.header("sec-websocket-key") or ""
        response_headers: Headers = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", generate_accept_token(key.encode()).decode()),
            *headers,
        ]
        self.started = True
        await self._send(h11.InformationalResponse(status_code=101, headers=response_headers))
        ws = WebSocket(self.stream)
        trailing, _ = self.conn.trailing_data
        if trailing:
            ws._feed(trailing)
        self.websocket = ws
        return ws


class WebSocketClosed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"websocket closed ({code})")
        self.code = code


@attrs.define(eq=False)
class WebSocket:
    stream: trio.SocketStream
    ws: WSConnection = attrs.field(factory=lambda: WSConnection(ConnectionType.SERVER))
    lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)
    pending: list[Any] = attrs.field(factory=list)
    parts: list[str | bytes] = attrs.field(factory=list)
    part_size: int = 0
    close_code: int | None = None
    send_channel: trio.MemorySendChannel[str | bytes] | None = None
    receive_channel: trio.MemoryReceiveChannel[str | bytes] | None = None
    pong: trio.Event = attrs.field(factory=trio.Event)  # set by the next pong read

    async def ping(self, payload: bytes) -> trio.Event:
        """Send a ping; the event is set when a pong comes."""
        self.pong = pong = trio.Event()
        await self._write(Ping(payload=payload))
        return pong

    def _feed(self, data: bytes) -> None:
        self.ws.receive_data(data)

    async def _write(self, event: Any) -> None:
        async with self.lock:
            allowed = (
                (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)
                if isinstance(event, CloseConnection)
                else (ConnectionState.OPEN,)
            )
            if self.ws.state not in allowed:
                # after the peer's close frame only our close reply may go out
                raise WebSocketClosed(self.close_code)
            data = self.ws.send(event)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise WebSocketClosed(self.close_code) from exc

    async def send_text(self, text: str) -> None:
        await self._write(Message(data=text))

    async def write_frames(self, writes: Sequence[WsWrite]) -> None:
        """Send text frames, one ``send_all`` per write (two where a write is split). The
        frames are encoded and written under the write lock, so a ping's answer can come
        between two writes but never inside one; the task yields between writes, as
        ``Exchange.write`` does."""
        async with self.lock:
            for index, write in enumerate(writes):
                if self.ws.state is not ConnectionState.OPEN:
                    raise WebSocketClosed(self.close_code)
                data = b"".join(
                    self.ws.send(Message(data=frame.text, message_finished=frame.finished))
                    for frame in write.frames
                )
                pieces = [data]
                if write.split_at is not None and len(data) > 1:
                    at = min(len(data) - 1, max(1, int(len(data) * write.split_at)))
                    pieces = [data[:at], data[at:]]
                for number, piece in enumerate(pieces):
                    if index or number:
                        await trio.lowlevel.checkpoint()
                    try:
                        await self.stream.send_all(piece)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        raise WebSocketClosed(self.close_code) from exc

    async def send_bytes(self, data: bytes) -> None:
        await self._write(Message(data=data))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (the reader finishes the handshake)."""
        if self.close_code is None:
            self.close_code = code
        with contextlib.suppress(WebSocketClosed):
            await self._write(CloseConnection(code=code, reason=reason))

    async def receive(self) -> str | bytes:
        assert self.receive_channel is not None
        try:
            return await self.receive_channel.receive()
        except trio.EndOfChannel:
            raise WebSocketClosed(self.close_code) from None

    async def _reader(self, send: trio.MemorySendChannel[str | bytes]) -> None:
        """Read frames until the connection ends; answer pings and close frames."""
        async with send:
            while True:
                for event in self.ws.events():
                    if isinstance(event, TextMessage | BytesMessage):
                        self.parts.append(
                            bytes(event.data) if isinstance(event.data, bytearray) else event.data
                        )
                        self.part_size += len(event.data)
                        if self.part_size > MAX_WS_MESSAGE:
                            await self.close(1009, "message too big")
                            return
                        if event.message_finished:
                            joined: str | bytes = (
                                "".join(p for p in self.parts if isinstance(p, str))
                                if isinstance(event, TextMessage)
                                else b"".join(p for p in self.parts if isinstance(p, bytes))
                            )
                            self.parts.clear()
                            self.part_size = 0
                            await send.send(joined)
                    elif isinstance(event, Ping):
                        try:
                            await self._write(event.response())
                        except WebSocketClosed:
                            return
                    elif isinstance(event, Pong):
                        self.pong.set()
                    elif isinstance(event, CloseConnection):
                        if self.close_code is None:
                            self.close_code = event.code
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            with contextlib.suppress(WebSocketClosed):
                                await self._write(event.response())
                        return
                data = await _receive(self.stream)
                if not data:
                    if self.close_code is None:
                        self.close_code = 1006
                    return
                try:
                    self.ws.receive_data(data)
                except Exception:  # wsproto raises on protocol violations
                    await self.close(1002, "protocol error")
                    return


# what ends an exchange because the peer is gone (or was dropped on purpose)
_GONE = (ConnectionGone, WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError)


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection, peer: str
) -> Request | None:
    """Read one request with its body; ``None`` at a clean end of the connection."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await _receive(stream)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            if head is not None and event is h11.PAUSED:
                break
            return None
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            break
    assert head is not None
    target = head.target.decode("latin-1")
    parts = urlsplit(target)
    return Request(
        method=head.method.decode("ascii"),
        target=target,
        path=parts.path,
        query=parse_qs(parts.query),
        headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers],
        body=bytes(body),
        peer=peer,
    )


async def _watch_for_close(
    stream: trio.SocketStream, conn: h11.Connection, scope: trio.CancelScope
) -> None:
    """While a handler answers, notice the client going away and cancel the handler."""
    while True:
        data = await _receive(stream)
        if not data:
            scope.cancel()
            return
        conn.receive_data(data)  # pipelined bytes: kept for the next cycle


async def serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    """Serve one TCP connection until it closes. Never raises."""
    try:
        sockname = stream.socket.getpeername()
        peer = f"{sockname[0]}:{sockname[1]}"
    except OSError:
        peer = "?"
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1024 * 1024)
    try:
        while True:
            try:
                request = await _read_request(stream, conn, peer)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    body = b'{"error":{"message":"bad request","type":"invalid_request_error","code":"bad_request","param":null}}'
                    try:
                        data = conn.send(
                            h11.Response(
                                status_code=status,
                                headers=[
                                    ("content-type", "application/json"),
                                    ("content-length", str(len(body))),
                                    ("connection", "close"),
                                ],
                            )
                        )
                        await stream.send_all(
                            (data or b"")
                            + (conn.send(h11.Data(data=body)) or b"")
                            + (conn.send(h11.EndOfMessage()) or b"")
                        )
                    except (
                        trio.BrokenResourceError,
                        trio.ClosedResourceError,
                        h11.LocalProtocolError,
                    ):
                        pass
                return
            if request is None:
                return
            exchange = Exchange(stream, conn, request)
            if request.is_websocket:
                await handler(request, exchange)
                if exchange.websocket is not None or not exchange.finished:
                    return
            else:
                exchange.watched = True
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_for_close, stream, conn, nursery.cancel_scope)
                    try:
                        await handler(request, exchange)
                    except _GONE:
                        exchange.closed = True
                    nursery.cancel_scope.cancel()
                if exchange.closed or not exchange.finished:
                    return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except _GONE:
        pass
    except Exception:
        # a bug in one exchange must never take the listener (and every other client) down
        log.exception("mock connection handler failed", peer=peer)
    finally:
        await trio.aclose_forcefully(stream)


async def run_websocket(
    ws: WebSocket,
    session: Callable[[WebSocket], Awaitable[None]],
    keepalive: Callable[[WebSocket], Awaitable[None]] | None = None,
) -> None:
    """Run ``session`` with a reader task; the session ends when the peer goes away. A
    ``keepalive`` task (pings) runs beside it; when it returns (it closed the socket), the
    peer gets a moment to answer the close, then the session ends."""
    send, receive = trio.open_memory_channel[str | bytes](16)
    ws.send_channel, ws.receive_channel = send, receive
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            await ws._reader(send)
            nursery.cancel_scope.cancel()

        async def keeper(keepalive: Callable[[WebSocket], Awaitable[None]]) -> None:
            await keepalive(ws)
            await trio.sleep(1)  # (the reader ends the session when the close is answered)
            nursery.cancel_scope.cancel()

        nursery.start_soon(reader)
        if keepalive is not None:
            nursery.start_soon(keeper, keepalive)
        with contextlib.suppress(WebSocketClosed):
            await session(ws)
        if ws.ws.state is ConnectionState.OPEN:
            await ws.close(1000)
        if ws.ws.state is ConnectionState.LOCAL_CLOSING:
            # we sent a close frame: give the peer a moment to answer it before the TCP
            # close (the reader cancels this scope when the answer arrives)
            with trio.move_on_after(1):
                await trio.sleep(math.inf)
        nursery.cancel_scope.cancel()


async def serve_listeners(
    handler: Handler,
    host: str,
    port: int,
    *,
    track: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0 = any free port) and report the bound port. ``track``, if
    given, is entered for the life of each connection (its socket is closed before it exits)."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)

    async def on_connection(stream: trio.SocketStream) -> None:
        with track() if track is not None else contextlib.nullcontext():
            await serve_connection(stream, handler)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])
