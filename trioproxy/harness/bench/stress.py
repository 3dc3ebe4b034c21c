"""``chaos``: the proxy under stress rather than measured for speed (proxy only): clients that
abandon their turns while the mock injects faults; afterwards every admission gauge at zero
and the descriptors back at their baseline. (``soak``, the long run watching memory, is
``soak.py``.)"""

from __future__ import annotations

from typing import Any

import trio

from trioproxy.harness.bench.measure import RunStats
from trioproxy.harness.bench.phase import Bench, Budget, Worker, run_phase
from trioproxy.harness.bench.runs import apply_shape, finish, restore_accounts
from trioproxy.harness.bench.sampler import connections
from trioproxy.harness.bench.stack import Endpoint
from trioproxy.harness.bench.workers import sse_worker, ws_worker

CHAOS_FAULTS = (
    {"kind": "server_error"},
    {"kind": "close_after_created", "transport": "http"},
    {"kind": "close_after_created", "transport": "ws"},
    {"kind": "response_failed"},
    {"kind": "usage_limit", "resets_in": 1},
    {"kind": "stall", "seconds": 1.5},
    {"kind": "close_before_created"},
)


def mixed_worker(sse: Worker, ws: Worker) -> Worker:
    """Even-numbered clients run ``sse``, odd-numbered ones ``ws``."""

    async def worker(
        index: int, endpoint: Endpoint, stats: RunStats, budget: Budget, deadline: float
    ) -> None:
        await (sse if index % 2 == 0 else ws)(index, endpoint, stats, budget, deadline)

    return worker


async def scenario_chaos(bench: Bench) -> dict[str, Any]:
    scenario = "chaos"
    shape = await apply_shape(bench, scenario)
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
    worker = mixed_worker(
        sse_worker(bench, scenario, abandon=config.abandon_probability),
        ws_worker(bench, scenario, abandon=config.abandon_probability),
    )
    stats = await run_phase(bench, scenario, proxy, worker)
    fault_view = await control.faults() if control is not None else []
    if control is not None:
        await control.clear_faults()
    run = await finish(bench, stats)
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
