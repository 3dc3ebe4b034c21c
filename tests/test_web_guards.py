"""trioproxy's own server (web/) against hostile clients, through real sockets on loopback:
the request-memory budget, head and body limits, Host, slow clients, pipelined read-ahead,
compressed WebSocket messages, WebSocket liveness and the Date header."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import psutil
import trio
from wsproto.events import CloseConnection, Ping, TextMessage
from wsproto.extensions import PerMessageDeflate

from tests.helpers import wait_until
from tests.test_http_server import RawClient, WSClient, envelope_code, serve
from trioproxy.web.budget import ByteBudget
from trioproxy.web.connection import MEMORY_EXTENSION

__all__ = ["serve"]  # the fixture, used by name

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MIB = 1024 * 1024


def rss() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


@attrs.define
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    closed: bool  # the server closed the connection after it


async def read_answer(stream: trio.SocketStream) -> Answer:
    """One response (with a content-length, as every answer of these tests has), and
    whether the server then closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise AssertionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        body += chunk
    closed = headers.get(b"connection") == b"close"
    return Answer(status, headers, body[:length], closed)


async def answer_of(port: int, raw: bytes) -> Answer:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(raw)
        with trio.fail_after(10):
            return await read_answer(stream)
    finally:
        await stream.aclose()


async def body_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body (keeping its pieces, as an app that parses it would), then
    answers with its length, the host it was asked for and whether the budget came in the
    scope."""
    if scope["type"] != "http":
        return
    pieces: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        pieces.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    host = dict(scope["headers"]).get(b"host", b"").decode()
    data = json.dumps(
        {
            "length": sum(map(len, pieces)),
            "host": host,
            "budget": isinstance(scope["extensions"].get(MEMORY_EXTENSION), ByteBudget),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


# -- the request-memory budget ------------------------------------------------------------------
async def test_fifty_largest_bodies_at_once_stay_within_the_budget(serve: Any) -> None:
    """50 clients send a body of the largest allowed size at once against a budget that
    holds 16 of them: each gets its answer or 429 proxy_overloaded, the budget is never
    passed, RSS stays within the budget's reach, a client without a body is served
    meanwhile, and all the memory comes back."""
    limit, largest = 64 * MIB, 4 * MIB
    served = await serve(body_app, max_body_bytes=largest, request_memory_limit=limit)
    budget = served.server.budget
    body = memoryview(bytes(largest))
    head = (
        b"POST /big HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n"
        b"content-length: %d\r\n\r\n" % largest
    )
    statuses: list[int] = []
    peak_rss = baseline = rss()

    async def client() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        answered = trio.Event()
        answers: list[Answer] = []

        async def upload() -> None:
            await stream.send_all(head)
            for start in range(0, largest, 256 * 1024):
                if answered.is_set():
                    return  # refused: a client stops sending once it has its answer
                try:
                    await stream.send_all(body[start : start + 256 * 1024])
                except trio.BrokenResourceError:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            answers.append(await read_answer(stream))
            answered.set()
        await stream.aclose()
        answer = answers[0]
        if answer.status == 429:
            assert envelope_code(answer.body) == "proxy_overloaded"
            error = json.loads(answer.body)["error"]
            assert error["type"] == "server_overloaded"
            assert answer.headers[b"x-trioproxy-overload"] == b"memory"
            assert answer.headers[b"retry-after"] == b"2"
            assert answer.closed
        else:
            assert answer.status == 200 and json.loads(answer.body)["length"] == largest
        statuses.append(answer.status)

    async def sample() -> None:
        nonlocal peak_rss
        for _ in range(6000):  # bounded: 60 s at most
            peak_rss = max(peak_rss, rss())
            await trio.sleep(0.01)

    small: list[int] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            outer.start_soon(sample)
            async with trio.open_nursery() as clients:
                for _ in range(50):
                    clients.start_soon(client)
                await wait_until(lambda: budget.statistics().held > limit // 2, seconds=20)
                small.append(
                    (await answer_of(served.port, b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")).status
                )
            outer.cancel_scope.cancel()
    stats = budget.statistics()
    print(
        f"statuses: {statuses.count(200)} x 200, {statuses.count(429)} x 429; "
        f"peak held {stats.peak / MIB:.1f} MiB of {limit / MIB:.0f}; "
        f"RSS {baseline / MIB:.0f} -> peak {peak_rss / MIB:.0f} MiB"
    )
    assert sorted(set(statuses)) <= [200, 429] and len(statuses) == 50
    assert 200 in statuses and 429 in statuses
    assert small == [200]
    assert stats.peak <= limit and stats.refused_total >= statuses.count(429)
    assert peak_rss < baseline + 3 * limit
    await wait_until(lambda: budget.statistics().held == 0)
    assert budget.statistics().reservations == 0
    # and the process gives the memory back to the system (the allocator is trimmed)
    await wait_until(lambda: rss() < baseline + limit // 2, seconds=10)


async def test_a_body_over_max_body_bytes_is_refused_413(serve: Any) -> None:
    served = await serve(body_app, max_body_bytes=1000)
    # announced: refused from the head, before any of the body is read
    answer = await answer_of(
        served.port, b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n"
    )
    assert answer.status == 413 and envelope_code(answer.body) == "payload_too_large"
    assert answer.closed
    # chunked: refused once the bytes received pass the limit
    chunks = b"".join(b"100\r\n" + b"a" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    answer = await answer_of(
        served.port, b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + chunks
    )
    assert answer.status == 413 and envelope_code(answer.body) == "payload_too_large"
    assert served.server.budget.statistics().held == 0


async def test_the_app_finds_the_budget_in_its_scope(serve: Any) -> None:
    served = await serve(body_app)
    answer = await answer_of(served.port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert json.loads(answer.body)["budget"] is True


# -- heads ------------------------------------------------------------------------------------------
async def test_a_request_line_over_the_head_limit_is_refused_414(serve: Any) -> None:
    served = await serve(body_app, max_head_bytes=8192)
    answer = await answer_of(
        served.port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    assert answer.status == 414 and envelope_code(answer.body) == "uri_too_long"
    assert answer.closed


async def test_headers_are_refused_431_at_the_limit_not_after_megabytes(serve: Any) -> None:
    """The client sends the limit and a little more, then waits: the answer comes without
    the rest of the megabytes it could have sent."""
    served = await serve(body_app, max_head_bytes=16 * 1024)
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (16 * 1024 + 2048))
    with trio.fail_after(10):
        answer = await read_answer(stream)
    assert answer.status == 431 and envelope_code(answer.body) == "request_header_fields_too_large"
    await stream.aclose()


async def test_more_headers_than_allowed_are_refused_431(serve: Any) -> None:
    served = await serve(body_app, max_header_count=100)
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(101))
    answer = await answer_of(served.port, b"GET / HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    assert answer.status == 431 and envelope_code(answer.body) == "request_header_fields_too_large"
    fine = b"".join(b"x-h%d: v\r\n" % i for i in range(99))
    answer = await answer_of(served.port, b"GET / HTTP/1.1\r\nhost: x\r\n" + fine + b"\r\n")
    assert answer.status == 200


async def test_an_http_1_0_request_with_transfer_encoding_is_answered_then_closed(
    serve: Any,
) -> None:
    served = await serve(body_app)
    client = await RawClient.open(served.port)
    await client.send_raw(
        b"POST /x HTTP/1.0\r\nhost: x\r\nconnection: keep-alive\r\n"
        b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    data = await client.until_closed()  # the server closes the connection after the answer
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
    assert json.loads(body)["length"] == 3
    await client.aclose()


async def test_host_missing_or_twice_is_refused_and_the_absolute_form_names_the_host(
    serve: Any,
) -> None:
    served = await serve(body_app)
    for raw in (
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\n\r\n",
        b"GET http:///x HTTP/1.1\r\nhost: a.example\r\n\r\n",
    ):
        answer = await answer_of(served.port, raw)
        assert answer.status == 400 and envelope_code(answer.body) == "bad_request", raw
        assert answer.closed
    # absolute form: the target's authority is the host the app sees, whatever Host says
    answer = await answer_of(
        served.port, b"GET http://other.example:8080/x?y=1 HTTP/1.1\r\nhost: proxy.local\r\n\r\n"
    )
    assert answer.status == 200 and json.loads(answer.body)["host"] == "other.example:8080"
    answer = await answer_of(served.port, b"GET /x HTTP/1.1\r\nhost: proxy.local\r\n\r\n")
    assert json.loads(answer.body)["host"] == "proxy.local"
    # HTTP/1.0 needs no Host
    answer = await answer_of(served.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert answer.status == 200


# -- slow clients -----------------------------------------------------------------------------------
async def trickle(stream: trio.SocketStream, data: bytes, gap: float) -> None:
    """Send ``data`` a byte at a time, ``gap`` seconds apart, until it is sent or the server
    closes."""
    for i in range(len(data)):
        try:
            await stream.send_all(data[i : i + 1])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await trio.sleep(gap)


async def answer_while_trickling(stream: trio.SocketStream, data: bytes, gap: float) -> Answer:
    """Trickle ``data`` on ``stream`` (``trickle``) until the server answers: the answer."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle, stream, data, gap)
        answer = await read_answer(stream)
        nursery.cancel_scope.cancel()
    return answer


async def test_a_head_trickled_forever_is_cut_with_408(serve: Any) -> None:
    served = await serve(body_app, head_timeout=0.5)
    for start in (b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ", b"GET /ws HTTP/1.1\r\nhost: x\r\n"):
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        with trio.fail_after(10):
            answer = await answer_while_trickling(stream, start + b"a" * 10_000, 0.05)
        assert answer.status == 408 and envelope_code(answer.body) == "request_timeout"
        assert answer.closed
        await stream.aclose()


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
    serve: Any,
) -> None:
    served = await serve(body_app, head_timeout=0.3)
    silent = await RawClient.open(served.port)
    assert await silent.closed(seconds=10)
    await silent.aclose()


async def test_a_body_trickled_at_one_byte_a_second_is_cut_with_408(serve: Any) -> None:
    served = await serve(body_app, body_min_rate=100, body_min_rate_grace=0.5)
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    await stream.send_all(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
    with trio.fail_after(10):
        answer = await answer_while_trickling(stream, b"a" * 100, 1.0)
    assert answer.status == 408 and envelope_code(answer.body) == "request_timeout"
    assert answer.closed
    await stream.aclose()


async def test_a_thousand_trickling_clients_are_cut_and_a_normal_client_is_served_meanwhile(
    serve: Any,
) -> None:
    """1,000 sockets each send a head and then a body at 1 byte a second. Every one is cut
    (408) once the grace period is over, while a normal client is answered all along."""
    grace = 2.0
    served = await serve(body_app, body_min_rate=1024, body_min_rate_grace=grace)
    head = b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n"
    cut: list[float] = []
    started = trio.current_time()

    async def trickler() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        await stream.send_all(head)
        answer = await answer_while_trickling(stream, b"a" * 1000, 1.0)
        assert answer.status == 408
        with trio.fail_after(10):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass  # a byte sent after the server closed: a reset, as good as its FIN
        cut.append(trio.current_time() - started)
        await stream.aclose()

    normal: list[float] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(trickler)
            await wait_until(lambda: served.server.statistics().connections_open >= 1000, 30)
            while len(cut) < 1000 and len(normal) < 200:
                began = trio.current_time()
                answer = await answer_of(
                    served.port, b"POST /fine HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nok"
                )
                assert answer.status == 200
                normal.append(trio.current_time() - began)
                await trio.sleep(0.05)
    print(
        f"1000 trickling sockets cut after {min(cut):.2f} to {max(cut):.2f} s "
        f"(grace {grace} s); {len(normal)} normal requests meanwhile, slowest {max(normal):.3f} s"
    )
    assert len(cut) == 1000 and normal
    await wait_until(lambda: served.server.statistics().connections_open == 0, 10)


# -- pipelined read-ahead ---------------------------------------------------------------------------
async def test_pipelined_requests_behind_a_slow_answer_cost_what_they_are_bounded_to(
    serve: Any,
) -> None:
    """20 connections each pipeline 1 MiB of small requests behind an answer that waits:
    what the server reads ahead stays near max_pipelined_bytes per connection in memory,
    not the ~13 times as much the parsed requests would cost. Past that bound the
    connection closes after the answer (the client retries what was left unanswered, RFC
    9112 9.3.2), and a client that leaves meanwhile is noticed at once."""
    release = trio.Event()
    gone: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/slow":
            async with trio.open_nursery() as nursery:
                # as the proxy does: a watcher waits for the client to go (the server reads
                # ahead meanwhile) while the answer is made
                async def watch() -> None:
                    if (await receive())["type"] == "http.disconnect":
                        gone.append(scope["query_string"].decode())
                        nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await release.wait()
                nursery.cancel_scope.cancel()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    served = await serve(app)
    small = b"GET /p HTTP/1.1\r\nhost: x\r\n\r\n"

    def pipelined(name: str) -> bytes:
        slow = f"GET /slow?{name} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
        return slow + small * (MIB // len(small))

    before = rss()
    streams = [await trio.open_tcp_stream("127.0.0.1", served.port) for _ in range(20)]
    leaving = [await trio.open_tcp_stream("127.0.0.1", served.port) for _ in range(5)]
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(stream.send_all, pipelined("stays"))
        for stream in leaving:
            nursery.start_soon(stream.send_all, pipelined("leaves"))
        await trio.sleep(1.0)  # the server reads what it will read ahead
        after = rss()
        # clients that leave now are noticed at once, though they sent more than is kept
        for stream in leaving:
            await trio.aclose_forcefully(stream)
        await wait_until(lambda: gone.count("leaves") == 5)
        release.set()
        for stream in streams:  # the answer, then the close: the rest goes unanswered
            data = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1 ") == 1
        nursery.cancel_scope.cancel()
    for stream in streams:
        await stream.aclose()
    assert "stays" not in gone
    growth = after - before
    print(f"RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB: {growth / MIB:.1f} MiB for 25 x 1 MiB")
    assert growth < 25 * 3 * MIB


# -- WebSocket --------------------------------------------------------------------------------------
def deflate_bomb(inflated: int) -> bytes:
    """A masked, compressed binary frame (RSV1) of ``inflated`` zero bytes, as
    permessage-deflate sends it."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(MIB)
    payload = b"".join(compressor.compress(block) for _ in range(inflated // MIB))
    payload += compressor.flush(zlib.Z_SYNC_FLUSH)
    payload = payload[:-4]  # the tail every message ends with is left out (RFC 7692 7.2.1)
    mask = b"\x01\x02\x03\x04"
    key = int.from_bytes(mask * (len(payload) // 4 + 1), "big") >> (8 * (-len(payload) % 4))
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")
    return b"\xc2\xff" + len(payload).to_bytes(8, "big") + mask + masked


async def ws_reader_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Accepts, then reads messages and echoes their size, until the client goes."""
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        size = len(message.get("bytes") or message.get("text") or "")
        await send({"type": "websocket.send", "text": str(size)})


async def test_a_compressed_message_that_would_inflate_too_far_is_refused_1009(
    serve: Any,
) -> None:
    """1 MB on the wire that inflates to 1 GB: closed with 1009 before it is inflated; 1
    and 8 at once, RSS stays far from what inflating them would take."""
    served = await serve(
        ws_reader_app, max_ws_message_bytes=16 * MIB, request_memory_limit=64 * MIB
    )
    bomb = deflate_bomb(1024 * MIB)
    assert len(bomb) < 2 * MIB
    for count in (1, 8):
        clients = [
            await WSClient.open(served.port, extensions=[PerMessageDeflate()]) for _ in range(count)
        ]
        before = peak = rss()
        codes: list[int] = []

        async def bomb_one(client: WSClient, codes: list[int] = codes) -> None:
            await client.stream.send_all(bomb)
            event = await client.next()
            assert isinstance(event, CloseConnection)
            codes.append(event.code)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(bomb_one, client)
                while len(codes) < count:
                    peak = max(peak, rss())
                    await trio.sleep(0.005)
        print(f"{count} deflate bomb(s): RSS {before / MIB:.0f} -> peak {peak / MIB:.0f} MiB")
        assert codes == [1009] * count
        assert peak - before < 64 * MIB + count * 20 * MIB
        for client in clients:
            await client.stream.aclose()
    # an honest compressed message still goes through
    fine = await WSClient.open(served.port, extensions=[PerMessageDeflate()])
    await fine.send(TextMessage(data="z" * 100_000))
    assert await fine.next() == TextMessage(data="100000")
    await fine.stream.aclose()
    await wait_until(lambda: served.server.budget.statistics().held == 0)


async def test_a_message_the_budget_cannot_hold_is_refused_1013(serve: Any) -> None:
    served = await serve(ws_reader_app, request_memory_limit=100_000)
    client = await WSClient.open(served.port)
    await client.send(TextMessage(data="x" * 50_000))
    assert await client.next() == TextMessage(data="50000")
    await client.send(TextMessage(data="x" * 200_000))  # under the size limit, over the budget
    event = await client.next()
    assert isinstance(event, CloseConnection) and event.code == 1013
    await client.stream.aclose()
    await wait_until(lambda: served.server.budget.statistics().held == 0)


async def test_a_websocket_that_stops_answering_pings_is_closed_1011(serve: Any) -> None:
    codes: dict[str, int] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        message = await receive()
        codes[scope["path"]] = message["code"]

    served = await serve(app, ws_ping_interval=0.2, ws_ping_timeout=0.3)
    alive = await WSClient.open(served.port, "/alive")
    gone = await WSClient.open(served.port, "/gone")
    pongs = 0

    async def answer_pings() -> None:
        nonlocal pongs
        while True:
            event = await alive.next()
            assert isinstance(event, Ping)
            await alive.send(event.response())
            pongs += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_pings)
        # the client that vanished (it reads nothing, answers nothing) is closed after one
        # ping; the one that answers is pinged again and again, and kept
        with trio.fail_after(10):
            assert isinstance(await gone.next(), Ping)
            event = await gone.next()
        assert isinstance(event, CloseConnection) and event.code == 1011
        await wait_until(lambda: codes.get("/gone") == 1011 and pongs >= 3, seconds=10)
        assert "/alive" not in codes and served.server.statistics().websockets_open == 1
        nursery.cancel_scope.cancel()
    for client in (alive, gone):
        await client.stream.aclose()


# -- Date -------------------------------------------------------------------------------------------
async def test_every_answer_carries_a_date(serve: Any) -> None:
    served = await serve(body_app)
    ok = await answer_of(served.port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    refused = await answer_of(served.port, b"GARBAGE\r\n\r\n")
    for answer in (ok, refused):
        assert answer.headers[b"date"].endswith(b" GMT")

    async def ws(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})

    served = await serve(ws)
    client = await WSClient.open(served.port)
    assert client.accepted is not None
    assert any(name == b"date" for name, _ in client.accepted.extra_headers)
    await client.stream.aclose()
