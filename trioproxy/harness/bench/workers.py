"""The load clients' loops, one per simulated user: independent SSE turns, Codex-like
WebSocket sessions (a prewarm, then per user turn a tool call and the follow-up with its
output, each on ``previous_response_id``), and the same conversation over HTTP.

A worker runs until the phase deadline or until the phase's shared turn budget is spent; a
worker whose turn failed waits ``ERROR_PAUSE`` so that a target that fails fast is not
hammered."""

from __future__ import annotations

from typing import Any

import trio

from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import (
    HttpClient,
    UpstreamConnectError,
    UpstreamRejected,
    rejected_code,
    ws_turn,
)
from trioproxy.harness.bench.measure import RunStats
from trioproxy.harness.bench.phase import Bench, Budget, Worker, record, think
from trioproxy.harness.bench.stack import Endpoint
from trioproxy.upstream.ws import UpstreamClosed, open_upstream_websocket

WS_BETA = "responses_websockets=2026-02-06"
ERROR_PAUSE = 0.05  # seconds a client waits after an error before its next turn


def plain_body(bench: Bench) -> bytes:
    """An independent turn: the base instructions and one user message."""
    return bodies.encode(
        bodies.request(
            [bodies.developer_message(bench.config.input_bytes), bodies.user_message("hello")],
            thread=None,
        )
    )


def sse_worker(bench: Bench, scenario: str, *, abandon: float = 0.0) -> Worker:
    """Independent HTTP turns; with ``abandon``, that share of turns is left after a random
    number of events."""
    config = bench.config

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        # independent turns: no session key, so the proxy relays over plain HTTP/SSE
        body = plain_body(bench)
        headers: list[tuple[str, str]] = []
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        try:
            while trio.current_time() < deadline and budget.take():
                abandon_after = None
                if abandon and bench.rng.random() < abandon:
                    abandon_after = bench.rng.randint(0, 12)
                outcome = await client.sse_turn(
                    endpoint.path,
                    body,
                    headers,
                    abandon_after=abandon_after,
                    limit=config.turn_timeout,
                )
                record(stats, outcome)
                if not outcome.completed and not outcome.abandoned:
                    await trio.sleep(ERROR_PAUSE)
                await think(bench, scenario)
        finally:
            await client.aclose()

    return worker


async def ws_conversation(
    bench: Bench,
    scenario: str,
    index: int,
    endpoint: Endpoint,
    stats: RunStats,
    budget: Budget,
    deadline: float,
    *,
    abandon: float = 0.0,
) -> None:
    """One Codex-like WebSocket session: prewarm, then user turns with a tool-call loop."""
    config = bench.config
    thread = bodies.new_thread()
    headers = [("openai-beta", WS_BETA), ("session-id", thread), *endpoint.headers_for(index)]
    timeout = config.turn_timeout
    try:
        async with open_upstream_websocket(endpoint.ws_url, headers, connect_timeout=timeout) as ws:
            stats.sessions += 1
            prewarm = bodies.request(
                [bodies.developer_message(config.input_bytes)], thread=thread, generate=False
            )
            outcome = await ws_turn(ws, prewarm, limit=timeout)
            record(stats, outcome, name="prewarm")
            previous = outcome.response_id
            if not outcome.completed:
                return
            for turn in range(config.turns_per_session):
                if trio.current_time() >= deadline or not budget.take():
                    return
                abandon_after = None
                if abandon and bench.rng.random() < abandon:
                    abandon_after = bench.rng.randint(1, 12)
                ask = bodies.request(
                    [bodies.user_message(f"mock:exec echo turn {turn}")],
                    thread=thread,
                    previous_response_id=previous,
                )
                outcome = await ws_turn(ws, ask, abandon_after=abandon_after, limit=timeout)
                record(stats, outcome, name="tool_call")
                if not outcome.completed:
                    return  # an error or an abandoned turn ends the session, as in the CLI
                call_id = bodies.function_call_id(outcome.terminal)
                if call_id is None:
                    stats.error("no_function_call")
                    return
                answer = bodies.request(
                    [bodies.tool_output(call_id, f"Process exited with code 0\nturn {turn}")],
                    thread=thread,
                    previous_response_id=outcome.response_id,
                )
                outcome = await ws_turn(ws, answer, limit=timeout)
                record(stats, outcome, name="after_tool")
                if not outcome.completed:
                    return
                previous = outcome.response_id
                await think(bench, scenario)
    except UpstreamRejected as exc:
        code, overload = rejected_code(exc)
        stats.error(code, overload=overload)
    except UpstreamConnectError:
        stats.error("connect_error")
    except UpstreamClosed as exc:
        stats.error(f"ws_closed_{exc.code}")


def ws_worker(bench: Bench, scenario: str, *, abandon: float = 0.0) -> Worker:
    """WebSocket sessions one after another."""

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        while trio.current_time() < deadline and budget.count != budget.taken:
            errors = sum(stats.errors.values())
            await ws_conversation(
                bench, scenario, index, endpoint, stats, budget, deadline, abandon=abandon
            )
            if sum(stats.errors.values()) != errors:
                await trio.sleep(ERROR_PAUSE)
            await think(bench, scenario)

    return worker


def bridge_worker(bench: Bench, scenario: str) -> Worker:
    """The WebSocket conversation over HTTP, conversations one after another on one
    keep-alive connection."""

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        try:
            while trio.current_time() < deadline and budget.count != budget.taken:
                await bridge_conversation(
                    bench, scenario, client, endpoint, stats, budget, deadline
                )
                await think(bench, scenario)
        finally:
            await client.aclose()

    return worker


async def bridge_conversation(
    bench: Bench,
    scenario: str,
    client: HttpClient,
    endpoint: Endpoint,
    stats: RunStats,
    budget: Budget,
    deadline: float,
) -> None:
    """The WebSocket conversation over HTTP: follow-ups send only the new items with
    ``previous_response_id`` and a ``session_id`` header."""
    config = bench.config
    thread = bodies.new_thread()
    headers = [("session_id", thread)]
    items: list[dict[str, Any]] = [bodies.developer_message(config.input_bytes)]
    previous: str | None = None
    stats.sessions += 1
    for turn in range(config.turns_per_session):
        if trio.current_time() >= deadline or not budget.take():
            return
        items.append(bodies.user_message(f"mock:exec echo turn {turn}"))
        ask = bodies.request(items, thread=thread, previous_response_id=previous)
        outcome = await client.sse_turn(
            endpoint.path, bodies.encode(ask), headers, limit=config.turn_timeout
        )
        record(stats, outcome, name="first" if previous is None else "follow_up")
        call_id = bodies.function_call_id(outcome.terminal)
        if not outcome.completed or call_id is None:
            if outcome.completed:
                stats.error("no_function_call")
            return
        items = [bodies.tool_output(call_id, f"Process exited with code 0\nturn {turn}")]
        answer = bodies.request(items, thread=thread, previous_response_id=outcome.response_id)
        outcome = await client.sse_turn(
            endpoint.path, bodies.encode(answer), headers, limit=config.turn_timeout
        )
        record(stats, outcome, name="follow_up")
        if not outcome.completed:
            return
        previous = outcome.response_id
        items = []
        await think(bench, scenario)
