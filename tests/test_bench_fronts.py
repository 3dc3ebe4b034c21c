"""The bench's ``chat`` and ``messages`` scenarios: the translated fronts against the proxy's
Responses front, run for real on loopback with tiny counts; and their stream readers against
a scripted server that splits frames across reads, packs several into one, and ends lines
with CRLF."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from tests.test_bench import TINY
from tests.test_bench_client import HEAD, _serve, chunk
from trioproxy.harness.bench.config import FRONT_SCENARIOS, BenchConfig
from trioproxy.harness.bench.fronts import ChatReader, MessagesReader
from trioproxy.harness.bench.runner import run_bench

CHAT = [
    b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hel"}}]}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]
MESSAGES = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m"}}\n\n',
    b'event: ping\ndata: {"type":"ping"}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hello"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


def _pieces(frames: list[bytes], crlf: bool) -> list[bytes | float]:
    """The frames as one chunked body cut into reads: the first two together, the rest
    in pieces of 7 bytes, with a pause before the first content."""
    body = b"".join(frames)
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    first = len(frames[0]) + (frames[0].count(b"\n") if crlf else 0)
    out: list[bytes | float] = [HEAD, chunk(body[:first]), 0.2]
    out += [chunk(body[i : i + 7]) for i in range(first, len(body), 7)]
    return [*out, b"0\r\n\r\n"]


def _answer(frames: list[bytes], crlf: bool, request: int) -> list[bytes | float]:
    return _pieces(frames, crlf)


async def test_front_readers_parse_split_and_packed_frames(nursery: trio.Nursery) -> None:
    for frames, reader, success, events in (
        (CHAT, ChatReader, "[DONE]", 5),
        (MESSAGES, MessagesReader, "message_stop", 6),
    ):
        for crlf in (False, True):
            answer: Callable[[int], list[bytes | float]] = partial(_answer, frames, crlf)
            _, client = await _serve(nursery, answer)
            try:
                outcome = await client.sse_turn("/f", b"{}", [], reader=reader())
                outcome.success = success
                assert outcome.completed, outcome
                assert outcome.events == events, outcome
                # the first frame at once, the first content after the pause
                assert outcome.first_frame is not None and outcome.first_frame < 0.15
                assert outcome.ttfb is not None and outcome.ttfb >= 0.2
            finally:
                await client.aclose()


async def test_a_front_error_is_counted_by_its_code(nursery: trio.Nursery) -> None:
    chat = [CHAT[0], b'data: {"error":{"message":"x","type":"server_error","code":"boom"}}\n\n']
    _, client = await _serve(nursery, lambda n: [HEAD, chunk(b"".join(chat)), b"0\r\n\r\n"])
    try:
        outcome = await client.sse_turn("/f", b"{}", [], reader=ChatReader())
        assert (outcome.completed, outcome.error) == (False, "boom")
    finally:
        await client.aclose()


async def test_front_scenarios_against_a_started_stack(tmp_path: Path) -> None:
    out = tmp_path / "fronts"
    config = BenchConfig(
        output=out,
        scenarios=FRONT_SCENARIOS,
        accounts=2,
        plots=False,
        **{**TINY, "count": 4, "rounds": 2},
    )
    results = await run_bench(config, ["trioproxy", "bench", "--scenario", "chat"])
    assert set(results["scenarios"]) == {"chat", "messages"}
    summary = (out / "summary.md").read_text()
    assert "## Fronts" in summary
    written = json.loads((out / "results.json").read_text())
    for front in FRONT_SCENARIOS:
        scenario = written["scenarios"][front]
        assert set(scenario["runs"]) == {"responses", front}
        for target, run in scenario["runs"].items():
            assert run["turns"] == 4 and run["errors"] == {}, (front, target, run["errors"])
            assert run["ttfb_ms"]["count"] == run["turns"]
            assert run["extra_ms"]["first_frame"]["count"] == run["turns"]
            assert run["notes"]["rounds"] == 2
            assert run["gauges"]["zero"], (front, target, run["gauges"])
            # present; with phases of two turns the sampler's window is too short to trust
            assert "cpu_ms_per_turn" in run["process"]
        derived = scenario["derived"]
        assert derived["front"] == front
        for figure in ("turns_per_s", "ttfb_ms_p50", "ttfb_ms_p99"):
            assert derived[f"{figure}_ratio"] > 0, (front, figure, derived)
        assert "cpu_ms_per_turn_ratio" in derived
        assert len(derived["ttfb_ms_p50_added_by_round"]) == 2
        assert f"| {front} | proxy CPU ms per turn |" in summary
