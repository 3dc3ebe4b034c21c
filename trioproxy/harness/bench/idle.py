"""The ``idle`` scenario: many open, idle WebSocket sessions, each after one turn (so the
proxy holds its upstream socket too), held for a while; what each open session costs in RSS
and descriptors, against what the mock alone spends on one socket in the direct run.

Sessions are opened by ``concurrency`` openers at once; each is started with
``nursery.start`` and reports once its turn completed, so the hold begins when every session
that could open is open. The whole phase is bounded by the time every opening could take
plus the hold."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import (
    UpstreamConnectError,
    UpstreamRejected,
    rejected_code,
    ws_turn,
)
from trioproxy.harness.bench.measure import RunStats
from trioproxy.harness.bench.phase import Bench, process_view, record, settle_gauges
from trioproxy.harness.bench.runs import apply_shape
from trioproxy.harness.bench.stack import Endpoint
from trioproxy.harness.bench.workers import WS_BETA
from trioproxy.upstream.ws import UpstreamClosed, open_upstream_websocket


async def scenario_idle(bench: Bench) -> dict[str, Any]:
    scenario = "idle"
    shape = await apply_shape(bench, scenario)
    runs = {}
    for endpoint in bench.endpoints(scenario):
        runs[endpoint.name] = await _idle_phase(bench, endpoint)
    derived: dict[str, Any] = {}
    proxy = runs.get("proxy", {}).get("idle", {})
    if proxy.get("rss_per_session_kib") is not None:
        derived["proxy_rss_per_session_kib"] = proxy["rss_per_session_kib"]
        derived["sessions_open"] = proxy["open"]
    direct = runs.get("direct", {}).get("idle", {})
    if direct.get("mock_rss_per_session_kib") is not None:
        derived["mock_rss_per_session_kib_direct"] = direct["mock_rss_per_session_kib"]
    return {"shape": shape, "runs": runs, "derived": derived}


@attrs.define(eq=False)
class IdleSessions:
    """The sessions of one idle phase: each opens, completes one turn, reports, and stays
    open until ``release`` is set."""

    bench: Bench
    endpoint: Endpoint
    stats: RunStats
    release: trio.Event = attrs.field(factory=trio.Event)
    open: int = 0
    body: dict[str, Any] = attrs.field(
        factory=lambda: bodies.request([bodies.user_message("hello")], thread=None)
    )

    async def session(
        self, index: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        timeout = self.bench.config.turn_timeout
        headers = [("openai-beta", WS_BETA), *self.endpoint.headers_for(index)]
        started = False
        try:
            async with open_upstream_websocket(
                self.endpoint.ws_url, headers, connect_timeout=timeout
            ) as ws:
                outcome = await ws_turn(ws, self.body, limit=timeout)
                record(self.stats, outcome)
                if not outcome.completed:
                    return
                self.stats.sessions += 1
                self.open += 1
                task_status.started()
                started = True
                await self.release.wait()
                self.open -= 1
        except UpstreamRejected as exc:
            code, overload = rejected_code(exc)
            self.stats.error(code, overload=overload)
        except UpstreamConnectError:
            self.stats.error("connect_error")
        except UpstreamClosed as exc:
            self.stats.error(f"ws_closed_{exc.code}")
        finally:
            if not started:
                task_status.started()

    async def open_all(self, nursery: trio.Nursery, sessions: int, openers: int) -> None:
        """Open ``sessions`` sessions in ``nursery``, ``openers`` at a time."""

        async def opener(first: int) -> None:
            for index in range(first, sessions, openers):
                await nursery.start(self.session, index)

        async with trio.open_nursery() as opening:
            for first in range(openers):
                opening.start_soon(opener, first)


async def _idle_phase(bench: Bench, endpoint: Endpoint) -> dict[str, Any]:
    config = bench.config
    scenario = "idle"
    sessions = int(config.sessions or config.get(scenario, "sessions"))
    openers = int(config.get(scenario, "concurrency"))
    hold = float(config.get(scenario, "duration"))
    stats = RunStats(scenario, endpoint.name)
    bench.live = stats
    bench.label = f"{scenario}/{endpoint.name}"
    bench.sampler.phase(bench.label)
    before = bench.sampler.sample()
    await trio.sleep(0.5)
    before = bench.sampler.sample() or before
    stats.started = trio.current_time()
    idle = IdleSessions(bench, endpoint, stats)
    measured: dict[str, Any] = {}
    bound = sessions * config.turn_timeout / max(1, openers) + hold + 60
    with trio.move_on_after(bound) as scope:
        async with trio.open_nursery() as nursery:
            await idle.open_all(nursery, sessions, openers)
            opened_at = trio.current_time()
            await trio.sleep(hold)
            after = bench.sampler.sample()
            measured = _idle_numbers(before, after, idle.open, endpoint.name)
            measured["open_s"] = round(opened_at - stats.started, 3)
            idle.release.set()
    stats.ended = trio.current_time()
    if scope.cancelled_caught:
        stats.notes["cut_off"] = True
    bench.sampler.phase("between")
    summary = stats.summary()
    summary["process"] = process_view(bench, stats)
    summary["idle"] = measured
    if endpoint.name == "proxy":
        summary["gauges"] = await settle_gauges(bench, 30.0)
    return summary


def _idle_numbers(before: Any, after: Any, open_sessions: int, target: str) -> dict[str, Any]:
    out: dict[str, Any] = {"open": open_sessions}
    if before is None or after is None or open_sessions == 0:
        return out
    if target == "direct":
        if before.mock_rss is not None and after.mock_rss is not None:
            out["mock_rss_per_session_kib"] = round(
                (after.mock_rss - before.mock_rss) / open_sessions / 1024, 2
            )
        return out
    out["rss_before_mib"] = round(before.rss / 2**20, 2)
    out["rss_open_mib"] = round(after.rss / 2**20, 2)
    out["rss_per_session_kib"] = round((after.rss - before.rss) / open_sessions / 1024, 2)
    out["fds_per_session"] = round((after.fds - before.fds) / open_sessions, 3)
    if before.mock_rss is not None and after.mock_rss is not None:
        out["mock_rss_per_session_kib"] = round(
            (after.mock_rss - before.mock_rss) / open_sessions / 1024, 2
        )
    return out
