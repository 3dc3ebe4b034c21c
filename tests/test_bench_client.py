"""The load generator's HTTP client (``HttpClient.sse_turn``) against a scripted server on
loopback: keep-alive reuse, time to first event counted to the first body byte (not to the
head), error answers by their envelope code, and cut or broken answers as transport codes;
and against the mock, whatever the segmentation of its answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

import pytest
import trio

from tests.conftest import MockFactory
from tests.helpers import request_body
from trioproxy.harness.bench.clients import HttpClient
from trioproxy.harness.mock_upstream import MockConfig

Answer = Callable[[int], list[bytes | float]]  # request number -> pieces, or seconds to wait

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
CREATED = b'event: response.created\ndata: {"type":"response.created","response":{"id":"r1"}}\n\n'
DONE = b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Scripted:
    """Answers each request (one connection after another, several requests per connection)
    with the pieces ``answer(n)`` gives; a piece that is a number is a pause."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests = 0
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                buffer = buffer[length:]
                self.requests += 1
                for piece in self.answer(self.requests):
                    if isinstance(piece, float):
                        await trio.sleep(piece)
                    elif piece == b"<close>":
                        return
                    else:
                        try:
                            await stream.send_all(piece)
                        except trio.BrokenResourceError:
                            return  # the client left (abandoned its turn)


async def _serve(nursery: trio.Nursery, answer: Answer) -> tuple[Scripted, HttpClient]:
    server = Scripted(answer)
    listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), server.handle, 0)
    port = listeners[0].socket.getsockname()[1]
    return server, HttpClient("127.0.0.1", port, [("authorization", "Bearer x")])


async def test_turns_reuse_the_connection_and_count_ttfb_to_the_first_event(
    nursery: trio.Nursery,
) -> None:
    # the head at once, the first event 0.3 s later: the time to first event includes the wait
    server, client = await _serve(
        nursery, lambda n: [HEAD, 0.3, chunk(CREATED), chunk(DONE), b"0\r\n\r\n"]
    )
    try:
        for _ in range(2):
            outcome = await client.sse_turn("/r", b"{}", [])
            assert outcome.completed, outcome
            assert outcome.status == 200 and outcome.events == 2
            assert outcome.response_id == "r1"
            assert outcome.ttfb is not None and outcome.ttfb >= 0.3
    finally:
        await client.aclose()
    assert (server.requests, server.connections) == (2, 1)


async def test_an_error_answer_is_counted_by_its_code(nursery: trio.Nursery) -> None:
    body = b'{"error":{"code":"proxy_overloaded","message":"busy"}}'
    head = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
    head += b"x-trioproxy-overload: lane\r\ncontent-length: %d\r\n\r\n" % len(body)
    server, client = await _serve(nursery, lambda n: [head, body])
    try:
        for _ in range(2):
            outcome = await client.sse_turn("/r", b"{}", [])
            assert (outcome.status, outcome.error, outcome.overload) == (
                429,
                "proxy_overloaded",
                True,
            )
            assert outcome.ttfb is None
    finally:
        await client.aclose()
    assert server.connections == 1  # a whole error answer keeps the connection


async def test_cut_and_broken_answers_are_transport_errors(nursery: trio.Nursery) -> None:
    answers: dict[int, list[bytes | float]] = {
        1: [HEAD, chunk(CREATED), b"<close>"],  # the stream ends before its terminal event
        2: [b"<close>"],  # closed before the status line
        3: [b"HTTP/1.1 200 OK\r\nbroken header line\r\n\r\n"],
        4: [HEAD, chunk(CREATED), chunk(DONE), b"0\r\n\r\n"],
    }
    server, client = await _serve(nursery, lambda n: answers[n])
    try:
        cut = await client.sse_turn("/r", b"{}", [])
        assert (cut.error, cut.events, cut.response_id) == ("connection_lost", 1, "r1")
        unanswered = await client.sse_turn("/r", b"{}", [])
        assert unanswered.error == "connection_lost" and unanswered.status == 0
        broken = await client.sse_turn("/r", b"{}", [])
        assert broken.error == "http_protocol_error"
        whole = await client.sse_turn("/r", b"{}", [])
        assert whole.completed
    finally:
        await client.aclose()
    assert server.connections == 4  # a failed turn never leaves its connection to the next


async def test_an_abandoning_client_closes_its_connection(nursery: trio.Nursery) -> None:
    events = [chunk(CREATED)] + [
        chunk(b'event: response.output_text.delta\ndata: {"type":"x"}\n\n')
    ] * 5
    server, client = await _serve(nursery, lambda n: [HEAD, *events, chunk(DONE), b"0\r\n\r\n"])
    try:
        left = await client.sse_turn("/r", b"{}", [], abandon_after=2)
        assert left.abandoned and left.error is None and left.events == 2
        at_head = await client.sse_turn("/r", b"{}", [], abandon_after=0)
        assert at_head.abandoned and at_head.status == 200 and at_head.events == 0
        whole = await client.sse_turn("/r", b"{}", [])
        assert whole.completed and whole.events == 7
    finally:
        await client.aclose()
    assert server.connections == 3


async def test_an_answer_that_ends_with_its_connection(nursery: trio.Nursery) -> None:
    """A server (another proxy under ``--target``) that neither gives a length nor chunks:
    the close ends the body, and the events say whether it was whole."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    answers: dict[int, list[bytes | float]] = {
        1: [head, CREATED, DONE, b"<close>"],
        2: [head, CREATED, b"<close>"],
    }
    server, client = await _serve(nursery, lambda n: answers[n])
    try:
        whole = await client.sse_turn("/r", b"{}", [])
        assert whole.completed and whole.events == 2, whole
        cut = await client.sse_turn("/r", b"{}", [])
        assert cut.error == "incomplete" and cut.events == 1
    finally:
        await client.aclose()
    assert server.connections == 2


@pytest.mark.parametrize("segmentation", ["whole", "split"])
async def test_mock_answers_are_read_whatever_their_segmentation(
    make_mock: MockFactory, segmentation: str
) -> None:
    """The mock writing a turn in one write, or its events in pieces, gives the client the
    same events as one write per event."""
    counts = []
    for mode in ("event", segmentation):
        mock = await make_mock(MockConfig(accounts=1, deltas=5, segmentation=mode))
        client = HttpClient("127.0.0.1", mock.port, list(mock.auth().items()))
        try:
            for _ in range(2):  # the second turn on the kept-alive connection
                outcome = await client.sse_turn(
                    "/backend-api/codex/responses", json.dumps(request_body()).encode(), []
                )
                assert outcome.completed and outcome.error is None, (mode, outcome)
                counts.append(outcome.events)
        finally:
            await client.aclose()
    assert len(set(counts)) == 1, counts
