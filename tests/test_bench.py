"""The load-testing harness (``trioproxy bench``), run for real on loopback with tiny counts.

These tests check that every scenario runs end to end and that the report is coherent (files
written, counts consistent, gauges back at zero); they assert nothing about speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import ProxyEnv
from trioproxy.harness.bench.config import SCENARIOS, BenchConfig
from trioproxy.harness.bench.runner import run_bench

PNG = b"\x89PNG\r\n\x1a\n"
TINY: dict[str, Any] = {
    "concurrency": 2,
    "duration": 1.0,
    "count": 4,
    "events": 3,
    "event_bytes": 16,
    "upstream_ttfb": 0.0,
    "upstream_gap": 0.0,
    "upstream_jitter": 0.5,
    "input_bytes": 256,
    "turns_per_session": 2,
    "turn_timeout": 20.0,
    "progress": False,
}


def _runs(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (name, target, run)
        for name, scenario in results["scenarios"].items()
        for target, run in scenario["runs"].items()
    ]


async def test_every_scenario_against_a_started_stack(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    config = BenchConfig(output=out, sessions=12, accounts=4, **TINY)
    results = await run_bench(config, ["trioproxy", "bench"])

    assert set(results["scenarios"]) == set(SCENARIOS)
    written = json.loads((out / "results.json").read_text())
    assert set(written["scenarios"]) == set(SCENARIOS)
    summary = (out / "summary.md").read_text()
    for name in SCENARIOS:
        assert f"## {name}" in summary
    assert results["plots"] == ["latency_cdf.png", "throughput.png", "process.png", "memory.png"]
    for plot in results["plots"]:
        assert (out / plot).read_bytes().startswith(PNG)

    for name, target, run in _runs(results):
        # every completed turn has its TTFB and latency recorded; nothing else is counted
        assert run["ttfb_ms"]["count"] == run["turns"], (name, target)
        assert run["turn_latency_ms"]["count"] == run["turns"], (name, target)
        assert sum(run["timeseries"]["turns"]) == run["turns"], (name, target)
        assert run["error_count"] == sum(run["errors"].values())
        if target == "proxy":
            assert run["gauges"]["available"], name
            assert run["gauges"]["zero"], (name, run["gauges"])
            assert run["process"]["rss_max_mib"] > 0
    for name in ("sse", "relay", "ws", "soak"):
        for target, run in results["scenarios"][name]["runs"].items():
            assert run["turns"] > 0 and run["errors"] == {}, (name, target, run["errors"])
            assert run["events"] >= run["turns"] * 3, (name, target)
    # the soak reports the proxy's memory once the load stopped, with every part's gauge
    soak = results["scenarios"]["soak"]["derived"]
    memory = soak["gauges_after_load"]["memory"]
    assert memory["conversations"]["bytes"] <= memory["conversations"]["max_bytes"]
    assert memory["bridge"]["sessions"] <= memory["bridge"]["max_sessions"]
    assert soak["rss_after_load_mib"] > 0 and soak["fds_after_load"] > 0
    assert set(results["scenarios"]["sse"]["runs"]) == {"direct", "proxy"}
    # sse alternates its targets over three rounds, merged per target; the wall time is the
    # rounds' own (not the time between the first and the last)
    for run in results["scenarios"]["sse"]["runs"].values():
        assert run["notes"]["rounds"] == 3
        assert run["wall_s"] <= 3 * (1.0 / 3 + 20.0 + 10)
    assert "ttfb_ms_p50_overhead" in results["scenarios"]["sse"]["derived"]
    # and each round's own overhead, in the report too
    by_round = results["scenarios"]["sse"]["derived"]["ttfb_ms_p50_overhead_by_round"]
    assert len(by_round) == 3 and all(isinstance(value, float) for value in by_round)
    assert "| ttfb_ms_p50_overhead_by_round | " in summary
    # the CPU time the host took from the machine, per target and per round's phase
    # (Linux's /proc/stat has it; the tests run on Linux)
    assert "| steal % |" in summary
    sse = results["scenarios"]["sse"]
    for target, run in sse["runs"].items():
        assert 0.0 <= run["process"]["steal_pct"] <= 100.0, (target, run["process"])
        rounds = sse["derived"][f"steal_pct_{target}_by_round"]
        assert len(rounds) == 3 and all(0.0 <= value <= 100.0 for value in rounds), rounds
    # the WebSocket sessions went through their tool-call loops
    ws = results["scenarios"]["ws"]["runs"]["proxy"]["extra_ms"]
    assert ws["ttfb_tool_call"]["count"] > 0 and ws["ttfb_after_tool"]["count"] > 0
    # bridge: turns or errors by code, never silence
    bridge = results["scenarios"]["bridge"]["runs"]["proxy"]
    assert bridge["turns"] + bridge["error_count"] > 0

    failover = results["scenarios"]["failover"]
    assert failover["derived"]["faults_not_fired"] == 0
    assert failover["derived"]["accounts_restored_between_pairs"] is True
    proxy_kinds = failover["runs"]["proxy"]["extra_ms"]
    assert proxy_kinds["ttfb_failover"]["count"] == 4
    assert failover["runs"]["proxy"]["errors"] == {}

    chaos = results["scenarios"]["chaos"]
    assert chaos["derived"]["gauges_zero"] is True
    assert chaos["derived"]["downstream_after"] == 0
    assert chaos["derived"]["fds_at_baseline"] is True

    idle = results["scenarios"]["idle"]
    assert idle["runs"]["proxy"]["idle"]["open"] == 12
    assert idle["runs"]["direct"]["idle"]["open"] == 12
    assert idle["derived"]["sessions_open"] == 12
    assert results["targets"]
    assert all(row["met"] is not None for row in results["targets"]), results["targets"]


async def test_target_mode_against_a_running_proxy(proxy: ProxyEnv, tmp_path: Path) -> None:
    """``--target URL --mock URL``: an already running proxy (here the test's own), with the
    mock behind it as the direct baseline; no process to sample, gauges read over HTTP."""
    out = tmp_path / "target"
    config = BenchConfig(
        output=out,
        scenarios=("sse", "ws", "failover"),
        target=proxy.root,
        mock_url=proxy.mock.root,
        plots=False,
        **TINY,
    )
    results = await run_bench(config, ["trioproxy", "bench", "--target", proxy.root])
    assert results["meta"]["proxy"] == proxy.root
    assert results["meta"]["proxy_pid"] is None
    for name, target, run in _runs(results):
        assert run["turns"] > 0 and run["errors"] == {}, (name, target, run["errors"])
        if target == "proxy":
            assert run["gauges"]["zero"], (name, run["gauges"])
            assert run["process"] == {}
    assert results["scenarios"]["failover"]["derived"]["faults_not_fired"] == 0
    assert (out / "summary.md").exists() and not (out / "latency_cdf.png").exists()
