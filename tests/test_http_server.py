"""trioproxy's own HTTP/1.1 + WebSocket server (web/http1.py, web/websocket.py), through real
sockets on loopback: framing, keep-alive, bad input, disconnects, drain, lifespan, and the
ASGI WebSocket protocol including refusals and close codes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import h11
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from tests.helpers import wait_until
from trioproxy.web.serving import Server, open_listeners, serve_asgi
from trioproxy.web.state import ServerConfig

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@attrs.define(eq=False)
class Served:
    server: Server
    port: int
    stop: trio.Event
    done: trio.Event


@pytest.fixture
async def serve(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    async def start(app: Any, **config: Any) -> Served:
        server = Server(app, ServerConfig(**config))
        listeners = await open_listeners("127.0.0.1", 0, backlog=4096, user_timeout_ms=None)
        stop, done = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
            try:
                await serve_asgi(
                    server, listeners, shutdown_trigger=stop.wait, task_status=task_status
                )
            finally:
                done.set()

        bound = await nursery.start(run)
        return Served(server, bound[0][1], stop, done)

    yield start


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with what it was asked: method, path, query, the body's length."""
    if scope["type"] == "lifespan":
        return  # no lifespan support: the server serves anyway
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    data = json.dumps(
        {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode(),
            "length": len(body),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


class RawClient:
    """A client that sends exactly the bytes given and parses answers with h11."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def until_closed(self) -> bytes:
        """Every byte the server sends until it closes the connection."""
        data = b""
        while chunk := await self.stream.receive_some(65536):
            data += chunk
        return data

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[h11.Response, bytes]:
        """The next response (h11 is told about the request by ``request``)."""
        head = await self.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return head, body

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("host", "x"), ("content-length", str(len(body))), *headers]
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        data += self.conn.send(h11.EndOfMessage())
        await self.send_raw(data)
        return await self.response()

    async def closed(self, seconds: float = 5.0) -> bool:
        """Whether the server closes the connection within ``seconds`` (reading what is
        left)."""
        with trio.move_on_after(seconds):
            while await self.stream.receive_some(65536):
                pass
            return True
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


def envelope_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


# -- HTTP -----------------------------------------------------------------------------------------
async def test_keep_alive_serves_requests_in_turn_on_one_connection(serve: Any) -> None:
    served = await serve(echo_app)
    client = await RawClient.open(served.port)
    for i in range(3):
        response, body = await client.request("POST", f"/p/{i}?x=1", b"a" * (1000 * i))
        assert response.status_code == 200
        assert json.loads(body) == {
            "method": "POST",
            "path": f"/p/{i}",
            "query": "x=1",
            "length": 1000 * i,
        }
        # no content-length from the app: the body is chunked, the connection stays open
        assert (b"transfer-encoding", b"chunked") in response.headers
    assert served.server.statistics().connections_open == 1
    assert served.server.statistics().requests_total == 3
    await client.aclose()


async def test_pipelined_requests_are_answered_in_order(serve: Any) -> None:
    served = await serve(echo_app)
    client = await RawClient.open(served.port)
    one = b"GET /one HTTP/1.1\r\nhost: x\r\n\r\n"
    two = b"POST /two HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
    await client.send_raw(one + two)
    client.conn.send(h11.Request(method="GET", target="/one", headers=[("host", "x")]))
    client.conn.send(h11.EndOfMessage())
    _, first = await client.response()
    client.conn.start_next_cycle()
    client.conn.send(
        h11.Request(method="POST", target="/two", headers=[("host", "x"), ("content-length", "3")])
    )
    client.conn.send(h11.Data(data=b"abc"))
    client.conn.send(h11.EndOfMessage())
    _, second = await client.response()
    assert json.loads(first)["path"] == "/one"
    assert json.loads(second) == {"method": "POST", "path": "/two", "query": "", "length": 3}
    await client.aclose()


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 200_000 + b"\r\n\r\n", 431,
         "request_header_fields_too_large"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "http_version_not_supported"),
    ],
)  # fmt: skip
async def test_a_malformed_request_gets_an_envelope_and_the_server_keeps_serving(
    serve: Any, raw: bytes, status: int, code: str
) -> None:
    served = await serve(echo_app, max_head_bytes=64 * 1024)
    client = await RawClient.open(served.port)
    await client.send_raw(raw)
    data = await client.until_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"connection: close" in head.lower()
    assert envelope_code(body) == code
    await client.aclose()
    fine = await RawClient.open(served.port)
    response, _ = await fine.request("GET", "/after")
    assert response.status_code == 200
    await fine.aclose()


async def test_a_malformed_chunked_body_is_answered_400(serve: Any) -> None:
    served = await serve(echo_app)
    client = await RawClient.open(served.port)
    await client.send_raw(
        b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n"
    )
    data = await client.until_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert envelope_code(body) == "bad_request"
    await client.aclose()


async def test_expect_100_continue_gets_its_interim_answer(serve: Any) -> None:
    served = await serve(echo_app)
    client = await RawClient.open(served.port)
    await client.send_raw(
        b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
    )
    interim = await client.stream.receive_some(65536)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await client.send_raw(b"hello")
    client.conn.send(
        h11.Request(
            method="POST",
            target="/x",
            headers=[("host", "x"), ("content-length", "5"), ("expect", "100-continue")],
        )
    )
    client.conn.receive_data(interim)
    response, body = await client.response()
    assert response.status_code == 200 and json.loads(body)["length"] == 5
    await client.aclose()


async def test_head_requests_get_no_body(serve: Any) -> None:
    served = await serve(echo_app)
    client = await RawClient.open(served.port)
    response, body = await client.request("HEAD", "/h")
    assert response.status_code == 200 and body == b""
    response, body = await client.request("GET", "/g")  # the connection is still in step
    assert json.loads(body)["path"] == "/g"
    await client.aclose()


async def test_the_app_learns_at_once_that_its_client_left(serve: Any) -> None:
    disconnected = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        assert (await receive())["type"] == "http.request"
        # the body is read; the next receive returns only when the client goes away
        assert (await receive())["type"] == "http.disconnect"
        disconnected.set()

    served = await serve(app)
    client = await RawClient.open(served.port)
    await client.send_raw(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
    await trio.sleep(0.1)
    assert not disconnected.is_set()
    await client.aclose()
    with trio.fail_after(5):
        await disconnected.wait()
    await wait_until(lambda: served.server.statistics().connections_open == 0)


async def test_app_errors_are_contained(serve: Any) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/before":
            raise RuntimeError("boom before the answer")
        if scope["path"] == "/silent":
            return  # no answer at all
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("boom mid-answer")

    served = await serve(app)
    for path in ("/before", "/silent"):
        client = await RawClient.open(served.port)
        response, body = await client.request("GET", path)
        assert response.status_code == 500 and envelope_code(body) == "internal_error"
        assert await client.closed()
        await client.aclose()
    client = await RawClient.open(served.port)
    await client.send_raw(b"GET /mid HTTP/1.1\r\nhost: x\r\n\r\n")
    data = await client.until_closed()
    # the answer started, then the connection closed without its last chunk
    assert data.startswith(b"HTTP/1.1 200 ") and b"partial" in data
    assert not data.endswith(b"0\r\n\r\n")
    await client.aclose()
    fine = await RawClient.open(served.port)  # the server serves on
    response, body = await fine.request("GET", "/silent")
    assert response.status_code == 500 and envelope_code(body) == "internal_error"
    await fine.aclose()


async def test_an_answer_sent_before_the_body_was_read_keeps_the_connection(serve: Any) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"no"})

    served = await serve(app)
    client = await RawClient.open(served.port)
    for _ in range(2):
        response, body = await client.request("POST", "/x", b"x" * 2000)
        assert response.status_code == 401 and body == b"no"
    assert served.server.statistics().connections_total == 1
    await client.aclose()


async def test_an_answer_before_a_body_still_on_its_way_says_connection_close(
    serve: Any,
) -> None:
    """The client must not send its next request on a connection whose unread bytes the
    server cannot tell from that request (a 413 before reading a large body, say)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]}
        )
        await send({"type": "http.response.body", "body": b""})

    served = await serve(app)
    client = await RawClient.open(served.port)
    await client.send_raw(
        b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n" + b"x" * 1000
    )
    client.conn.send(
        h11.Request(
            method="POST", target="/x", headers=[("host", "x"), ("content-length", "10000000")]
        )
    )
    response, _ = await client.response()
    assert response.status_code == 413
    assert (b"connection", b"close") in response.headers
    assert await client.closed()
    await client.aclose()


async def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(serve: Any) -> None:
    served = await serve(echo_app, keep_alive_timeout=0.3)
    client = await RawClient.open(served.port)
    await client.request("GET", "/x")
    assert await client.closed(seconds=5)
    await client.aclose()
    silent = await RawClient.open(served.port)  # a client that never sends a byte
    assert await silent.closed(seconds=5)
    await silent.aclose()


async def test_drain_closes_idle_connections_and_lets_a_request_in_flight_finish(
    serve: Any,
) -> None:
    release = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    served = await serve(app, graceful_timeout=10)
    idle = await RawClient.open(served.port)
    await idle.request("GET", "/quick")
    busy = await RawClient.open(served.port)
    await busy.send_raw(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
    busy.conn.send(h11.Request(method="GET", target="/slow", headers=[("host", "x")]))
    busy.conn.send(h11.EndOfMessage())
    await trio.sleep(0.1)
    served.stop.set()
    assert await idle.closed(seconds=5)  # closed at once
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", served.port)  # the listener is closed
    release.set()
    response, body = await busy.response()
    assert response.status_code == 200 and body == b"done"
    assert (b"connection", b"close") in response.headers
    assert await busy.closed(seconds=5)
    with trio.fail_after(5):
        await served.done.wait()
    await idle.aclose()
    await busy.aclose()


async def test_drain_cancels_what_is_left_after_the_graceful_timeout(serve: Any) -> None:
    cancelled = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    served = await serve(app, graceful_timeout=0.2)
    client = await RawClient.open(served.port)
    await client.send_raw(b"GET /forever HTTP/1.1\r\nhost: x\r\n\r\n")
    await trio.sleep(0.1)
    served.stop.set()
    with trio.fail_after(5):
        await served.done.wait()
    assert cancelled.is_set()
    assert served.server.statistics().connections_open == 0
    await client.aclose()


async def test_lifespan_startup_and_shutdown_run_around_the_server(serve: Any) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                seen.append(message["type"])
                if message["type"] == "lifespan.startup":
                    scope["state"]["ready"] = "yes"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await receive()
        data = scope["state"]["ready"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": data})

    served = await serve(app)
    assert seen == ["lifespan.startup"]
    client = await RawClient.open(served.port)
    _, body = await client.request("GET", "/")
    assert body == b"yes"  # the lifespan state reaches every request's scope
    await client.aclose()
    served.stop.set()
    with trio.fail_after(5):
        await served.done.wait()
    assert seen == ["lifespan.startup", "lifespan.shutdown"]


# -- WebSocket ------------------------------------------------------------------------------------
@attrs.define(eq=False)
class WSClient:
    stream: trio.SocketStream
    ws: WSConnection
    accepted: AcceptConnection | None = None
    rejected: tuple[int, bytes] | None = None
    pending: list[Any] = attrs.field(factory=list)  # events that came with the handshake

    @classmethod
    async def open(
        cls, port: int, path: str = "/ws", extensions: list[Any] | None = None
    ) -> WSClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        client = cls(stream, ws)
        await stream.send_all(ws.send(Request(host="x", target=path, extensions=extensions or [])))
        status = 0
        body = b""
        while client.accepted is None and client.rejected is None:
            data = await stream.receive_some(65536)
            ws.receive_data(data or None)
            for event in ws.events():
                if client.accepted is not None:
                    client.pending.append(event)
                elif isinstance(event, AcceptConnection):
                    client.accepted = event
                elif isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        client.rejected = (status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        client.rejected = (status, body)
        return client

    async def send(self, event: Any) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next(self) -> Any:
        if self.pending:
            return self.pending.pop(0)
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)


async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Accepts /ws and echoes; /deny is refused with 429; /close is refused by a close;
    /quit accepts then returns; /bye closes with 4000 after one message."""
    if scope["type"] != "websocket":
        return
    assert (await receive())["type"] == "websocket.connect"
    path = scope["path"]
    if path == "/deny":
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": b"{}"})
        return
    if path == "/close":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept", "headers": [(b"x-answer", b"42")]})
    if path == "/quit":
        return
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            scope["state"].setdefault("codes", []).append(message["code"])
            return
        if path == "/bye":
            await send({"type": "websocket.close", "code": 4000, "reason": "bye"})
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"].upper()})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


async def test_websocket_echo_with_pings_and_fragments(serve: Any) -> None:
    served = await serve(ws_app)
    client = await WSClient.open(served.port)
    assert client.accepted is not None
    assert (b"x-answer", b"42") in client.accepted.extra_headers
    await client.send(Ping(payload=b"p"))
    assert await client.next() == Pong(payload=b"p")
    await client.send(TextMessage(data="hel", message_finished=False))
    await client.send(TextMessage(data="lo"))
    assert await client.next() == TextMessage(data="HELLO")
    await client.send(BytesMessage(data=b"abc"))
    answer = await client.next()
    assert isinstance(answer, BytesMessage) and bytes(answer.data) == b"cba"
    assert served.server.statistics().websockets_open == 1
    await client.send(CloseConnection(code=1000))
    assert isinstance(await client.next(), CloseConnection)
    await wait_until(lambda: served.server.statistics().websockets_open == 0)
    await client.stream.aclose()


async def test_websocket_refusals_and_close_codes(serve: Any) -> None:
    served = await serve(ws_app, max_ws_message_bytes=1000)
    denied = await WSClient.open(served.port, "/deny")
    assert denied.rejected == (429, b"{}")
    closed = await WSClient.open(served.port, "/close")
    assert closed.rejected is not None and closed.rejected[0] == 403
    # the app ends without closing: 1011, as hypercorn did
    quit = await WSClient.open(served.port, "/quit")
    event = await quit.next()
    assert isinstance(event, CloseConnection) and event.code == 1011
    bye = await WSClient.open(served.port, "/bye")
    await bye.send(TextMessage(data="x"))
    event = await bye.next()
    assert isinstance(event, CloseConnection) and (event.code, event.reason) == (4000, "bye")
    big = await WSClient.open(served.port)
    await big.send(TextMessage(data="x" * 2000))
    event = await big.next()
    assert isinstance(event, CloseConnection) and event.code == 1009
    for client in (denied, closed, quit, bye, big):
        await client.stream.aclose()


async def test_a_broken_frame_is_closed_with_a_protocol_error(serve: Any) -> None:
    served = await serve(ws_app)
    client = await WSClient.open(served.port)
    await client.stream.send_all(b"\x8f\x80\x00\x00\x00\x00")  # reserved opcode, masked
    event = await client.next()
    assert isinstance(event, CloseConnection) and event.code == 1002
    await client.stream.aclose()


async def test_permessage_deflate_is_agreed_when_offered(serve: Any) -> None:
    served = await serve(ws_app)
    client = await WSClient.open(served.port, extensions=[PerMessageDeflate()])
    assert client.accepted is not None
    assert [type(e) for e in client.accepted.extensions] == [PerMessageDeflate]
    await client.send(TextMessage(data="compressed " * 100))
    assert await client.next() == TextMessage(data="COMPRESSED " * 100)
    await client.stream.aclose()


async def test_a_bad_upgrade_is_answered_400(serve: Any) -> None:
    served = await serve(ws_app)
    client = await RawClient.open(served.port)
    await client.send_raw(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    data = await client.until_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and envelope_code(body) == "bad_request"
    await client.aclose()


# -- SocketWriter ---------------------------------------------------------------------------------
async def test_socket_writer_keeps_messages_whole_and_in_order_under_backpressure() -> None:
    """Two tasks write 64 messages of 256 KiB each to a reader that is slow to start: the
    kernel buffers fill, writes queue behind the one in progress, and the reader sees every
    message whole, in the order the writes were started."""
    from trioproxy.streams import SocketWriter

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    size = 256 * 1024
    received = bytearray()
    order: list[int] = []
    async with trio.open_nursery() as nursery:

        async def read(task_status: trio.TaskStatus[None]) -> None:
            server = await listeners[0].accept()
            task_status.started()
            await trio.sleep(0.2)  # let the buffers fill
            while len(received) < 64 * size:
                received.extend(await server.receive_some(65536))
            await server.aclose()

        client = await trio.open_tcp_stream("127.0.0.1", port)
        await nursery.start(read)
        writer = SocketWriter(client)

        async def write(first: int) -> None:
            for n in range(first, 64, 2):
                order.append(n)  # started (the write queues behind the ones before it)
                await writer.write(bytes([n]) * size)

        async with trio.open_nursery() as writers:
            writers.start_soon(write, 0)
            writers.start_soon(write, 1)
        assert not writer.broken
    messages = [bytes(received[i : i + size]) for i in range(0, len(received), size)]
    assert [m[0] for m in messages] == order
    assert all(m == bytes([m[0]]) * size for m in messages)
    await client.aclose()
    await listeners[0].aclose()
