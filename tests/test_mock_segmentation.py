"""How the mock cuts its answers into socket writes (``segmentation``), seen by raw clients
over loopback: ``whole`` answers arrive in one read, ``split`` ones in pieces that still parse
to the same events as the default one-write-per-event answers."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import attrs
import h11
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Request,
    TextMessage,
)

from tests.conftest import MockEnv, MockFactory
from tests.helpers import TERMINAL, request_body
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.segmentation import Segmenter, sse_cuts

PATH = "/backend-api/codex/responses"
READ = 1024 * 1024
TIMEOUT = 10.0
_ID = re.compile(r"^[a-z]+_[0-9a-f]{32}$")


def normalized(value: Any) -> Any:
    """``value`` with what differs between two runs (ids, timestamps) blanked."""
    if isinstance(value, dict):
        return {
            key: "<at>" if key.endswith("_at") else normalized(item) for key, item in value.items()
        }
    if isinstance(value, list):
        return [normalized(item) for item in value]
    if isinstance(value, str) and _ID.match(value):
        return "<id>"
    return value


@attrs.define
class HttpReads:
    """What a raw HTTP client read: the bytes of each read, and the SSE events they carry."""

    reads: list[bytes] = attrs.field(factory=list)
    events: list[dict[str, Any]] = attrs.field(factory=list)
    reads_ending_inside_an_event: int = 0
    complete: bool = False


async def http_turn(env: MockEnv, body: dict[str, Any]) -> HttpReads:
    """POST one request on a raw socket; read until the end of the chunked body or EOF."""
    conn = h11.Connection(h11.CLIENT)
    payload = json.dumps(body).encode()
    headers = [
        ("host", "127.0.0.1"),
        ("content-type", "application/json"),
        ("content-length", str(len(payload))),
        *env.auth().items(),
    ]
    out = HttpReads()
    sse = b""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", env.port)
        async with stream:
            await stream.send_all(
                conn.send(h11.Request(method="POST", target=PATH, headers=headers))
                + conn.send(h11.Data(data=payload))
                + conn.send(h11.EndOfMessage())
            )
            while not out.complete:
                try:
                    data = await stream.receive_some(READ)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    break
                out.reads.append(data)
                conn.receive_data(data)
                while (event := conn.next_event()) is not h11.NEED_DATA:
                    if isinstance(event, h11.Data):
                        sse += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        out.complete = True
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        break
                if sse and not sse.endswith(b"\n\n"):
                    out.reads_ending_inside_an_event += 1
    for frame in sse.decode().split("\n\n"):
        data_lines = [line[6:] for line in frame.split("\n") if line.startswith("data: ")]
        if data_lines:
            out.events.append(json.loads("\n".join(data_lines)))
    return out


@attrs.define
class WsReads:
    """What a raw WebSocket client read after its ``response.create``."""

    reads: list[bytes] = attrs.field(factory=list)
    messages: list[dict[str, Any]] = attrs.field(factory=list)
    frames: int = 0  # text frames received (a message in fragments counts each)
    close_code: int | None = None


@attrs.define(eq=False)
class RawWebSocket:
    stream: trio.SocketStream
    ws: WSConnection

    async def turn(self, body: dict[str, Any]) -> WsReads:
        """Send one ``response.create``; read until a terminal event or the close."""
        out = WsReads()
        parts: list[str] = []
        message = json.dumps({"type": "response.create", **body})
        await self.stream.send_all(self.ws.send(Message(data=message)))
        with trio.fail_after(TIMEOUT):
            while True:
                data = await self.stream.receive_some(READ)
                if not data:
                    return out
                out.reads.append(data)
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, CloseConnection):
                        out.close_code = event.code
                        return out
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        out.frames += event.frame_finished
                        if event.message_finished:
                            out.messages.append(json.loads("".join(parts)))
                            parts.clear()
                if out.messages and out.messages[-1]["type"] in TERMINAL:
                    return out


async def open_raw_ws(env: MockEnv) -> RawWebSocket:
    ws = WSConnection(ConnectionType.CLIENT)
    headers = [(k.encode(), v.encode()) for k, v in env.ws_headers().items()]
    stream = await trio.open_tcp_stream("127.0.0.1", env.port)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target=PATH, extra_headers=headers)))
    with trio.fail_after(TIMEOUT):
        while True:
            data = await stream.receive_some(READ)
            assert data, "the mock closed the socket during the handshake"
            ws.receive_data(data)
            if any(isinstance(event, AcceptConnection) for event in ws.events()):
                return RawWebSocket(stream, ws)


def config(segmentation: str = "event", **options: Any) -> MockConfig:
    return MockConfig(accounts=1, deltas=3, segmentation=segmentation, **options)


# -- whole ---------------------------------------------------------------------------------
async def test_whole_http_answer_arrives_in_one_read(make_mock: MockFactory) -> None:
    env = await make_mock(config("whole"))
    got = await http_turn(env, request_body())
    assert got.complete
    assert len(got.reads) == 1, f"{len(got.reads)} reads"
    (read,) = got.reads
    assert read.startswith(b"HTTP/1.1 200 ") and read.endswith(b"\r\n0\r\n\r\n")
    types = [e["type"] for e in got.events]
    assert types[0] == "codex.rate_limits" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 3


async def test_whole_websocket_turn_arrives_in_one_read(make_mock: MockFactory) -> None:
    env = await make_mock(config("whole"))
    raw = await open_raw_ws(env)
    async with raw.stream:
        for _ in range(2):  # every turn of the connection
            got = await raw.turn(request_body())
            assert len(got.reads) == 1, f"{len(got.reads)} reads"
            types = [m["type"] for m in got.messages]
            assert types[0] == "codex.rate_limits" and types[-1] == "response.completed"
            assert got.frames == len(got.messages)


async def test_whole_mode_cuts_after_one_write_of_what_came_before(
    make_mock: MockFactory,
) -> None:
    env = await make_mock(config("whole"))
    await env.control.add_fault("close_after_created", count=1, after_events=2, transport="http")
    got = await http_turn(env, request_body())
    assert not got.complete
    assert len(got.reads) == 1
    assert [e["type"] for e in got.events] == [
        "codex.rate_limits",
        "response.created",
        "response.in_progress",
    ]
    await env.control.add_fault("close_after_created", count=1, after_events=3, transport="ws")
    raw = await open_raw_ws(env)
    async with raw.stream:
        got_ws = await raw.turn(request_body())
    assert [m["type"] for m in got_ws.messages] == [
        "codex.rate_limits",
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]
    # the frames before the cut in one write, the close frame in a write of its own
    assert got_ws.close_code == 1011 and len(got_ws.reads) <= 2


async def test_whole_mode_response_failed_is_one_complete_write(make_mock: MockFactory) -> None:
    env = await make_mock(config("whole"))
    await env.control.add_fault("response_failed", count=1)
    got = await http_turn(env, request_body())
    assert got.complete and len(got.reads) == 1
    assert got.events[-1]["type"] == "response.failed"


# -- split ---------------------------------------------------------------------------------
async def test_split_http_answer_arrives_in_pieces_with_the_same_events(
    make_mock: MockFactory,
) -> None:
    baseline = await http_turn(await make_mock(config("event")), request_body())
    split = await http_turn(await make_mock(config("split")), request_body())
    assert baseline.complete and split.complete
    assert normalized(split.events) == normalized(baseline.events)
    # one write per event (plus the head and the end of the body) at most in event mode
    assert len(split.reads) > len(split.events) + 2, f"{len(split.reads)} reads"
    assert split.reads_ending_inside_an_event > 0


async def test_split_websocket_messages_arrive_in_fragments(make_mock: MockFactory) -> None:
    results: list[WsReads] = []
    for mode in ("event", "split"):
        raw = await open_raw_ws(await make_mock(config(mode)))
        async with raw.stream:
            results.append(await raw.turn(request_body()))
    baseline, split = results
    assert split.messages[-1]["type"] == "response.completed"
    assert normalized(split.messages) == normalized(baseline.messages)
    assert baseline.frames == len(baseline.messages)
    assert split.frames >= 2 * len(split.messages), f"{split.frames} frames"


def test_split_segmenter_cuts_inside_events_and_coalesces_short_messages() -> None:
    rng = random.Random(7)
    sse = b'event: response.created\ndata: {"type":"response.created"}\n\n'
    for _ in range(50):
        cuts = sse_cuts(rng, sse)
        assert len(sse) - 1 in cuts  # between the two final newlines
        assert any(0 < c < sse.index(b"\n") for c in cuts)  # inside the event: line
        assert any(sse.index(b"{") < c <= sse.rindex(b"}") for c in cuts)  # inside the JSON
    segmenter = Segmenter("split", rng)
    texts = [json.dumps({"type": "delta", "n": n}) for n in range(40)]
    writes = [w for t in texts for w in segmenter.message(t)] + segmenter.flush_frames()
    frames = [f for w in writes for f in w.frames]
    assert "".join(f.text for f in frames) == "".join(texts)
    assert sum(f.finished for f in frames) == len(texts) and len(frames) > 2 * len(texts) - 1
    assert any(sum(f.finished for f in w.frames) >= 2 for w in writes)  # coalesced messages


# -- settings --------------------------------------------------------------------------------
async def test_segmentation_changes_at_runtime(mock: MockEnv) -> None:
    assert (await mock.control.configure())["segmentation"] == "event"
    assert (await mock.control.configure(segmentation="whole"))["segmentation"] == "whole"
    got = await http_turn(mock, request_body())
    assert got.complete and len(got.reads) == 1
    response = await mock.client.patch(
        f"{mock.root}/__mock__/config", json={"segmentation": "sideways"}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_config"
    with pytest.raises(ValueError, match="segmentation"):
        MockConfig(segmentation="sideways")


async def test_segmentation_fault_scopes_one_request_or_one_connection(
    make_mock: MockFactory,
) -> None:
    env = await make_mock(config("event", first_event_delay=0.01, event_delay=0.01))
    await env.control.add_fault("segmentation", mode="whole", count=1, transport="http")
    got = await http_turn(env, request_body())
    assert got.complete and len(got.reads) == 1
    # the fault is spent: the next answer is written event by event, with its delays between
    assert len((await http_turn(env, request_body())).reads) > 1
    await env.control.add_fault("segmentation", on="upgrade", mode="whole", count=1)
    raw = await open_raw_ws(env)
    async with raw.stream:
        for _ in range(2):
            assert len((await raw.turn(request_body())).reads) == 1
    for spec in (
        {"kind": "segmentation", "mode": "sideways"},
        {"kind": "segmentation", "on": "models"},
    ):
        response = await env.client.post(f"{env.root}/__mock__/faults", json=spec)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_fault"
