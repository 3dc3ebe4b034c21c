"""One HTTP/1.1 request and its response as ASGI ``receive``/``send`` (trioproxy's server:
``web/serving.py``).

Theory of operation:

* ``receive()`` returns the request body as it arrives; after the body it waits for the
  client to go away (``http.disconnect``), so an app's disconnect watcher is told at once
  (hypercorn, by contrast, never cancels the app). Bytes a client pipelines meanwhile are
  parsed and kept for the next request, up to ``max_pipelined_bytes``.
* A response head is held until the first body message and written with it (the ASGI spec
  allows this) by ``protocol/http1.py``; a body of unknown length is chunked for an HTTP/1.1
  client and ends with the connection for an HTTP/1.0 one. Every write goes to the kernel
  directly, and only what it does not take waits (``SocketWriter``). Writes are not
  shielded: a handler that is cancelled is not pinned by a client that stopped reading, and
  ``TCP_USER_TIMEOUT`` on the listening socket (server.py) cuts such a client off.

* The body's bytes are charged to the server's request-memory budget (``web/budget.py``) as
  they are handed to the app, and held until the exchange ends (the app keeps them, or what
  it makes of them, until it answers). A body past ``max_body_bytes`` is answered
  ``413 payload_too_large``; one the budget cannot hold ``429 proxy_overloaded``
  (``x-trioproxy-overload: memory``); one that comes too slowly ``408 request_timeout``:
  silent for ``body_timeout``, or slower on average than ``body_min_rate`` bytes per second
  after ``body_min_rate_grace`` seconds, counting only the time the server waited for it. The
  app then receives ``http.disconnect`` and the connection closes after the answer.
* An HTTP/1.0 request with ``Transfer-Encoding`` is answered, then its connection closes
  (RFC 9112 6.1: its framing cannot be trusted).

Error handling: an exception from the app is logged; the client gets a 500 envelope if
nothing was sent yet, else the connection is closed mid-response (the client sees the body
end early). A body that cannot be parsed is answered 400 if the app did not answer.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from trioproxy.logs import get_logger
from trioproxy.protocol import http1 as wire
from trioproxy.streams import PeerGone
from trioproxy.web.asgi import Message
from trioproxy.web.budget import BudgetFull, Reservation
from trioproxy.web.connection import END, Connection, Failed, Head, date_header

log = get_logger("trioproxy.server")
NO_BODY_STATUS = frozenset({204, 304})
DISCONNECT = {"type": "http.disconnect"}


@attrs.define(eq=False)
class HTTPCycle:
    """One HTTP request and its response, as ASGI ``receive``/``send``."""

    conn: Connection
    request: Head
    scope: dict[str, Any] = attrs.field(init=False)
    body_done: bool = False  # the request's body was read to its end
    head: tuple[int, list[tuple[bytes, bytes]]] | None = None  # held until the first body
    head_sent: bool = False
    complete: bool = False  # the whole response went out
    closed: bool = False  # the client is gone or a write failed: sends are dropped
    bad_body: bool = False  # the request body could not be parsed
    suppress_body: bool = False
    chunked: bool = False  # the body goes out in chunks
    length_left: int | None = None  # bytes the response's content-length still promises
    must_close: bool = False  # the connection ends after this response
    continued: bool = False  # "100 Continue" went out
    reservation: Reservation | None = None  # the body's bytes, while the app runs
    received: int = 0  # body bytes handed to the app
    body_waited: float = 0.0  # seconds spent waiting for the body's bytes

    def __attrs_post_init__(self) -> None:
        self.scope = self.conn.scope(self.request, "http")
        if self.request.http_version == b"1.0" and self.request.header(b"transfer-encoding"):
            self.must_close = True

    def reusable(self) -> bool:
        """Whether the connection can carry the next request: the response is whole, and
        the request's body was read to its end (what of it is already here is skipped)."""
        if not self.complete or self.closed or self.must_close or self.conn.writer.broken:
            return False
        return self.body_done or self._skip_body()

    def _skip_body(self) -> bool:
        requests = self.conn.requests
        while requests.events:
            event = requests.pop()
            if event is END:
                self.body_done = True
                return True
            if isinstance(event, Failed | Head):
                return False
        return False

    async def run(self) -> None:
        with self.conn.server.budget.reserve() as self.reservation:
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

    async def _fail(
        self,
        status: int,
        message: str,
        code: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        type_: str | None = None,
    ) -> None:
        if self.head_sent or self.closed:
            self.must_close = True
            return
        self.head_sent = self.complete = self.must_close = True
        await self.conn.write_error(status, message, code, headers, type_, self.request.target)

    async def _refuse_body(self, size: int) -> bool:
        """Charge ``size`` more body bytes; answer and return True when they are refused."""
        config = self.conn.server.config
        self.received += size
        if self.received > config.largest_body:
            await self._fail(
                413,
                f"The request body is larger than {config.largest_body} bytes.",
                "payload_too_large",
            )
            return True
        assert self.reservation is not None
        try:
            self.reservation.grow(size)
        except BudgetFull:
            await self._fail(
                429,
                "The server holds as many request bytes as it may; try again shortly.",
                "proxy_overloaded",
                (
                    (b"retry-after", str(config.overload_retry_after).encode()),
                    (b"x-trioproxy-overload", b"memory"),
                ),
                type_="server_overloaded",
            )
            return True
        return False

    # -- receive ------------------------------------------------------------------------------
    async def receive(self) -> Message:
        if self.closed or self.complete:
            return DISCONNECT
        if not self.body_done and not self.bad_body:
            try:
                return await self._read_body()
            except PeerGone:
                self.closed = True
                return DISCONNECT
        await self.conn.wait_until_gone()  # pipelined requests are parsed and kept meanwhile
        self.closed = True
        return DISCONNECT

    async def _read_body(self) -> Message:
        conn = self.conn
        requests = conn.requests
        events = requests.events
        if (
            not self.continued
            and not self.head_sent
            and self.request.header(b"expect") == b"100-continue"
            and END not in events
        ):
            self.continued = True
            await conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            if events:
                event = requests.pop()
                if event is END:
                    self.body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                if isinstance(event, bytes):
                    pieces = [event]
                    while events and isinstance(events[0], bytes):
                        pieces.append(requests.pop())
                    body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    done = bool(events) and events[0] is END  # often the end came with it
                    if done:
                        requests.pop()
                    if await self._refuse_body(len(body)):
                        return DISCONNECT
                    self.body_done = done
                    return {"type": "http.request", "body": body, "more_body": not done}
                # a Failed event: the body does not parse (a Head cannot come before END)
                self.bad_body = True
                self.must_close = True
                return DISCONNECT
            if conn.backlog:
                conn.parse_backlog()
                if events:
                    continue
            if conn.eof:
                raise PeerGone()
            began = trio.current_time()
            with trio.move_on_at(self._body_deadline(began)) as waited:
                await conn.read_more()
            self.body_waited += trio.current_time() - began
            if waited.cancelled_caught:
                await self._fail(
                    408, "The request body took too long to arrive.", "request_timeout"
                )
                return DISCONNECT

    def _body_deadline(self, now: float) -> float:
        """When the wait for more of the body ends: after ``body_timeout`` of silence, or
        when the body has been slower than ``body_min_rate`` (module docstring)."""
        config = self.conn.server.config
        deadline = now + config.body_timeout
        if config.body_min_rate > 0:
            allowed = config.body_min_rate_grace + self.received / config.body_min_rate
            deadline = min(deadline, now + max(0.0, allowed - self.body_waited))
        return deadline

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
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out = b"" if self.head_sent else self._head()
        if body and not self.suppress_body:
            if self.chunked:
                out += wire.chunk(body)
            else:
                if self.length_left is not None:
                    if len(body) > self.length_left:
                        raise RuntimeError("response body longer than its content-length")
                    self.length_left -= len(body)
                out += body
        if not more:
            if self.chunked:
                out += wire.LAST_CHUNK
            elif self.length_left:  # shorter than promised: only the close can say so
                self.must_close = True
            self.complete = True
        if out and not await self.conn.write(out):
            self.closed = True

    def _head(self) -> bytes:
        """The response head as bytes. The body is chunked when its length is not given to
        an HTTP/1.1 client, and ends with the connection for an HTTP/1.0 one."""
        assert self.head is not None
        status, headers = self.head
        out: list[tuple[bytes, bytes]] = []
        conn = self.conn
        close = (
            self.must_close
            or conn.server.draining
            or self.request.wants_close
            or conn.upgraded is not None
        )
        dated = False
        if not self.body_done and END not in self.conn.requests.events:
            # answered before the whole body arrived (a 401, a 413, a 429 before reading):
            # the client must not send its next request on this connection, whose unread
            # bytes we cannot tell from that request
            close = True
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                continue  # the body's framing is decided here
            if lowered == b"connection":
                close = close or wire.has_token(value, b"close")
                continue  # written once, below
            dated = dated or lowered == b"date"
            if lowered == b"content-length" and not self.suppress_body:
                try:
                    self.length_left = int(value)
                except ValueError:
                    raise RuntimeError(f"bad content-length {value!r}") from None
            out.append((name, value))
        if self.length_left is None and not self.suppress_body:
            if self.request.http_version == b"1.1":
                self.chunked = True
                out.append((b"transfer-encoding", b"chunked"))
            else:
                close = True
        if not dated:
            out.append(date_header())
        if close:
            out.append((b"connection", b"close"))
            self.must_close = True
        head = wire.response_head(status, wire.reason(status), out)
        self.head_sent = True
        return head
