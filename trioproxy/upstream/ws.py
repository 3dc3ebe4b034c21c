"""The upstream WebSocket client: one connection to ``{UPSTREAM}/codex/responses``.

Why not trio-websocket: on this stack it leaks the client's TCP stream when a handshake is
rejected and when the *server* starts the close handshake (its ``aclose()`` returns early
once a close reason is set). Both are everyday events upstream (429 on upgrade, 1011 closes),
and every leaked socket is capacity the proxy never gets back. This client is small: wsproto
for framing, one ``trio.abc.Stream`` it always closes, no background task (the owner's task
reads; pings are answered inline under the write lock).

Reading is cancellation-safe, so a reader can hand the socket to another at any moment (the
conversation's between-turns reader does, when a turn starts): a cancelled ``receive_some``
loses nothing (what was read is fed to wsproto before the next checkpoint, and a message
already whole waits in the socket for the next ``receive``), and a control frame's answer
(a pong, a close) is written whole, shielded and bounded by ``CONTROL_WRITE_TIMEOUT`` (past
it the stream is closed: a half-written frame would corrupt it). Over TLS, a read cancelled
while TLS itself has to write (a key update) leaves the stream broken; the next read or
write sees a closed socket.

Resource handling: ``open_upstream_websocket`` is an async context manager; on exit the
socket is closed (a close frame, a bounded wait for the answer, then the TCP close, shielded
so cancellation cannot skip it).

Error handling: a refused handshake raises ``UpstreamRejected`` (status, headers, body); a
connect or TLS failure raises ``UpstreamConnectError``; a close, EOF or reset while reading
raises ``UpstreamClosed`` with the close code (1006 when there was no close frame).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

READ_SIZE = 65536
CONTROL_WRITE_TIMEOUT = 10.0  # seconds a pong or close answer may take to write
_PONG_ALLOWED = (ConnectionState.OPEN,)
_CLOSE_ALLOWED = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)


class UpstreamConnectError(Exception):
    """TCP/TLS connection to upstream failed."""


class UpstreamRejected(Exception):
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"upstream refused the WebSocket handshake with {status}")
        self.status = status
        self.headers = headers
        self.body = body


class UpstreamClosed(Exception):
    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"upstream WebSocket closed ({code})")
        self.code = code
        self.reason = reason


_DEFAULT_SSL: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _DEFAULT_SSL
    if _DEFAULT_SSL is None:
        _DEFAULT_SSL = ssl.create_default_context()
    return _DEFAULT_SSL


@attrs.define(eq=False)
class UpstreamWebSocket:
    stream: trio.abc.Stream
    ws: WSConnection
    handshake_headers: list[tuple[str, str]]
    max_message: int
    lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)
    parts: list[str | bytes] = attrs.field(factory=list)
    size: int = 0
    close_code: int | None = None
    opened_at: float = attrs.field(factory=trio.current_time)
    _pending: list[str | bytes] = attrs.field(factory=list)

    async def _flush(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close_code = self.close_code or 1006
            raise UpstreamClosed(self.close_code) from exc

    async def send_text(self, text: str) -> None:
        async with self.lock:
            if self.ws.state is not ConnectionState.OPEN:
                raise UpstreamClosed(self.close_code or 1006)
            await self._flush(self.ws.send(Message(data=text)))

    @property
    def holding(self) -> bool:
        """A whole message was read and waits for the next ``receive``."""
        return bool(self._pending)

    async def receive(self) -> str | bytes:
        """The next whole message; answers pings on the way."""
        if not self._pending:
            await self.wait_message()
        return self._pending.pop(0)

    async def wait_message(self) -> None:
        """Read until a whole message is held (for the next ``receive``), answering pings on
        the way; ``UpstreamClosed`` when the socket closes first. Cancellation-safe (see the
        module docstring)."""
        while not self._pending:
            for event in self.ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    self.parts.append(
                        bytes(event.data) if isinstance(event.data, bytearray) else event.data
                    )
                    self.size += len(event.data)
                    if self.size > self.max_message:
                        self.parts.clear()
                        self.size = 0
                        if self.ws.state is ConnectionState.OPEN:
                            with contextlib.suppress(UpstreamClosed):
                                await self._answer(CloseConnection(code=1009))
                        raise UpstreamClosed(1009, "message too big")
                    if event.message_finished:
                        joined: str | bytes
                        if isinstance(event, TextMessage):
                            joined = "".join(p for p in self.parts if isinstance(p, str))
                        else:
                            joined = b"".join(
                                bytes(p) for p in self.parts if not isinstance(p, str)
                            )
                        self.parts.clear()
                        self.size = 0
                        self._pending.append(joined)
                elif isinstance(event, Ping):
                    await self._answer(event.response())
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        with contextlib.suppress(UpstreamClosed):
                            await self._answer(event.response())
                    if not self._pending:
                        raise UpstreamClosed(event.code, event.reason or "")
            if self._pending:
                return
            try:
                data = await self.stream.receive_some(READ_SIZE)  # (the only checkpoint)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.close_code = self.close_code or 1006
                raise UpstreamClosed(self.close_code) from exc
            if not data:
                self.close_code = self.close_code or 1006
                raise UpstreamClosed(self.close_code)
            self.ws.receive_data(bytes(data))

    async def _answer(self, event: Pong | CloseConnection) -> None:
        """Write a control frame whole: shielded from cancellation (a cancelled write could
        leave half a frame on the stream), bounded by ``CONTROL_WRITE_TIMEOUT``; past it the
        stream is closed and ``UpstreamClosed`` raised."""
        with trio.CancelScope(shield=True) as writing:
            writing.deadline = trio.current_time() + CONTROL_WRITE_TIMEOUT
            async with self.lock:
                closing = isinstance(event, CloseConnection)
                if self.ws.state in (_CLOSE_ALLOWED if closing else _PONG_ALLOWED):
                    await self._flush(self.ws.send(event))  # (no pong once a close was sent)
        if writing.cancelled_caught:
            self.close_code = self.close_code or 1006
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
            raise UpstreamClosed(self.close_code)

    async def close(self, code: int = 1000) -> None:
        """Send a close frame if the socket is open (does not wait)."""
        async with self.lock:
            if self.ws.state is ConnectionState.OPEN:
                with contextlib.suppress(UpstreamClosed):
                    await self._flush(self.ws.send(CloseConnection(code=code)))

    async def aclose(self, code: int = 1000, wait: float = 1.0) -> None:
        """Close politely (bounded), then close TCP. Idempotent and cancellation-safe."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(wait):
                await self.close(code)
                if self.ws.state is ConnectionState.LOCAL_CLOSING:
                    with contextlib.suppress(UpstreamClosed):
                        while True:
                            await self.receive()
            await trio.aclose_forcefully(self.stream)


async def _open_stream(host: str, port: int, tls: bool, limit: float) -> trio.abc.Stream:
    try:
        with trio.fail_after(limit):
            tcp = await trio.open_tcp_stream(host, port)
            if not tls:
                return tcp
            stream = trio.SSLStream(
                tcp, _ssl_context(), server_hostname=host, https_compatible=True
            )
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise UpstreamConnectError(f"cannot connect to {host}:{port}: {exc!r}") from exc


async def connect_upstream_websocket(
    url: str,
    headers: Sequence[tuple[str, str]],
    *,
    connect_timeout: float = 10.0,
    max_message: int = 256 * 1024 * 1024,
) -> UpstreamWebSocket:
    """Connect and do the handshake. The caller owns the socket and must ``aclose()`` it
    (``open_upstream_websocket`` does that for a ``with`` block)."""
    parts = urlsplit(url)
    tls = parts.scheme in ("wss", "https")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if tls else 80)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await _open_stream(host, port, tls, connect_timeout)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        host_header = host if parts.port is None else f"{host}:{port}"
        request = Request(
            host=host_header,
            target=target,
            extra_headers=[(k.encode(), v.encode()) for k, v in headers],
        )
        with trio.fail_after(connect_timeout):
            await stream.send_all(ws.send(request))
            accepted = await _handshake(stream, ws)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise UpstreamConnectError("WebSocket handshake timed out") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return UpstreamWebSocket(stream, ws, accepted, max_message)


@asynccontextmanager
async def open_upstream_websocket(
    url: str,
    headers: Sequence[tuple[str, str]],
    *,
    connect_timeout: float = 10.0,
    max_message: int = 256 * 1024 * 1024,
) -> AsyncIterator[UpstreamWebSocket]:
    """Connect, do the handshake, yield the socket; close it on exit, whatever happens."""
    socket = await connect_upstream_websocket(
        url, headers, connect_timeout=connect_timeout, max_message=max_message
    )
    try:
        yield socket
    finally:
        await socket.aclose()


async def _handshake(stream: trio.abc.Stream, ws: WSConnection) -> list[tuple[str, str]]:
    reject: RejectConnection | None = None
    body = bytearray()
    while True:
        try:
            data = await stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamConnectError(
                f"connection lost during the WebSocket handshake: {exc!r}"
            ) from exc
        if not data:
            if reject is not None:
                raise UpstreamRejected(reject.status_code, _decode(reject.headers), bytes(body))
            raise UpstreamConnectError("connection closed during the WebSocket handshake")
        ws.receive_data(bytes(data))
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return _decode(event.extra_headers)
            if isinstance(event, RejectConnection):
                reject = event
                if not event.has_body:
                    raise UpstreamRejected(event.status_code, _decode(event.headers), b"")
            elif isinstance(event, RejectData):
                body += event.data
                if len(body) > 1024 * 1024:
                    raise UpstreamConnectError("oversized handshake rejection body")
                if event.body_finished and reject is not None:
                    raise UpstreamRejected(reject.status_code, _decode(reject.headers), bytes(body))


def _decode(headers: Any) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]
