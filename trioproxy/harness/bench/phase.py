"""Running one phase (one scenario against one endpoint): workers in a nursery, a shared
budget of turns, a hard time bound, the process window, and the admission gauges after.

Every loop is bounded: a worker stops at the phase deadline or when the shared turn budget is
spent, each turn has its own timeout, and the whole phase runs inside a cancel scope of
``duration + turn_timeout + 10`` seconds.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import trio

from trioproxy.harness.bench.clients import TurnOutcome
from trioproxy.harness.bench.config import BenchConfig
from trioproxy.harness.bench.measure import RunStats
from trioproxy.harness.bench.sampler import Sampler, loadavg
from trioproxy.harness.bench.stack import NO_KEYS, Endpoint, Stack


@attrs.define(eq=False)
class Budget:
    """At most ``count`` turns (``None``: unlimited), shared by a phase's workers."""

    count: int | None
    taken: int = 0

    def take(self) -> bool:
        if self.count is not None and self.taken >= self.count:
            return False
        self.taken += 1
        return True


@attrs.define(eq=False)
class Bench:
    config: BenchConfig
    stack: Stack
    sampler: Sampler
    rng: random.Random
    live: RunStats | None = None
    label: str = "starting"
    # the proxy without keys beside a proxy with keys (``Stack.nokeys``)
    nokeys_sampler: Sampler | None = None

    def endpoints(
        self, scenario: str, *, direct: bool = True, nokeys: bool = False
    ) -> list[Endpoint]:
        """Direct first (the baseline), then, with ``nokeys``, the proxy without keys
        beside a proxy with keys (where there is one), then the proxy."""
        out = []
        if direct and self.config.direct and self.stack.direct is not None:
            out.append(self.stack.direct)
        if nokeys and self.stack.nokeys is not None:
            out.append(self.stack.nokeys)
        out.append(self.stack.proxy)
        return out

    def proxy_named(self, name: str) -> Endpoint:
        """The proxy endpoint of a run's target (``proxy`` or ``NO_KEYS``)."""
        if name == NO_KEYS and self.stack.nokeys is not None:
            return self.stack.nokeys
        return self.stack.proxy

    def sampler_of(self, target: str) -> Sampler:
        """The sampler of the proxy process a run's target is served by."""
        if target == NO_KEYS and self.nokeys_sampler is not None:
            return self.nokeys_sampler
        return self.sampler


Worker = Callable[[int, Endpoint, RunStats, Budget, float], Awaitable[None]]


def record(stats: RunStats, outcome: TurnOutcome, *, name: str | None = None) -> None:
    """Count one turn: completed turns feed the histograms, the others the error counts."""
    now = outcome.ended if outcome.ended is not None else trio.current_time()
    if outcome.abandoned:
        stats.abandoned += 1
        stats.events_seen(now, outcome.events)
        return
    if not outcome.completed:
        stats.error(outcome.error or "incomplete", overload=outcome.overload)
        stats.events_seen(now, outcome.events)
        return
    if outcome.ttfb is not None:
        stats.ttfb.record(outcome.ttfb)
        if name is not None:
            stats.latency_of(f"ttfb_{name}").record(outcome.ttfb)
    if outcome.latency is not None:
        stats.latency.record(outcome.latency)
    stats.turn_done(now, outcome.events, outcome.nbytes)


async def think(bench: Bench, scenario: str) -> None:
    seconds = float(bench.config.get(scenario, "think") or 0.0)
    # a zero sleep still yields: a worker never monopolises the loop between turns
    await trio.sleep(bench.rng.uniform(0.5 * seconds, 1.5 * seconds) if seconds else 0)


async def run_phase(
    bench: Bench,
    scenario: str,
    endpoint: Endpoint,
    worker: Worker,
    *,
    concurrency: int | None = None,
    duration: float | None = None,
    count: int | None = None,
) -> RunStats:
    config = bench.config
    concurrency = concurrency or int(config.get(scenario, "concurrency"))
    duration = float(duration if duration is not None else config.get(scenario, "duration"))
    count = count if count is not None else config.get(scenario, "count")
    stats = RunStats(scenario, endpoint.name)
    stats.notes["concurrency"] = concurrency
    stats.notes["loadavg_start"] = loadavg()
    bench.live = stats
    bench.label = f"{scenario}/{endpoint.name}"
    bench.sampler.phase(bench.label)
    stats.started = trio.current_time()
    deadline = stats.started + duration
    budget = Budget(count)
    # clients start spread over about one answer's length (at most a quarter of the phase):
    # independent users do not send their requests in the same millisecond, and waves of
    # synchronised requests would measure the burst rather than the per-request cost
    spread = min(config.answer_seconds(scenario), duration / 4)

    async def staggered(index: int) -> None:
        await trio.sleep(bench.rng.uniform(0, spread) if concurrency > 1 else 0)
        await worker(index, endpoint, stats, budget, deadline)

    with trio.move_on_after(duration + config.turn_timeout + 10) as bound:
        async with trio.open_nursery() as nursery:
            for index in range(concurrency):
                nursery.start_soon(staggered, index)
    stats.ended = trio.current_time()
    if bound.cancelled_caught:
        stats.notes["cut_off"] = True
    stats.notes["loadavg_end"] = loadavg()
    bench.sampler.phase("between")
    return stats


def process_view(bench: Bench, stats: RunStats) -> dict[str, Any]:
    """The proxy's CPU and memory during a proxy run (the mock's CPU during a direct one)."""
    spans = stats.windows or [(stats.started, stats.ended)]
    window = bench.sampler_of(stats.target).windows(spans)
    if not window:
        return {}
    if stats.target == "direct":
        keep = ("mock_cpu_s", "mock_cores", "bench_cores", "loadavg_max", "steal_pct")
        return {k: window[k] for k in keep if k in window}
    return window


async def admission_snapshot(bench: Bench, proxy: Endpoint | None = None) -> dict[str, Any] | None:
    """``/api/admission`` of ``proxy`` (default: the bench's proxy); None if unanswered."""
    proxy = proxy or bench.stack.proxy
    url = f"{proxy.root}/api/admission"
    headers = proxy.management_headers()
    try:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False, headers=headers) as client:
            answer = await client.get(url)
    except httpx.TransportError:
        return None
    if answer.status_code != 200:
        return None
    data: dict[str, Any] = answer.json()
    return data


def gauges_idle(snapshot: dict[str, Any]) -> bool:
    """Every lane, work lane and per-account slot back to zero. The ``dashboard`` lane may
    show the one slot held by the request that reads the snapshot."""
    for name, lane in snapshot.get("lanes", {}).items():
        allowed = 1 if name == "dashboard" else 0
        if lane.get("in_use", 0) > allowed or lane.get("waiting", 0):
            return False
    for lane in (*snapshot.get("work", {}).values(), *snapshot.get("account_totals", {}).values()):
        if lane.get("in_use", 0) or lane.get("waiting", 0):
            return False
    return not snapshot.get("accounts")


async def settle_gauges(
    bench: Bench, seconds: float = 15.0, proxy: Endpoint | None = None
) -> dict[str, Any]:
    """Poll ``proxy``'s ``/api/admission`` until every gauge is zero (at most ``seconds``).

    Returns ``{"available", "zero", "waited_s", "snapshot"}``."""
    start = trio.current_time()
    snapshot = None
    with trio.move_on_after(seconds):
        while True:
            snapshot = await admission_snapshot(bench, proxy)
            if snapshot is None:
                return {"available": False}
            if gauges_idle(snapshot):
                break
            await trio.sleep(0.1)
    zero = snapshot is not None and gauges_idle(snapshot)
    return {
        "available": True,
        "zero": zero,
        "waited_s": round(trio.current_time() - start, 3),
        "snapshot": snapshot,
    }


async def progress(bench: Bench, interval: float = 0.5) -> None:
    """The live progress line (rewritten in place on a terminal, every 5 s otherwise)."""
    tty = sys.stderr.isatty()
    last_print = -1e9
    while True:
        await trio.sleep(interval)
        now = trio.current_time()
        if not tty and now - last_print < 5.0:
            continue
        last_print = now
        stats = bench.live
        sample = bench.sampler.latest()
        parts = [f"[{bench.label}]"]
        if stats is not None and stats.started:
            elapsed = max(1e-9, now - stats.started)
            parts += [
                f"{elapsed:5.1f}s",
                f"turns {stats.turns} ({stats.turns / elapsed:.0f}/s)",
                f"events {stats.events / elapsed:.0f}/s",
                f"errors {sum(stats.errors.values())}",
            ]
            if stats.sessions:
                parts.append(f"sessions {stats.sessions}")
            if stats.ttfb.count:
                parts.append(f"ttfb p50 {stats.ttfb.percentile_ms(50):.1f}ms")
        if sample is not None:
            parts.append(f"proxy rss {sample.rss / 2**20:.0f}MiB fds {sample.fds}")
            parts.append(f"load {sample.loadavg:.2f}")
        line = "  ".join(parts)
        if tty:
            sys.stderr.write("\r\x1b[2K" + line[:200])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
