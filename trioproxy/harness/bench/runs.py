"""What the scenarios share: the mock's answer shape for a scenario, a run's summary, the
proxy against direct comparison (and a proxy with keys against the same proxy without),
runs in alternating rounds, and giving the proxy its accounts back after a scenario
exhausted some of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from trioproxy.harness.bench.measure import RunStats, ratio
from trioproxy.harness.bench.phase import Bench, Worker, process_view, run_phase, settle_gauges
from trioproxy.harness.bench.stack import NO_KEYS


async def apply_shape(bench: Bench, scenario: str) -> dict[str, Any]:
    """Give the mock the scenario's answer shape (when the bench can reach its control
    API); returns the shape."""
    shape = bench.config.shape(scenario)
    if bench.stack.mock is not None:
        await bench.stack.mock.configure(**shape)
    return shape


async def finish(bench: Bench, stats: RunStats) -> dict[str, Any]:
    """A run's summary with its process figures and, for a proxy, its CPU time per
    completed turn and the settled gauges."""
    summary = stats.summary()
    process = summary["process"] = process_view(bench, stats)
    if stats.target != "direct":
        if "cpu_s" in process and stats.turns:
            process["cpu_ms_per_turn"] = round(1000 * process["cpu_s"] / stats.turns, 3)
        summary["gauges"] = await settle_gauges(bench, proxy=bench.proxy_named(stats.target))
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


def compare_keys(runs: dict[str, dict[str, Any]], keys: int) -> dict[str, Any]:
    """The proxy with ``keys`` API keys against the same proxy without keys (``NO_KEYS``):
    each figure of both, and the ratio with keys / without (turns per second, TTFB p50 and
    p99, the proxy's CPU time per turn)."""
    keyed, plain = runs.get("proxy"), runs.get(NO_KEYS)
    if not keyed or not plain:
        return {}
    out: dict[str, Any] = {"keys": keys}
    figures = {
        "turns_per_s": (plain.get("turns_per_s"), keyed.get("turns_per_s")),
        "ttfb_ms_p50": (_pct(plain, "ttfb_ms", "p50"), _pct(keyed, "ttfb_ms", "p50")),
        "ttfb_ms_p99": (_pct(plain, "ttfb_ms", "p99"), _pct(keyed, "ttfb_ms", "p99")),
        "cpu_ms_per_turn": (
            plain.get("process", {}).get("cpu_ms_per_turn"),
            keyed.get("process", {}).get("cpu_ms_per_turn"),
        ),
    }
    for name, (without, with_keys) in figures.items():
        out[f"{name}_nokeys"] = without
        out[f"{name}_keys"] = with_keys
        out[f"{name}_keys_ratio"] = ratio(with_keys, without)
    return out


async def run_rounds(
    bench: Bench, scenario: str, make: Callable[[], Worker], *, direct: bool = True
) -> dict[str, Any]:
    """Run the scenario against each target in ``rounds`` alternating phases (direct,
    proxy, direct, proxy...) of ``duration / rounds`` seconds each, merged per target: a
    machine whose speed drifts (other work on it) then weighs on both targets alike."""
    shape = await apply_shape(bench, scenario)
    rounds = max(1, int(bench.config.get(scenario, "rounds")))
    duration = float(bench.config.get(scenario, "duration")) / rounds
    count = bench.config.get(scenario, "count")
    merged: dict[str, RunStats] = {}
    ttfb_p50: dict[str, list[float | None]] = {}  # each round's, per target
    steal: dict[str, list[float | None]] = {}  # the machine's steal in each round's phase
    for _ in range(rounds):
        for endpoint in bench.endpoints(scenario, direct=direct, nokeys=True):
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
    runs = {name: await finish(bench, stats) for name, stats in merged.items()}
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
    if NO_KEYS in runs:
        derived.update(compare_keys(runs, bench.stack.keys))
        if rounds > 1:
            derived["ttfb_ms_p50_keys_added_by_round"] = [
                round(k - n, 3) if k is not None and n is not None else None
                for n, k in zip(ttfb_p50[NO_KEYS], ttfb_p50["proxy"], strict=True)
            ]
    return {"shape": shape, "runs": runs, "derived": derived}


async def restore_accounts(bench: Bench) -> bool:
    """Re-import every mock account into the proxy (``POST /api/accounts``, which gives an
    account a fresh start). False when the target has no such API."""
    control = bench.stack.mock
    if control is None:
        return False
    proxy = bench.stack.proxy
    async with httpx.AsyncClient(
        timeout=10.0, trust_env=False, headers=proxy.management_headers()
    ) as client:
        for account_id in bench.stack.accounts:
            auth = await control.auth_json(account_id)
            answer = await client.post(f"{proxy.root}/api/accounts", json=auth)
            if answer.status_code not in (200, 201):
                return False
    return True
