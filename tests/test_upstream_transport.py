"""The upstream HTTP transport (httptools parsing, O(1) idle pool): against the mock,
connections are reused after a body read to its end, closed when a body is abandoned, and
errors are httpx's; against a scripted upstream, answers are framed as their heads say
however the bytes are cut, and broken or cut-short answers are errors."""

from __future__ import annotations

import gc
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools
import httpx
import pytest
import trio

from tests.conftest import MockEnv
from tests.helpers import parse_sse, request_body, wait_until
from trioproxy.upstream.transport import LeanTransport, Timeouts


def _client(transport: LeanTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10.0), trust_env=False)


async def test_a_connection_is_reused_after_a_whole_body(mock: MockEnv) -> None:
    transport = LeanTransport()
    async with _client(transport) as client:
        for _ in range(3):
            response = await client.post(
                mock.responses_url, headers=mock.auth(), json=request_body()
            )
            assert response.status_code == 200
            events = parse_sse(response.text)
            assert events[-1]["type"] == "response.completed"
            assert transport.statistics() == {"open": 1, "idle": 1}
        usage = await client.get(f"{mock.base_url}/wham/usage", headers=mock.auth())
        assert usage.json()["plan_type"] == "plus"
        assert transport.statistics() == {"open": 1, "idle": 1}
    assert transport.statistics() == {"open": 0, "idle": 0}


async def test_an_abandoned_body_closes_its_connection(mock: MockEnv) -> None:
    await mock.control.add_fault("slow", event_delay=0.05, count=1)
    transport = LeanTransport()
    async with _client(transport) as client:
        request = client.build_request(
            "POST", mock.responses_url, headers=mock.auth(), content=json.dumps(request_body())
        )
        response = await client.send(request, stream=True)
        chunks = response.aiter_raw()
        first = await chunks.__anext__()
        assert first
        assert transport.statistics() == {"open": 1, "idle": 0}
        await response.aclose()
        assert transport.statistics() == {"open": 0, "idle": 0}
        await wait_until(lambda: mock.backend.stats.http_streams_open == 0)  # the mock saw it


async def test_connect_errors_are_httpx_errors() -> None:
    transport = LeanTransport()
    async with _client(transport) as client:
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # bound, not listening: connection refused
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/")
    assert transport.statistics() == {"open": 0, "idle": 0}


async def test_a_connection_the_server_dropped_is_not_reused(mock: MockEnv) -> None:
    transport = LeanTransport(max_connections=1)
    async with _client(transport) as client:
        await mock.control.add_fault("close_after_created", transport="http", count=1)
        # the stream starts, then the connection drops: httpx's error, the socket closed
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(mock.responses_url, headers=mock.auth(), json=request_body())
        assert transport.statistics() == {"open": 0, "idle": 0}
        response = await client.post(mock.responses_url, headers=mock.auth(), json=request_body())
        assert parse_sse(response.text)[-1]["type"] == "response.completed"
        assert transport.statistics() == {"open": 1, "idle": 1}


async def test_streams_on_the_hot_path_reuse_connections_and_time_out_on_silence(
    mock: MockEnv,
) -> None:
    """``LeanTransport.stream`` and ``relay``: the turn's path (no httpx objects). A body read
    to its end pools the connection; upstream silence past the read timeout (within its
    tenth) ends the relay with ``ReadTimeout`` and closes the connection."""
    transport = LeanTransport()
    timeouts: Timeouts = {"connect": 5.0, "read": 0.5, "write": 5.0, "pool": 5.0}
    headers = [(k.encode(), v.encode()) for k, v in mock.auth().items()]
    headers.append((b"content-type", b"application/json"))
    body = json.dumps(request_body()).encode()
    received = bytearray()

    async def forward(data: bytes) -> None:
        received.extend(data)

    for _ in range(2):
        received.clear()
        response = await transport.stream("POST", mock.responses_url, headers, body, timeouts)
        assert response.status_code == 200
        await response.body.relay(forward)
        await response.aclose()
        assert parse_sse(received.decode())[-1]["type"] == "response.completed"
        assert transport.statistics() == {"open": 1, "idle": 1}
    await mock.control.add_fault("slow", event_delay=3.0, count=1)
    response = await transport.stream("POST", mock.responses_url, headers, body, timeouts)
    started = trio.current_time()
    with pytest.raises(httpx.ReadTimeout):
        await response.body.relay(forward)
    silent = trio.current_time() - started
    assert 0.45 <= silent < 2.0  # 90-100 % of the timeout after the last bytes
    await response.aclose()
    assert transport.statistics() == {"open": 0, "idle": 0}
    await wait_until(lambda: mock.backend.stats.http_streams_open == 0)
    await transport.aclose()


async def test_an_exchange_leaves_nothing_for_the_cycle_collector(mock: MockEnv) -> None:
    """Each exchange's parser and its answer go with their last reference: a parser whose
    callbacks held it (a reference cycle) waited for the cycle collector, whose pauses stall
    every stream of the process."""
    transport = LeanTransport()
    timeouts: Timeouts = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    headers = [(k.encode(), v.encode()) for k, v in mock.auth().items()]
    headers.append((b"content-type", b"application/json"))
    body = json.dumps(request_body()).encode()

    async def forward(data: bytes) -> None:
        pass

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            response = await transport.stream("POST", mock.responses_url, headers, body, timeouts)
            await response.body.relay(forward)
            await response.aclose()
        await transport.aclose()
        gc.collect()
        left = {type(o).__name__ for o in gc.garbage} & {
            "ResponseParser",
            "_Callbacks",
            "ResponseMessage",
        }
        left |= {
            type(o).__name__ for o in gc.garbage if isinstance(o, httptools.HttpResponseParser)
        }
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == set()


# -- a scripted upstream: answers written in the pieces given, then the connection closes ----
Script = Callable[[bytes], list[bytes]]  # the request head -> the answer's pieces
Serve = Callable[[Script], Awaitable[str]]


async def _scripted(stream: trio.SocketStream, script: Script) -> None:
    async with stream:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            head += data
        for piece in script(head):
            await stream.send_all(piece)
            await trio.sleep(0.002)  # each piece its own segment, most of the time
        await trio.sleep(0.05)


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> AsyncIterator[Serve]:
    """``serve(script)`` -> the URL of a one-answer-per-connection upstream."""

    async def start(script: Script) -> str:
        listeners = await nursery.start(trio.serve_tcp, lambda stream: _scripted(stream, script), 0)
        port = listeners[0].socket.getsockname()[1]
        return f"http://127.0.0.1:{port}/x"

    yield start


def _cut(data: bytes, rng: random.Random) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _chunked(pieces: list[bytes], rng: random.Random) -> bytes:
    out = b"".join(
        b"%x%s\r\n%s\r\n" % (len(p), b";name=value" if rng.random() < 0.3 else b"", p)
        for p in pieces
    )
    return out + b"0\r\n" + (b"x-trailer: 1\r\n" if rng.random() < 0.5 else b"") + b"\r\n"


HOT: Timeouts = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


async def _both_paths(url: str) -> list[bytes]:
    """The answer's body through httpx's path and through the relay's."""
    transport = LeanTransport()
    async with _client(transport) as client:
        first = (await client.get(url)).content
    received = bytearray()

    async def forward(data: bytes) -> None:
        received.extend(data)

    response = await transport.stream("POST", url, [], b"", HOT)
    try:
        await response.body.relay(forward)
    finally:
        await response.aclose()
    await transport.aclose()
    return [first, bytes(received)]


@pytest.mark.parametrize("seed", range(6))
async def test_chunked_answers_decode_wherever_the_bytes_are_cut(
    scripted: Serve, seed: int
) -> None:
    rng = random.Random(seed)
    pieces = [rng.randbytes(rng.randint(1, 300)) for _ in range(rng.randint(0, 10))]
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + _chunked(pieces, rng)
    url = await scripted(lambda _: _cut(answer, rng))
    assert await _both_paths(url) == [b"".join(pieces)] * 2


async def test_length_and_close_delimited_answers(scripted: Serve) -> None:
    body = bytes(range(256)) * 3
    url = await scripted(
        lambda _: _cut(b"HTTP/1.1 200 OK\r\ncontent-length: 768\r\n\r\n" + body, random.Random(1))
    )
    assert await _both_paths(url) == [body, body]
    # no length and no chunking: the body is everything until the close
    url = await scripted(lambda _: [b"HTTP/1.1 200 OK\r\n\r\n", b"until ", b"the close"])
    assert await _both_paths(url) == [b"until the close"] * 2


async def test_a_head_answer_has_no_body_whatever_its_length_says(
    scripted: Serve,
) -> None:
    url = await scripted(lambda _: [b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"])
    transport = LeanTransport()
    async with _client(transport) as client:
        response = await client.head(url)
        assert response.status_code == 200 and response.content == b""
        assert transport.statistics() == {"open": 1, "idle": 1}


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n",  # not hex
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXY",  # no CRLF
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-3\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",  # cut short
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",  # cut short
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\ncontent-length: 11\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
async def test_broken_or_cut_short_answers_are_errors_and_close_the_connection(
    scripted: Serve, answer: bytes
) -> None:
    url = await scripted(lambda _: [answer])
    transport = LeanTransport()
    async with _client(transport) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)
    assert transport.statistics() == {"open": 0, "idle": 0}
    response = None
    with pytest.raises(httpx.RemoteProtocolError):
        response = await transport.stream("POST", url, [], b"", HOT)
        await response.body.relay(_drop)
    if response is not None:
        await response.aclose()
    assert transport.statistics() == {"open": 0, "idle": 0}


async def _drop(data: bytes) -> None:
    pass


async def test_bytes_after_a_whole_answer_spoil_only_the_connection(
    scripted: Serve,
) -> None:
    """A server that sends something after a complete answer: the answer stands and the
    connection is not used again, whether the bytes came with the answer (closed at once)
    or later (found when the pool would hand it out)."""
    url = await scripted(lambda _: [b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcEXTRA"])
    transport = LeanTransport()
    async with _client(transport) as client:
        assert (await client.get(url)).content == b"abc"
        assert transport.statistics() == {"open": 0, "idle": 0}
    url = await scripted(lambda _: [b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", b"EXTRA"])
    transport = LeanTransport()
    async with _client(transport) as client:
        assert (await client.get(url)).content == b"abc"
        await trio.sleep(0.01)  # the later bytes are in (the server closes 50 ms after)
        assert (await client.get(url)).content == b"abc"  # on a new connection
        assert transport.statistics() == {"open": 1, "idle": 1}
