"""``soak``: steady mixed traffic for a long time, watching whether the proxy's memory levels
off (proxy only).

The traffic an operator's team makes: ``HTTP_CLIENTS`` clients loop over a pool of
``CONVERSATIONS`` conversation keys (a ``session-id`` each, so the HTTP bridge keeps a
session per key and reuses it), every third turn continuing the key's last response with
``previous_response_id``, inputs of 10 B to 4 KB; ``WS_CLIENTS`` clients do five chained
turns per WebSocket and reconnect; ``ABANDONING_CLIENTS`` clients leave their requests after
the first bytes. The report has the proxy's RSS over time (sampled with the process figures,
plotted by the bench), the RSS slope after the warm-up (the first quarter of the run) and over
the last half, the descriptors, the proxy's memory gauges every two seconds (plotted against
RSS in ``memory.png``), and the gauges and admission lanes once the load has stopped.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import HttpClient, ws_turn
from trioproxy.harness.bench.measure import RunStats
from trioproxy.harness.bench.phase import Bench, Budget, Worker, record, run_phase, think
from trioproxy.harness.bench.runs import apply_shape, finish
from trioproxy.harness.bench.stack import Endpoint
from trioproxy.upstream.ws import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamRejected,
    open_upstream_websocket,
)

HTTP_CLIENTS = 8
WS_CLIENTS = 4
ABANDONING_CLIENTS = 2
CONVERSATIONS = 50
WS_TURNS_PER_SOCKET = 5
WARM_UP_SHARE = 0.25  # the slope is taken after this share of the run
WS_BETA = "responses_websockets=2026-02-06"


def soak_input(bench: Bench, text: str) -> list[dict[str, Any]]:
    """A user message of 10 B to 4 KB."""
    size = bench.rng.randint(10, 4096)
    return [bodies.user_message(f"mock:say {text} " + "y" * max(0, size - len(text) - 10))]


def http_worker(bench: Bench, scenario: str, anchors: dict[str, str]) -> Worker:
    """Turns over the pool of conversation keys; every third one continues its key's last
    response."""

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        turn = 0
        try:
            while trio.current_time() < deadline and budget.take():
                key = f"soak-{bench.rng.randrange(CONVERSATIONS)}"
                previous = anchors.get(key) if turn % 3 == 2 else None
                body = bodies.request(
                    soak_input(bench, f"turn {turn}"), thread=None, previous_response_id=previous
                )
                outcome = await client.sse_turn(
                    endpoint.path,
                    bodies.encode(body),
                    [("session-id", key)],
                    limit=bench.config.turn_timeout,
                )
                record(stats, outcome)
                if outcome.completed and outcome.response_id is not None:
                    anchors[key] = outcome.response_id
                turn += 1
                await think(bench, scenario)
        finally:
            await client.aclose()

    return worker


def abandoning_worker(bench: Bench, scenario: str) -> Worker:
    """Requests left right after their first bytes (the head, or the first event)."""

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        try:
            while trio.current_time() < deadline and budget.take():
                key = f"soak-{bench.rng.randrange(CONVERSATIONS)}"
                body = bodies.request(soak_input(bench, "left"), thread=None)
                outcome = await client.sse_turn(
                    endpoint.path,
                    bodies.encode(body),
                    [("session-id", key)] if bench.rng.random() < 0.5 else [],
                    abandon_after=bench.rng.randint(0, 1),
                    limit=bench.config.turn_timeout,
                )
                record(stats, outcome)
                await think(bench, scenario)
        finally:
            await client.aclose()

    return worker


def ws_worker(bench: Bench, scenario: str) -> Worker:
    """Five chained turns per WebSocket, then a new one."""

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        headers = [("openai-beta", WS_BETA), *endpoint.headers_for(index)]
        while trio.current_time() < deadline and budget.count != budget.taken:
            try:
                async with open_upstream_websocket(endpoint.ws_url, headers) as ws:
                    stats.sessions += 1
                    previous = None
                    for turn in range(WS_TURNS_PER_SOCKET):
                        if trio.current_time() >= deadline or not budget.take():
                            return
                        body = bodies.request(
                            soak_input(bench, f"ws {turn}"),
                            thread=None,
                            previous_response_id=previous,
                        )
                        outcome = await ws_turn(ws, body, limit=bench.config.turn_timeout)
                        record(stats, outcome)
                        if not outcome.completed:
                            break
                        previous = outcome.response_id
                        await think(bench, scenario)
            except (UpstreamRejected, UpstreamConnectError, UpstreamClosed) as exc:
                stats.error(type(exc).__name__)
                await trio.sleep(0.05)

    return worker


def mixed(bench: Bench, scenario: str) -> Worker:
    anchors: dict[str, str] = {}
    kinds = (
        [http_worker(bench, scenario, anchors)] * HTTP_CLIENTS
        + [ws_worker(bench, scenario)] * WS_CLIENTS
        + [abandoning_worker(bench, scenario)] * ABANDONING_CLIENTS
    )

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        await kinds[index % len(kinds)](index, endpoint, stats, budget, deadline)

    return worker


async def proxy_gauges(endpoint: Endpoint) -> dict[str, Any]:
    """The proxy's ``/api/admission`` (lanes and memory), or an error note."""
    url = f"http://{endpoint.host}:{endpoint.port}/api/admission"
    try:
        async with httpx.AsyncClient(timeout=10, headers=endpoint.management_headers()) as client:
            response = await client.get(url)
        value = response.json()
        return value if isinstance(value, dict) else {"error": "not a JSON object"}
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return {"error": type(exc).__name__}


GAUGE_EVERY = 2.0  # seconds between reads of the proxy's memory gauges during the run


async def sample_gauges(endpoint: Endpoint, into: list[dict[str, Any]]) -> None:
    """The proxy's memory gauges every ``GAUGE_EVERY`` seconds, until cancelled."""
    url = f"http://{endpoint.host}:{endpoint.port}/api/admission"
    async with httpx.AsyncClient(timeout=10, headers=endpoint.management_headers()) as client:
        while True:
            try:
                memory = (await client.get(url)).json().get("memory")
            except (httpx.HTTPError, ValueError):
                memory = None
            if isinstance(memory, dict):
                into.append({"t": trio.current_time(), **memory})
            await trio.sleep(GAUGE_EVERY)


def gauge_series(samples: list[dict[str, Any]], t0: float) -> dict[str, list[Any]]:
    """The sampled gauges as series on the process samples' time axis (``t0``)."""
    return {
        "t": [round(s["t"] - t0, 3) for s in samples],
        "conversation_mib": [
            round(s.get("conversations", {}).get("bytes", 0) / 2**20, 2) for s in samples
        ],
        "conversation_budget_mib": [
            round(s.get("conversations", {}).get("max_bytes", 0) / 2**20, 2) for s in samples
        ],
        "bridge_sessions": [s.get("bridge", {}).get("sessions", 0) for s in samples],
        "request_log_queued": [s.get("request_log", {}).get("queued", 0) for s in samples],
    }


async def scenario_soak(bench: Bench) -> dict[str, Any]:
    scenario = "soak"
    shape = await apply_shape(bench, scenario)
    proxy = bench.stack.proxy
    gauges: list[dict[str, Any]] = []
    async with trio.open_nursery() as watching:
        watching.start_soon(sample_gauges, proxy, gauges)
        stats = await run_phase(bench, scenario, proxy, mixed(bench, scenario))
        watching.cancel_scope.cancel(reason="the load stopped")
    run = await finish(bench, stats)
    await trio.sleep(2.0)  # the load has stopped: what stays is what the proxy keeps
    after = bench.sampler.sample()
    samples = [s for s in bench.sampler.samples if stats.started <= s.t <= stats.ended]
    derived: dict[str, Any] = {"clients": {"http": HTTP_CLIENTS, "ws": WS_CLIENTS}}
    if len(samples) >= 8:
        warm = stats.started + (stats.ended - stats.started) * WARM_UP_SHARE
        steady = [s for s in samples if s.t >= warm]
        derived["rss_slope_mib_per_min_after_warm_up"] = round(
            slope([(s.t, s.rss / 2**20) for s in steady]) * 60, 3
        )
        derived["fds_slope_per_min_after_warm_up"] = round(
            slope([(s.t, float(s.fds)) for s in steady]) * 60, 3
        )
        half = stats.started + (stats.ended - stats.started) / 2
        derived["rss_slope_mib_per_min_last_half"] = round(
            slope([(s.t, s.rss / 2**20) for s in samples if s.t >= half]) * 60, 3
        )
        derived["rss_at_warm_up_mib"] = round(steady[0].rss / 2**20, 1)
        derived["rss_max_mib"] = round(max(s.rss for s in samples) / 2**20, 1)
        derived["rss_end_mib"] = round(samples[-1].rss / 2**20, 1)
    if after is not None:
        derived["rss_after_load_mib"] = round(after.rss / 2**20, 1)
        derived["fds_after_load"] = after.fds
    derived["gauges_after_load"] = await proxy_gauges(proxy)
    if gauges and bench.sampler.samples:
        series = gauge_series(gauges, bench.sampler.samples[0].t)
        derived["conversation_mib_max"] = max(series["conversation_mib"])
        derived["bridge_sessions_max"] = max(series["bridge_sessions"])
        return {
            "shape": shape,
            "runs": {"proxy": run},
            "derived": derived,
            "gauge_series": series,
        }
    return {"shape": shape, "runs": {"proxy": run}, "derived": derived}


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of ``points``."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    if var == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / var
