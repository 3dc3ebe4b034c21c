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
               the descriptors at their baseline (proxy only).
* ``soak``     a long mixed run watching the proxy's RSS and descriptors (proxy only).
* ``idle``     many open, idle WebSocket sessions, each after one turn (so the proxy holds
               its upstream socket): RSS per open session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import (
    HttpClient,
    UpstreamConnectError,
    UpstreamRejected,
    rejected_code,
    ws_turn,
)
from trioproxy.harness.bench.measure import RunStats, ratio
from trioproxy.harness.bench.phase import (
    Bench,
    Budget,
    Worker,
    process_view,
    record,
    run_phase,
    settle_gauges,
    think,
)
from trioproxy.harness.bench.sampler import connections
from trioproxy.harness.bench.stack import Endpoint
from trioproxy.upstream.ws import UpstreamClosed, open_upstream_websocket

WS_BETA = "responses_websockets=2026-02-06"
ERROR_PAUSE = 0.05  # seconds a client waits after an error before its next turn
Scenario = Callable[[Bench], Awaitable[dict[str, Any]]]


async def _shape(bench: Bench, scenario: str) -> dict[str, Any]:
    shape = bench.config.shape(scenario)
    if bench.stack.mock is not None:
        await bench.stack.mock.configure(**shape)
    return shape


async def _finish(bench: Bench, stats: RunStats) -> dict[str, Any]:
    summary = stats.summary()
    summary["process"] = process_view(bench, stats)
    if stats.target == "proxy":
        summary["gauges"] = await settle_gauges(bench)
    return summary


def _pct(run: dict[str, Any], metric: str, p: str) -> float | None:
    value = run.get(metric, {}).get(p)
    return float(value) if value is not None else None


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Proxy against direct: TTFB and latency differences (ms), throughput ratios."""
    proxy, direct = runs.get("proxy"), runs.get("direct")
    if not proxy or not direct:
        return {}
    out: dict[str, Any] = {}
    for metric in ("ttfb_ms", "turn_latency_ms"):
        for p in ("p50", "p99"):
            a, b = _pct(proxy, metric, p), _pct(direct, metric, p)
            if a is not None and b is not None:
                out[f"{metric}_{p}_overhead"] = round(a - b, 3)
                out[f"{metric}_{p}_ratio"] = ratio(a, b)
    out["events_per_s_ratio"] = ratio(proxy["events_per_s"], direct["events_per_s"])
    out["turns_per_s_ratio"] = ratio(proxy["turns_per_s"], direct["turns_per_s"])
    cores = proxy.get("process", {}).get("cores")
    if cores:
        per_core = proxy["events_per_s"] / max(cores, 1e-9)
        out["proxy_cores"] = cores
        out["proxy_events_per_core_s"] = round(per_core, 1)
        out["events_per_proxy_core_vs_direct"] = ratio(per_core, direct["events_per_s"])
    return out


# -- workers ------------------------------------------------------------------------------
def sse_worker(bench: Bench, scenario: str, *, abandon: float = 0.0) -> Worker:
    config = bench.config

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        # independent turns: no session key, so the proxy relays over plain HTTP/SSE
        body = _plain_body(bench)
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
                    await trio.sleep(ERROR_PAUSE)  # a target that fails fast is not hammered
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


# -- scenarios ----------------------------------------------------------------------------
async def _simple(
    bench: Bench, scenario: str, make: Callable[[], Worker], *, direct: bool = True
) -> dict[str, Any]:
    """Run the scenario against each target in ``rounds`` alternating phases (direct,
    proxy, direct, proxy...) of ``duration / rounds`` seconds each, merged per target: a
    machine whose speed drifts (other work on it) then weighs on both targets alike."""
    shape = await _shape(bench, scenario)
    rounds = max(1, int(bench.config.get(scenario, "rounds")))
    duration = float(bench.config.get(scenario, "duration")) / rounds
    count = bench.config.get(scenario, "count")
    merged: dict[str, RunStats] = {}
    ttfb_p50: dict[str, list[float | None]] = {}  # each round's, per target
    steal: dict[str, list[float | None]] = {}  # the machine's steal in each round's phase
    for _ in range(rounds):
        for endpoint in bench.endpoints(scenario, direct=direct):
            stats = await run_phase(
                bench,
                scenario,
                endpoint,
                make(),
                duration=duration,
                count=None if count is None else max(1, count // rounds),
            )
            ttfb_p50.setdefault(endpoint.name, []).append(
                stats.ttfb.percentile_ms(50) if stats.ttfb.count else None
            )
            steal.setdefault(endpoint.name, []).append(
                bench.sampler.window(stats.started, stats.ended).get("steal_pct")
            )
            if endpoint.name in merged:
                merged[endpoint.name].merge(stats)
            else:
                merged[endpoint.name] = stats
    runs = {name: await _finish(bench, stats) for name, stats in merged.items()}
    derived = compare(runs)
    if rounds > 1 and "proxy" in ttfb_p50 and "direct" in ttfb_p50:
        # the run's own spread: each round's proxy phase against the direct phase just before
        derived["ttfb_ms_p50_overhead_by_round"] = [
            round(p - d, 3) if p is not None and d is not None else None
            for d, p in zip(ttfb_p50["direct"], ttfb_p50["proxy"], strict=True)
        ]
        # a round whose figure stands out and whose phases lost CPU to the host says why
        derived["steal_pct_direct_by_round"] = steal["direct"]
        derived["steal_pct_proxy_by_round"] = steal["proxy"]
    return {"shape": shape, "runs": runs, "derived": derived}


async def scenario_sse(bench: Bench) -> dict[str, Any]:
    return await _simple(bench, "sse", lambda: sse_worker(bench, "sse"))


async def scenario_relay(bench: Bench) -> dict[str, Any]:
    return await _simple(bench, "relay", lambda: sse_worker(bench, "relay"))


async def scenario_ws(bench: Bench) -> dict[str, Any]:
    return await _simple(bench, "ws", lambda: ws_worker(bench, "ws"))


async def scenario_bridge(bench: Bench) -> dict[str, Any]:
    result = await _simple(bench, "bridge", lambda: bridge_worker(bench, "bridge"), direct=False)
    result["note"] = (
        "proxy only: the mock, like the real backend, knows no previous_response_id over HTTP"
    )
    return result


async def scenario_failover(bench: Bench) -> dict[str, Any]:
    scenario = "failover"
    shape = await _shape(bench, scenario)
    config = bench.config
    pairs = int(config.get(scenario, "count") or 40)
    control = bench.stack.mock
    not_fired = 0
    restored: list[bool] = []

    async def direct_worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        body = _plain_body(bench)
        try:
            for _ in range(pairs):
                if trio.current_time() >= deadline:
                    return
                outcome = await client.sse_turn(endpoint.path, body, [], limit=config.turn_timeout)
                record(stats, outcome, name="normal")
                await trio.sleep(0.2)
        finally:
            await client.aclose()

    async def proxy_worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        nonlocal not_fired
        assert control is not None
        client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(index))
        body = _plain_body(bench)
        try:
            for _ in range(pairs):
                if trio.current_time() >= deadline:
                    return
                outcome = await client.sse_turn(endpoint.path, body, [], limit=config.turn_timeout)
                record(stats, outcome, name="normal")
                # the next upstream request answers 429 usage_limit_reached; the account
                # is exhausted for about a second, so the pool is never empty
                fault = await control.add_fault("usage_limit", count=1, resets_in=1)
                outcome = await client.sse_turn(endpoint.path, body, [], limit=config.turn_timeout)
                record(stats, outcome, name="failover")
                if any(f["id"] == fault["id"] for f in await control.faults()):
                    not_fired += 1
                await control.clear_faults()
                # the 429 (with 100% used in its headers) exhausts the account for the
                # proxy; give the pool its accounts back before the next pair (untimed)
                restored.append(await restore_accounts(bench))
                await trio.sleep(0.2)
        finally:
            await client.aclose()

    runs: dict[str, Any] = {}
    duration = pairs * 3.0 + 10
    for endpoint in bench.endpoints(scenario):
        if endpoint.name == "proxy" and control is None:
            runs["proxy"] = {"skipped": "needs the mock's control API (--mock URL)"}
            continue
        worker = direct_worker if endpoint.name == "direct" else proxy_worker
        stats = await run_phase(bench, scenario, endpoint, worker, concurrency=1, duration=duration)
        runs[endpoint.name] = await _finish(bench, stats)
    derived: dict[str, Any] = {
        "faults_not_fired": not_fired,
        "accounts_restored_between_pairs": all(restored) if restored else None,
    }
    proxy = runs.get("proxy", {}).get("extra_ms", {})
    normal, failover = proxy.get("ttfb_normal"), proxy.get("ttfb_failover")
    if normal and failover and normal.get("count") and failover.get("count"):
        for p in ("p50", "p99"):
            derived[f"failover_ttfb_added_{p}_ms"] = round(failover[p] - normal[p], 3)
    direct = runs.get("direct", {}).get("extra_ms", {}).get("ttfb_normal")
    if direct and failover and failover.get("count"):
        derived["failover_ttfb_vs_direct_p50_ms"] = round(failover["p50"] - direct["p50"], 3)
    return {"shape": shape, "runs": runs, "derived": derived}


async def restore_accounts(bench: Bench) -> bool:
    """Re-import every mock account into the proxy (``POST /api/accounts``, which gives an
    account a fresh start). False when the target has no such API."""
    control = bench.stack.mock
    if control is None:
        return False
    proxy = bench.stack.proxy
    async with httpx.AsyncClient(
        timeout=10.0, trust_env=False, headers=dict(proxy.headers)
    ) as client:
        for account_id in bench.stack.accounts:
            auth = await control.auth_json(account_id)
            answer = await client.post(f"{proxy.root}/api/accounts", json=auth)
            if answer.status_code not in (200, 201):
                return False
    return True


def _plain_body(bench: Bench) -> bytes:
    return bodies.encode(
        bodies.request(
            [bodies.developer_message(bench.config.input_bytes), bodies.user_message("hello")],
            thread=None,
        )
    )


CHAOS_FAULTS = (
    {"kind": "server_error"},
    {"kind": "close_after_created", "transport": "http"},
    {"kind": "close_after_created", "transport": "ws"},
    {"kind": "response_failed"},
    {"kind": "usage_limit", "resets_in": 1},
    {"kind": "stall", "seconds": 1.5},
    {"kind": "close_before_created"},
)


async def scenario_chaos(bench: Bench) -> dict[str, Any]:
    scenario = "chaos"
    shape = await _shape(bench, scenario)
    config = bench.config
    control = bench.stack.mock
    proxy = bench.stack.proxy
    pid = bench.stack.proxy_pid
    before = bench.sampler.sample()
    conns_before = connections(pid, proxy.port) if pid else {}
    each = config.fault_probability / len(CHAOS_FAULTS)
    if control is not None:
        for spec in CHAOS_FAULTS:
            await control.add_fault(probability=each, **spec)
    sse = sse_worker(bench, scenario, abandon=config.abandon_probability)
    ws = ws_worker(bench, scenario, abandon=config.abandon_probability)

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        await (sse if index % 2 == 0 else ws)(index, endpoint, stats, budget, deadline)

    stats = await run_phase(bench, scenario, proxy, worker)
    fault_view = await control.faults() if control is not None else []
    if control is not None:
        await control.clear_faults()
    run = await _finish(bench, stats)
    # injected 429s exhausted some accounts for the proxy: give them back for what follows
    run["accounts_restored"] = await restore_accounts(bench)
    run["faults"] = [
        {k: f[k] for k in ("kind", "transport", "matched", "fired")} for f in fault_view
    ]
    derived: dict[str, Any] = {"gauges_zero": run.get("gauges", {}).get("zero")}
    if before is not None and pid:
        derived.update(await _settle_fds(bench, before.fds, conns_before))
    return {"shape": shape, "runs": {"proxy": run}, "derived": derived}


async def _settle_fds(
    bench: Bench, fds_before: int, conns_before: dict[str, int]
) -> dict[str, Any]:
    """Wait (at most 15 s) until the proxy's descriptors, not counting pooled upstream
    keep-alive connections, are back at the count before the scenario."""
    pid = bench.stack.proxy_pid
    assert pid is not None
    port = bench.stack.proxy.port
    base = fds_before - conns_before.get("upstream", 0)
    after = bench.sampler.sample()
    conns = connections(pid, port)
    with trio.move_on_after(15):
        while True:
            after = bench.sampler.sample()
            conns = connections(pid, port)
            if (
                after is not None
                and after.fds - conns["upstream"] <= base
                and not conns["downstream"]
            ):
                break
            await trio.sleep(0.25)
    assert after is not None
    return {
        "fds_before": fds_before,
        "fds_after": after.fds,
        "upstream_pooled_before": conns_before.get("upstream", 0),
        "upstream_pooled_after": conns["upstream"],
        "downstream_after": conns["downstream"],
        "fds_excess_without_pool": after.fds - conns["upstream"] - base,
        "fds_at_baseline": after.fds - conns["upstream"] <= base and not conns["downstream"],
    }


async def scenario_soak(bench: Bench) -> dict[str, Any]:
    scenario = "soak"
    shape = await _shape(bench, scenario)
    sse = sse_worker(bench, scenario)
    ws = ws_worker(bench, scenario)

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        await (sse if index % 2 == 0 else ws)(index, endpoint, stats, budget, deadline)

    stats = await run_phase(bench, scenario, bench.stack.proxy, worker)
    run = await _finish(bench, stats)
    samples = [s for s in bench.sampler.samples if stats.started <= s.t <= stats.ended]
    derived: dict[str, Any] = {}
    if len(samples) >= 4:
        derived["rss_slope_mib_per_min"] = round(
            _slope([(s.t, s.rss / 2**20) for s in samples]) * 60, 3
        )
        derived["fds_slope_per_min"] = round(_slope([(s.t, float(s.fds)) for s in samples]) * 60, 3)
        half = len(samples) // 2
        derived["rss_first_half_mean_mib"] = round(
            sum(s.rss for s in samples[:half]) / half / 2**20, 2
        )
        derived["rss_second_half_mean_mib"] = round(
            sum(s.rss for s in samples[half:]) / (len(samples) - half) / 2**20, 2
        )
    return {"shape": shape, "runs": {"proxy": run}, "derived": derived}


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    if var == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / var


async def scenario_idle(bench: Bench) -> dict[str, Any]:
    scenario = "idle"
    shape = await _shape(bench, scenario)
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
    release = trio.Event()
    state = {"open": 0}
    body = bodies.request([bodies.user_message("hello")], thread=None)

    async def session(
        index: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        headers = [("openai-beta", WS_BETA), *endpoint.headers_for(index)]
        started = False
        try:
            async with open_upstream_websocket(
                endpoint.ws_url, headers, connect_timeout=config.turn_timeout
            ) as ws:
                outcome = await ws_turn(ws, body, limit=config.turn_timeout)
                record(stats, outcome)
                if not outcome.completed:
                    return
                stats.sessions += 1
                state["open"] += 1
                task_status.started()
                started = True
                await release.wait()
                state["open"] -= 1
        except UpstreamRejected as exc:
            code, overload = rejected_code(exc)
            stats.error(code, overload=overload)
        except UpstreamConnectError:
            stats.error("connect_error")
        except UpstreamClosed as exc:
            stats.error(f"ws_closed_{exc.code}")
        finally:
            if not started:
                task_status.started()

    measured: dict[str, Any] = {}
    bound = sessions * config.turn_timeout / max(1, openers) + hold + 60
    with trio.move_on_after(bound) as scope:
        async with trio.open_nursery() as nursery:

            async def opener(first: int) -> None:
                for index in range(first, sessions, openers):
                    await nursery.start(session, index)

            async with trio.open_nursery() as opening:
                for first in range(openers):
                    opening.start_soon(opener, first)
            opened_at = trio.current_time()
            await trio.sleep(hold)
            after = bench.sampler.sample()
            measured = _idle_numbers(before, after, state["open"], endpoint.name)
            measured["open_s"] = round(opened_at - stats.started, 3)
            release.set()
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


SCENARIO_FUNCTIONS: dict[str, Scenario] = {
    "sse": scenario_sse,
    "relay": scenario_relay,
    "ws": scenario_ws,
    "bridge": scenario_bridge,
    "failover": scenario_failover,
    "chaos": scenario_chaos,
    "soak": scenario_soak,
    "idle": scenario_idle,
}

__all__ = ["SCENARIO_FUNCTIONS", "compare"]
