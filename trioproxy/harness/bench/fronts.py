"""The ``chat`` and ``messages`` scenarios: the independent streamed turns of ``sse``, sent to
the proxy's translated fronts (OpenAI Chat Completions, ``POST /v1/chat/completions``, and
Anthropic Messages, ``POST /v1/messages``) and measured against the proxy's own Responses
front in the same run.

The mock speaks only the Responses API, so the baseline is not the mock: each round runs the
``sse`` turn against the proxy's Responses route (target ``responses``), then the same turn
as the front's request (target ``chat`` or ``messages``), in alternating phases of
``duration / rounds`` seconds, merged per target. The three requests carry the same content
(the developer text of ``--input-bytes`` as instructions, the user's ``hello``, the
``exec_command`` tool), so upstream gets equivalent requests and answers them alike; what
differs is the proxy's work: the front's request translated into a Responses request, each
upstream event translated into the front's frames.

TTFB is the time to the first *content* on all three: the first content delta upstream
(``response.output_text.delta`` and the other ``CONTENT_DELTAS``), the first Chat chunk
with content (``delta.content``, ``refusal``, ``reasoning_content`` or ``tool_calls``), the
first Anthropic ``content_block_delta``; each front's is made from that upstream delta, so
the three are timed at the same upstream event. (``sse`` itself is timed at the first event
past the preamble, ``response.output_item.added``, which precedes the first delta by two
``--upstream-gap``s with the mock and has no counterpart in the fronts: a Chat stream sends
only its role chunk for it, a Messages stream nothing.) The first frame of any kind is kept
too (``extra_ms.first_frame``). A turn is complete at ``data: [DONE]`` after a chunk with a
``finish_reason`` (chat) or at ``event: message_stop`` after ``message_start`` and
``message_delta`` (messages); an error chunk or ``error`` event counts by its code.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import trio

from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import (
    CONTENT_DELTAS,
    FrameReader,
    HttpClient,
    TurnOutcome,
    _frame_data,
)
from trioproxy.harness.bench.measure import RunStats, ratio
from trioproxy.harness.bench.phase import Bench, Budget, Worker, record, run_phase, think
from trioproxy.harness.bench.runs import apply_shape, finish
from trioproxy.harness.bench.stack import Endpoint
from trioproxy.harness.bench.workers import ERROR_PAUSE, plain_body

#: front scenario -> the route it is served on
FRONT_PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages"}
BASELINE = "responses"  # the target name of the Responses front, the baseline
CHAT_MODEL = "gpt-5.5"  # the model of the Responses request (``bodies.request``)
MESSAGES_MODEL = "claude-sonnet-4-5"  # what an Anthropic client names; mapped to gpt-5.5
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"')
_EVENT = re.compile(rb"^event:[ \t]*(\S+)", re.MULTILINE)


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


@attrs.define(eq=False)
class ChatReader:
    """A Chat Completions stream: ``data: {chat.completion.chunk}`` frames, ``data: [DONE]``
    at the end; an error arrives as a ``{"error": {...}}`` chunk (and no ``[DONE]``)."""

    finished: bool = False  # a chunk with a finish_reason was seen

    def see_frame(self, outcome: TurnOutcome, frame: bytes) -> None:
        data = _frame_data(frame)
        if not data:
            return  # a comment (keep-alive)
        outcome.events += 1
        now = trio.current_time() - outcome.started
        if outcome.first_frame is None:
            outcome.first_frame = now
        if data == b"[DONE]":
            if not self.finished and outcome.error is None:
                outcome.error = "no_finish_reason"
            outcome.terminal = {"type": "[DONE]"}
            return
        if b'"error"' in data[:16]:
            value = _json(data)
            err = value.get("error") if isinstance(value, dict) else None
            if isinstance(err, dict):
                outcome.error = str(err.get("code") or err.get("type") or "error_chunk")
                return
        if _FINISH.search(data):
            self.finished = True
        if outcome.ttfb is None:
            value = _json(data)
            if value is None:
                outcome.error = "bad_json"
                return
            for choice in value.get("choices") or []:
                delta = choice.get("delta") or {}
                if any(delta.get(k) for k in ("content", "refusal", "reasoning_content")) or (
                    delta.get("tool_calls")
                ):
                    outcome.ttfb = now
                    break


@attrs.define(eq=False)
class MessagesReader:
    """An Anthropic Messages stream: ``event: NAME`` / ``data: {...}`` frames from
    ``message_start`` to ``message_stop``; a failure is an ``error`` event (and no
    ``message_stop``)."""

    started: bool = False  # message_start seen
    stopped: bool = False  # message_delta (the stop reason) seen

    def see_frame(self, outcome: TurnOutcome, frame: bytes) -> None:
        match = _EVENT.search(frame)
        data = _frame_data(frame)
        name = match.group(1).decode() if match else None
        if name is None and data:
            value = _json(data)
            name = value.get("type") if isinstance(value, dict) else None
        if name is None or name == "ping":
            return
        outcome.events += 1
        now = trio.current_time() - outcome.started
        if outcome.first_frame is None:
            outcome.first_frame = now
        if name == "message_start":
            self.started = True
        elif name == "content_block_delta":
            if outcome.ttfb is None:
                outcome.ttfb = now
        elif name == "message_delta":
            self.stopped = True
        elif name == "message_stop":
            if not (self.started and self.stopped) and outcome.error is None:
                outcome.error = "message_stop_out_of_order"
            outcome.terminal = {"type": "message_stop"}
        elif name == "error":
            value = _json(data)
            err = value.get("error") if isinstance(value, dict) else None
            code = err.get("type") if isinstance(err, dict) else None
            outcome.error = str(code or "error_event")


def _system_text(bench: Bench) -> str:
    """The developer text of ``plain_body``: the same instructions in every request."""
    content = bodies.developer_message(bench.config.input_bytes)["content"]
    return str(content[0]["text"])


def chat_body(bench: Bench) -> bytes:
    """The ``sse`` turn as a Chat Completions request."""
    tool = bodies.EXEC_TOOL
    return bodies.encode(
        {
            "model": CHAT_MODEL,
            "messages": [
                {"role": "developer", "content": _system_text(bench)},
                {"role": "user", "content": "hello"},
            ],
            "stream": True,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": tool["name"],
                        "description": tool["description"],
                        "parameters": tool["parameters"],
                        "strict": False,
                    },
                }
            ],
            "tool_choice": "auto",
            "reasoning_effort": "medium",
            "verbosity": "low",
        }
    )


def messages_body(bench: Bench) -> bytes:
    """The ``sse`` turn as an Anthropic Messages request."""
    tool = bodies.EXEC_TOOL
    return bodies.encode(
        {
            "model": MESSAGES_MODEL,
            "max_tokens": 1024,
            "system": _system_text(bench),
            "messages": [{"role": "user", "content": "hello"}],
            "stream": True,
            "tools": [
                {
                    "name": tool["name"],
                    "description": tool["description"],
                    "input_schema": tool["parameters"],
                }
            ],
            "tool_choice": {"type": "auto"},
        }
    )


def front_worker(bench: Bench, scenario: str, target: str) -> Worker:
    """Independent streamed turns on one keep-alive connection: the ``sse`` turn against
    the Responses front (``target`` ``responses``, timed at its first content delta), or
    the same turn as the front's request."""
    config = bench.config

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        headers: list[tuple[str, str]] = []
        if target == "chat":
            body = chat_body(bench)
        elif target == "messages":
            body = messages_body(bench)
            headers = [("anthropic-version", "2023-06-01")]
        else:
            body = plain_body(bench)
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        try:
            while trio.current_time() < deadline and budget.take():
                reader: FrameReader | None = None
                if target == "chat":
                    reader = ChatReader()
                elif target == "messages":
                    reader = MessagesReader()
                outcome = await client.sse_turn(
                    endpoint.path,
                    body,
                    headers,
                    limit=config.turn_timeout,
                    ttfb_kinds=CONTENT_DELTAS,
                    reader=reader,
                )
                if target == "chat":
                    outcome.success = "[DONE]"
                elif target == "messages":
                    outcome.success = "message_stop"
                record(stats, outcome)
                if outcome.completed and outcome.first_frame is not None:
                    stats.latency_of("first_frame").record(outcome.first_frame)
                if not outcome.completed:
                    await trio.sleep(ERROR_PAUSE)
                await think(bench, scenario)
        finally:
            await client.aclose()

    return worker


def _pct(run: dict[str, Any], metric: str, p: str) -> float | None:
    value = run.get(metric, {}).get(p)
    return float(value) if value is not None else None


#: the figures compared, front against the Responses front
FIGURES = ("turns_per_s", "ttfb_ms_p50", "ttfb_ms_p99", "cpu_ms_per_turn")


def compare_front(runs: dict[str, dict[str, Any]], front: str) -> dict[str, Any]:
    """The front against the Responses front: each figure of both and the ratio front /
    Responses (turns per second, TTFB p50 and p99, the proxy's CPU time per turn), the TTFB
    difference in ms, and the first frame's p50."""
    base, measured = runs.get(BASELINE), runs.get(front)
    if not base or not measured:
        return {}
    figures = {
        "turns_per_s": (base.get("turns_per_s"), measured.get("turns_per_s")),
        "ttfb_ms_p50": (_pct(base, "ttfb_ms", "p50"), _pct(measured, "ttfb_ms", "p50")),
        "ttfb_ms_p99": (_pct(base, "ttfb_ms", "p99"), _pct(measured, "ttfb_ms", "p99")),
        "cpu_ms_per_turn": (
            base.get("process", {}).get("cpu_ms_per_turn"),
            measured.get("process", {}).get("cpu_ms_per_turn"),
        ),
        "turn_latency_ms_p50": (
            _pct(base, "turn_latency_ms", "p50"),
            _pct(measured, "turn_latency_ms", "p50"),
        ),
        "first_frame_ms_p50": (
            base.get("extra_ms", {}).get("first_frame", {}).get("p50"),
            measured.get("extra_ms", {}).get("first_frame", {}).get("p50"),
        ),
    }
    out: dict[str, Any] = {"front": front}
    for name, (responses, value) in figures.items():
        out[f"{name}_responses"] = responses
        out[f"{name}_{front}"] = value
        out[f"{name}_ratio"] = ratio(value, responses)
    for p in ("p50", "p99"):
        a, b = figures[f"ttfb_ms_{p}"]
        if a is not None and b is not None:
            out[f"ttfb_ms_{p}_added"] = round(b - a, 3)
    return out


async def run_front(bench: Bench, scenario: str) -> dict[str, Any]:
    """The front scenario in ``rounds`` alternating phases against the proxy: the Responses
    front, then the translated front, merged per target."""
    shape = await apply_shape(bench, scenario)
    rounds = max(1, int(bench.config.get(scenario, "rounds")))
    duration = float(bench.config.get(scenario, "duration")) / rounds
    count = bench.config.get(scenario, "count")
    proxy = bench.stack.proxy
    endpoints = [
        attrs.evolve(proxy, name=BASELINE),
        attrs.evolve(proxy, name=scenario, path=FRONT_PATHS[scenario]),
    ]
    merged: dict[str, RunStats] = {}
    by_round: dict[str, list[dict[str, float | None]]] = {}
    for _ in range(rounds):
        for endpoint in endpoints:
            stats = await run_phase(
                bench,
                scenario,
                endpoint,
                front_worker(bench, scenario, endpoint.name),
                duration=duration,
                count=None if count is None else max(1, count // rounds),
            )
            window = bench.sampler.window(stats.started, stats.ended)
            cpu = window.get("cpu_s")
            by_round.setdefault(endpoint.name, []).append(
                {
                    "ttfb_p50": stats.ttfb.percentile_ms(50) if stats.ttfb.count else None,
                    "cpu_ms_per_turn": 1000 * cpu / stats.turns if cpu and stats.turns else None,
                }
            )
            if endpoint.name in merged:
                merged[endpoint.name].merge(stats)
            else:
                merged[endpoint.name] = stats
    runs = {name: await finish(bench, stats) for name, stats in merged.items()}
    derived = compare_front(runs, scenario)
    if rounds > 1:
        # the run's own spread: each round's front phase against the Responses phase before it
        pairs = list(zip(by_round[BASELINE], by_round[scenario], strict=True))
        derived["ttfb_ms_p50_added_by_round"] = [
            round(f["ttfb_p50"] - r["ttfb_p50"], 3)
            if f["ttfb_p50"] is not None and r["ttfb_p50"] is not None
            else None
            for r, f in pairs
        ]
        derived["cpu_ms_per_turn_ratio_by_round"] = [
            ratio(f["cpu_ms_per_turn"], r["cpu_ms_per_turn"]) for r, f in pairs
        ]
    return {
        "shape": shape,
        "runs": runs,
        "derived": derived,
        "note": (
            f"baseline: the proxy's Responses front ({proxy.path}), in alternating rounds "
            f"with {FRONT_PATHS[scenario]}; TTFB to the first content delta on both"
        ),
    }


async def scenario_chat(bench: Bench) -> dict[str, Any]:
    return await run_front(bench, "chat")


async def scenario_messages(bench: Bench) -> dict[str, Any]:
    return await run_front(bench, "messages")
