"""The scenarios. Each runs its phases (the mock directly first, as the baseline, then the
proxy) and returns ``{"runs": {target: summary}, "derived": {...}}`` for the report.

* ``sse``      independent HTTP turns (the Codex CLI over HTTP sends whole histories).
* ``relay``    the same with long answers and no upstream delays: relay throughput.
* ``ws``       multi-turn WebSocket sessions like the Codex CLI: a prewarm
               (``generate: false``), then per user turn a tool call and the follow-up with
               the ``function_call_output``, each continuing with ``previous_response_id``.
* ``bridge``   the same conversation over HTTP: follow-ups carry ``previous_response_id``
               and a ``session_id`` header (the proxy's HTTP bridge; the mock, like the real
               backend, has no ``previous_response_id`` over HTTP, so this runs against the
               proxy only).
* ``failover`` sequential turns; before every other one the mock is told to answer the next
               request with 429 ``usage_limit_reached`` (the account is exhausted): the proxy
               must fail over; the cost is that turn's TTFB against the normal turns'.
* ``chaos``    SSE and WebSocket clients that abandon at random points while the mock
               injects faults; afterwards every admission gauge must be back at zero and
               the descriptors at their baseline (proxy only; ``stress.py``).
* ``soak``     a team's mixed traffic (bridged HTTP conversations, chained WebSocket
               turns, abandoned requests) for a long time: the proxy's RSS over time, its
               slope after the warm-up, and the memory gauges once the load stopped (proxy
               only; ``soak.py``).
* ``idle``     many open, idle WebSocket sessions, each after one turn (so the proxy holds
               its upstream socket): RSS per open session (``idle.py``).
* ``chat``     the ``sse`` turns as Chat Completions requests (``/v1/chat/completions``),
               against the proxy's Responses front in alternating rounds (``fronts.py``).
* ``messages`` the same as Anthropic Messages requests (``/v1/messages``).

The clients' loops are in ``workers.py``, what the scenarios share in ``runs.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from trioproxy.harness.bench.clients import HttpClient
from trioproxy.harness.bench.fronts import scenario_chat, scenario_messages
from trioproxy.harness.bench.idle import scenario_idle
from trioproxy.harness.bench.measure import RunStats
from trioproxy.harness.bench.phase import Bench, Budget, record, run_phase
from trioproxy.harness.bench.runs import (
    apply_shape,
    compare,
    finish,
    restore_accounts,
    run_rounds,
)
from trioproxy.harness.bench.soak import scenario_soak
from trioproxy.harness.bench.stack import Endpoint
from trioproxy.harness.bench.stress import scenario_chaos
from trioproxy.harness.bench.workers import bridge_worker, plain_body, sse_worker, ws_worker
from trioproxy.harness.mock_upstream.client import MockControl

Scenario = Callable[[Bench], Awaitable[dict[str, Any]]]


async def scenario_sse(bench: Bench) -> dict[str, Any]:
    return await run_rounds(bench, "sse", lambda: sse_worker(bench, "sse"))


async def scenario_relay(bench: Bench) -> dict[str, Any]:
    return await run_rounds(bench, "relay", lambda: sse_worker(bench, "relay"))


async def scenario_ws(bench: Bench) -> dict[str, Any]:
    return await run_rounds(bench, "ws", lambda: ws_worker(bench, "ws"))


async def scenario_bridge(bench: Bench) -> dict[str, Any]:
    result = await run_rounds(bench, "bridge", lambda: bridge_worker(bench, "bridge"), direct=False)
    result["note"] = (
        "proxy only: the mock, like the real backend, knows no previous_response_id over HTTP"
    )
    return result


@attrs.define(eq=False)
class Failover:
    """The ``failover`` scenario's one client: ``pairs`` pairs of sequential turns, the
    second of each pair answered upstream with a 429 first (proxy only; the direct run
    times the normal turns)."""

    bench: Bench
    pairs: int
    control: MockControl | None
    not_fired: int = 0
    restored: list[bool] = attrs.field(factory=list)

    async def _turn(
        self, client: HttpClient, endpoint: Endpoint, stats: RunStats, body: bytes, name: str
    ) -> None:
        limit = self.bench.config.turn_timeout
        record(stats, await client.sse_turn(endpoint.path, body, [], limit=limit), name=name)

    async def direct(
        self, index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        body = plain_body(self.bench)
        try:
            for _ in range(self.pairs):
                if trio.current_time() >= deadline:
                    return
                await self._turn(client, endpoint, stats, body, "normal")
                await trio.sleep(0.2)
        finally:
            await client.aclose()

    async def proxy(
        self, index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        control = self.control
        assert control is not None
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        body = plain_body(self.bench)
        try:
            for _ in range(self.pairs):
                if trio.current_time() >= deadline:
                    return
                await self._turn(client, endpoint, stats, body, "normal")
                # the next upstream request answers 429 usage_limit_reached; the account
                # is exhausted for about a second, so the pool is never empty
                fault = await control.add_fault("usage_limit", count=1, resets_in=1)
                await self._turn(client, endpoint, stats, body, "failover")
                if any(f["id"] == fault["id"] for f in await control.faults()):
                    self.not_fired += 1
                await control.clear_faults()
                # the 429 (with 100% used in its headers) exhausts the account for the
                # proxy; give the pool its accounts back before the next pair (untimed)
                self.restored.append(await restore_accounts(self.bench))
                await trio.sleep(0.2)
        finally:
            await client.aclose()

    def derived(self, runs: dict[str, Any]) -> dict[str, Any]:
        """The TTFB a failover adds, against the proxy's normal turns and direct ones."""
        derived: dict[str, Any] = {
            "faults_not_fired": self.not_fired,
            "accounts_restored_between_pairs": all(self.restored) if self.restored else None,
        }
        proxy = runs.get("proxy", {}).get("extra_ms", {})
        normal, failover = proxy.get("ttfb_normal"), proxy.get("ttfb_failover")
        if normal and failover and normal.get("count") and failover.get("count"):
            for p in ("p50", "p99"):
                derived[f"failover_ttfb_added_{p}_ms"] = round(failover[p] - normal[p], 3)
        direct = runs.get("direct", {}).get("extra_ms", {}).get("ttfb_normal")
        if direct and failover and failover.get("count"):
            derived["failover_ttfb_vs_direct_p50_ms"] = round(failover["p50"] - direct["p50"], 3)
        return derived


async def scenario_failover(bench: Bench) -> dict[str, Any]:
    scenario = "failover"
    shape = await apply_shape(bench, scenario)
    pairs = int(bench.config.get(scenario, "count") or 40)
    failover = Failover(bench, pairs, bench.stack.mock)
    runs: dict[str, Any] = {}
    duration = pairs * 3.0 + 10
    for endpoint in bench.endpoints(scenario):
        if endpoint.name == "proxy" and failover.control is None:
            runs["proxy"] = {"skipped": "needs the mock's control API (--mock URL)"}
            continue
        worker = failover.direct if endpoint.name == "direct" else failover.proxy
        stats = await run_phase(bench, scenario, endpoint, worker, concurrency=1, duration=duration)
        runs[endpoint.name] = await finish(bench, stats)
    return {"shape": shape, "runs": runs, "derived": failover.derived(runs)}


SCENARIO_FUNCTIONS: dict[str, Scenario] = {
    "sse": scenario_sse,
    "relay": scenario_relay,
    "ws": scenario_ws,
    "bridge": scenario_bridge,
    "failover": scenario_failover,
    "chaos": scenario_chaos,
    "soak": scenario_soak,
    "idle": scenario_idle,
    "chat": scenario_chat,
    "messages": scenario_messages,
}

__all__ = ["SCENARIO_FUNCTIONS", "compare"]
