"""ASGI WebSockets on a connection of trioproxy's HTTP server (serving.py), with wsproto.

Theory of operation: an upgrade request becomes one :class:`WebSocketCycle`, which runs the
app in the connection's task. Until the app accepts, the connection is still HTTP/1.1: the
app may refuse with an HTTP answer (the ASGI ``websocket.http.response`` extension, which
the proxy uses to answer 429 or 401 before any handshake), and ``receive()`` only waits for
the client to go away. After the accept, ``receive()`` reads frames when the app asks for
the next message: it answers pings and the client's close frame itself, reassembles
fragmented messages up to ``max_ws_message_bytes`` (past it: close 1009), and turns a frame
wsproto cannot parse into a close with wsproto's code (1002, 1007). The proxy's sessions
always have a reader task waiting in ``receive()``, so control frames are answered at once;
there is no reader task of the server's own (one task and no queue per idle socket).

``permessage-deflate`` is agreed when the client offers it (the Codex CLI does), with
inflation bounded (``web/deflate.py``).

Memory: a message is charged to the server's request-memory budget (``web/budget.py``) while
it is assembled, and given back when it is handed to the app. A message the budget cannot
hold closes the socket with 1013 (try again later); one past ``max_ws_message_bytes``, or
that would inflate past it, with 1009.

Liveness: a socket the client has sent nothing on for ``ws_ping_interval`` seconds gets a
ping; if nothing at all comes back in ``ws_ping_timeout`` seconds the client is taken for
gone (a peer that vanished without a FIN never makes a read fail) and the socket is closed
with 1011. The clock runs while the app waits in ``receive()``, which the proxy's sessions
always do.

Resource handling: as for HTTP, the socket is the connection task's. When the app returns,
an accepted socket that is still open is closed with 1011 (the app ended without saying
why); after a close frame of ours the server waits up to ``ws_close_timeout`` for the
client's before closing the TCP connection.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import attrs
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.events import Message as WSMessage
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import LocalProtocolError, generate_accept_token, split_comma_header

from trioproxy.logs import get_logger
from trioproxy.protocol.http1 import reason, response_head
from trioproxy.streams import receive_some
from trioproxy.web.asgi import Message, Scope
from trioproxy.web.budget import BudgetFull, Reservation
from trioproxy.web.connection import Connection, Head, date_header
from trioproxy.web.deflate import BoundedDeflate

log = get_logger("trioproxy.server")
ABNORMAL = 1006
INTERNAL_ERROR = 1011
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013


@attrs.frozen
class Handshake:
    """What the upgrade request asks for."""

    key: bytes | None
    version: bytes | None
    connection_upgrade: bool
    extensions: list[str]
    subprotocols: list[str]

    @classmethod
    def of(cls, request: Head) -> Handshake:
        key = version = None
        upgrade = False
        extensions: list[str] = []
        subprotocols: list[str] = []
        for name, value in request.headers:
            if name == b"sec-websocket-key":
                key = value
            elif name == b"sec-websocket-version":
                version = value
            elif name == b"connection":
                upgrade = upgrade or any(
                    token.lower() == "upgrade" for token in split_comma_header(value)
                )
            elif name == b"sec-websocket-extensions":
                extensions += split_comma_header(value)
            elif name == b"sec-websocket-protocol":
                subprotocols += split_comma_header(value)
        return cls(key, version, upgrade, extensions, subprotocols)

    @property
    def problem(self) -> str | None:
        if not self.key:
            return "Sec-WebSocket-Key is missing"
        if self.version != b"13":
            return "Sec-WebSocket-Version must be 13"
        if not self.connection_upgrade:
            return "Connection: Upgrade is missing"
        return None


async def serve_websocket(conn: Connection, request: Head) -> None:
    """Serve one upgrade request on ``conn`` (which closes when this returns)."""
    handshake = Handshake.of(request)
    problem = handshake.problem if request.http_version == b"1.1" else "HTTP/1.1 is required"
    if problem is None and conn.upgraded is None:
        problem = "the request is not an upgrade"
    if problem is not None:
        await conn.write_error(400, f"Bad WebSocket upgrade: {problem}.", "bad_request")
        return
    cycle = WebSocketCycle(conn, request, handshake)
    conn.server.websockets_open += 1
    try:
        await cycle.run()
    finally:
        conn.server.websockets_open -= 1


@attrs.define(eq=False)
class WebSocketCycle:
    """One WebSocket as ASGI ``receive``/``send``.

    ``state``: ``handshake`` (not answered yet), ``response`` (an HTTP refusal under way),
    ``connected`` (accepted), ``done`` (refused, or closed by either side)."""

    conn: Connection
    request: Head
    handshake: Handshake
    scope: Scope = attrs.field(init=False)
    state: str = "handshake"
    connect_sent: bool = False
    gone: bool = False  # the client went away (or a write failed)
    close_code: int | None = None
    ws: WSConnection | None = None
    refusal: tuple[int, list[tuple[bytes, bytes]]] | None = None
    refusal_sent: bool = False  # the refusal's status line and headers went out
    deflate: BoundedDeflate | None = None  # when agreed
    _parts: list[Any] = attrs.field(factory=list)
    _size: int = 0
    _heard: float = 0.0  # when the client last sent anything
    _pinged: float | None = None  # when our unanswered ping went out

    def __attrs_post_init__(self) -> None:
        scope = self.conn.scope(self.request, "websocket")
        scope["subprotocols"] = self.handshake.subprotocols
        self.scope = scope

    async def run(self) -> None:
        try:
            await self.conn.server.app(self.scope, self.receive, self.send)
        except Exception:
            log.exception("application error", path=self.scope["path"])
        if self.gone:
            return
        if self.state == "handshake":
            await self.conn.write_error(500, "Internal server error.", "internal_error")
        elif self.state == "connected":
            await self._close(INTERNAL_ERROR, "")
        await self._await_close_reply()

    # -- receive ------------------------------------------------------------------------------
    async def receive(self) -> dict[str, Any]:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        if self.state == "connected" and not self.gone:
            return await self._next_message()
        if not self.gone and self.state in ("handshake", "response"):
            # before the handshake is answered; a client that sends more frames ahead than
            # are kept is taken for gone (its stream could not be read on)
            await self.conn.wait_until_gone(past_bound=False)
            self.gone = True
        return {"type": "websocket.disconnect", "code": self.close_code or ABNORMAL}

    async def _next_message(self) -> dict[str, Any]:
        """The next message, charged to the budget while it is assembled."""
        with self.conn.server.budget.reserve() as reservation:
            try:
                return await self._assemble(reservation)
            finally:
                self._parts, self._size = [], 0

    async def _assemble(self, reservation: Reservation) -> dict[str, Any]:
        ws = self.ws
        assert ws is not None
        limit = self.conn.server.config.max_ws_message_bytes
        while True:
            self._bound_inflation()
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    data = event.data
                    self._parts.append(data)
                    self._size += len(data)
                    if self._size > limit:
                        await self._close(MESSAGE_TOO_BIG, "message too big")
                        return self._disconnected(MESSAGE_TOO_BIG)
                    try:
                        reservation.grow(
                            sys.getsizeof(data) if isinstance(data, str) else len(data)
                        )
                    except BudgetFull:
                        await self._close(TRY_AGAIN_LATER, "server busy, try again later")
                        return self._disconnected(TRY_AGAIN_LATER)
                    if event.message_finished:
                        return self._message(isinstance(event, TextMessage))
                    self._bound_inflation()
                elif isinstance(event, Ping):
                    await self._send_frame(event.response())
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._send_frame(event.response())  # the close handshake
                    elif ws.state is ConnectionState.OPEN:
                        # a frame wsproto could not parse (or a message refused while it was
                        # inflated): say so, with its code
                        await self._close(event.code, event.reason or "")
                    return self._disconnected(event.code)
            received = await self._receive_alive()
            if received is None:  # our ping went unanswered
                await self._close(INTERNAL_ERROR, "ping timeout")
                self.gone = True
                return self._disconnected(INTERNAL_ERROR)
            if not received:
                self.gone = True
                return self._disconnected(ABNORMAL)
            ws.receive_data(received)

    def _bound_inflation(self) -> None:
        """Let a compressed message inflate only as far as it may grow (web/deflate.py)."""
        if self.deflate is None:
            return
        room = self.conn.server.config.max_ws_message_bytes - self._size
        available = self.conn.server.budget.available()
        if room <= available:
            self.deflate.limit(room, CloseReason.MESSAGE_TOO_BIG)
        else:
            self.deflate.limit(available, CloseReason.TRY_AGAIN_LATER)

    async def _receive_alive(self) -> bytes | None:
        """The client's next bytes (b"" when it closed or the connection broke), or None
        when it left a ping unanswered (module docstring)."""
        config = self.conn.server.config
        while True:
            if config.ws_ping_interval <= 0:
                deadline = math.inf
            elif self._pinged is None:
                deadline = self._heard + config.ws_ping_interval
            else:
                deadline = self._pinged + config.ws_ping_timeout
            with trio.move_on_at(deadline) as waited:
                try:
                    data = await receive_some(self.conn.stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
            if not waited.cancelled_caught:
                self._heard = trio.current_time()
                self._pinged = None
                return data
            if self._pinged is not None:
                return None
            self._pinged = trio.current_time()
            await self._send_frame(Ping(payload=b"trioproxy"))
            if self.gone:
                return b""

    def _message(self, text: bool) -> dict[str, Any]:
        parts = self._parts
        if text:
            return {"type": "websocket.receive", "text": "".join(parts), "bytes": None}
        return {"type": "websocket.receive", "bytes": b"".join(parts), "text": None}

    def _disconnected(self, code: int) -> dict[str, Any]:
        self.state = "done"
        if self.close_code is None:
            self.close_code = code
        return {"type": "websocket.disconnect", "code": self.close_code}

    # -- send ---------------------------------------------------------------------------------
    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.gone or self.state == "done":
            return  # the app may finish after the socket is gone
        if kind == "websocket.send" and self.state == "connected":
            data = message.get("bytes")
            text = message.get("text")
            if data is None and not isinstance(text, str):
                raise TypeError("websocket.send needs 'text' (str) or 'bytes'")
            await self._send_frame(WSMessage(data=bytes(data) if data is not None else text))
        elif kind == "websocket.accept" and self.state == "handshake":
            await self._accept(message)
        elif kind == "websocket.close" and self.state == "connected":
            await self._close(int(message.get("code", 1000)), message.get("reason") or "")
        elif kind == "websocket.close" and self.state == "handshake":
            await self._refuse(403, [], b"", more=False)
        elif kind == "websocket.http.response.start" and self.state == "handshake":
            self.refusal = (int(message["status"]), list(message.get("headers", [])))
            self.state = "response"
        elif kind == "websocket.http.response.body" and self.state == "response":
            assert self.refusal is not None
            status, headers = self.refusal
            await self._refuse(
                status, headers, message.get("body", b""), more=message.get("more_body", False)
            )
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in WebSocket state {self.state}")

    async def _accept(self, message: Message) -> None:
        handshake = self.handshake
        assert handshake.key is not None
        headers: list[tuple[bytes, bytes]] = [
            date_header(),
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(handshake.key)),
        ]
        subprotocol = message.get("subprotocol")
        if subprotocol is not None:
            if subprotocol not in handshake.subprotocols:
                raise RuntimeError(f"subprotocol {subprotocol!r} was not offered")
            headers.append((b"sec-websocket-protocol", subprotocol.encode()))
        deflate = BoundedDeflate()
        extensions: list[Extension] = [deflate]
        agreed = (
            server_extensions_handshake(handshake.extensions, extensions)
            if handshake.extensions
            else None
        )
        if agreed:
            headers.append((b"sec-websocket-extensions", agreed))
            self.deflate = deflate
        for name, value in message.get("headers", []):
            if name.lower() not in (b"sec-websocket-protocol", b"sec-websocket-extensions"):
                headers.append((name, value))
        data = response_head(101, b"Switching Protocols", headers)
        self.ws = WSConnection(ConnectionType.SERVER, extensions=extensions if agreed else None)
        trailing, self.conn.upgraded = self.conn.upgraded, None
        if trailing:  # frames the client sent right behind its upgrade request
            self.ws.receive_data(bytes(trailing))
        self.state = "connected"
        self._heard = trio.current_time()
        if not await self.conn.write(data):
            self.gone = True

    async def _refuse(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, more: bool
    ) -> None:
        out = b""
        if not self.refusal_sent:
            # the connection closes after a refusal, which also ends a body of unknown length
            if not any(name.lower() == b"connection" for name, _ in headers):
                headers = [*headers, (b"connection", b"close")]
            if not any(name.lower() == b"date" for name, _ in headers):
                headers = [date_header(), *headers]
            out = response_head(status, reason(status), headers)
            self.refusal_sent = True
        if body and status not in (204, 304):
            out += body
        self.state = "response" if more else "done"
        if not await self.conn.write(out):
            self.gone = True

    async def _send_frame(self, event: Any) -> None:
        assert self.ws is not None
        try:
            data = self.ws.send(event)
        except LocalProtocolError:
            return  # not allowed in this state (a close already sent): nothing to do
        if not await self.conn.write(data):
            self.gone = True

    async def _close(self, code: int, why: str) -> None:
        if self.close_code is None:
            self.close_code = code
        if self.ws is not None and self.ws.state is ConnectionState.OPEN:
            await self._send_frame(CloseConnection(code=code, reason=why))
        self.state = "done"

    async def _await_close_reply(self) -> None:
        """After our close frame, give the client a moment to answer with its own."""
        ws = self.ws
        if ws is None or self.gone or ws.state is not ConnectionState.LOCAL_CLOSING:
            return
        with trio.move_on_after(self.conn.server.config.ws_close_timeout):
            while ws.state is ConnectionState.LOCAL_CLOSING:
                for _ in ws.events():
                    pass
                if ws.state is not ConnectionState.LOCAL_CLOSING:
                    return
                try:
                    data = await receive_some(self.conn.stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if not data:
                    return
                ws.receive_data(bytes(data))
