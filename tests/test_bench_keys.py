"""``trioproxy bench`` with API keys (``keys``): the proxy's store gets the keys before it
starts, the clients spread their requests over them, and the sse rounds also run against the
same proxy without keys, compared in the report. Run for real on loopback with tiny counts;
nothing is asserted about speed."""

from __future__ import annotations

from pathlib import Path

from tests.test_bench import TINY
from trioproxy.config import load_settings
from trioproxy.harness.bench.config import BenchConfig
from trioproxy.harness.bench.runner import run_bench
from trioproxy.harness.bench.stack import NO_KEYS
from trioproxy.store import Store


async def test_sse_with_three_keys_against_the_proxy_without_keys(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    options = {**TINY, "count": None, "concurrency": 3, "duration": 1.0, "rounds": 2}
    config = BenchConfig(output=out, scenarios=("sse",), keys=3, accounts=2, plots=False, **options)
    results = await run_bench(config, ["trioproxy", "bench", "--keys", "3"])

    sse = results["scenarios"]["sse"]
    assert list(sse["runs"]) == ["direct", NO_KEYS, "proxy"]
    for target, run in sse["runs"].items():
        assert run["turns"] > 0 and run["errors"] == {}, (target, run["errors"])
        if target != "direct":
            assert run["gauges"]["zero"], (target, run["gauges"])
            assert run["process"]["cpu_ms_per_turn"] > 0, target
    derived = sse["derived"]
    assert derived["keys"] == 3
    for figure in ("turns_per_s", "ttfb_ms_p50", "ttfb_ms_p99", "cpu_ms_per_turn"):
        assert derived[f"{figure}_keys_ratio"] > 0, figure
    assert len(derived["ttfb_ms_p50_keys_added_by_round"]) == 2
    assert "## Key accounting" in (out / "summary.md").read_text()

    # the proxy has stopped (and written what it counted): every turn it served is charged
    # to one of the three keys, each key used
    data_dir = Path(results["meta"]["proxy_data_dir"])
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir)})
    with Store.open(
        settings.resolved_database_url, data_dir=data_dir, secret_key=settings.secret_key
    ) as store:
        records = store.list_api_keys()
        rows = store.usage_report(
            since=None, until=None, key_id=None, account_id=None, model=None,
            group_by=("key",), bucket="total",
        )  # fmt: skip
    # the clients' three keys, and the operator key (no policy) of the management calls
    keys = {key.key_id for key in records if key.policy}
    assert len(keys) == 3 and [key.name for key in records if not key.policy] == ["bench-operator"]
    assert {row["key_id"] for row in rows} == keys
    assert all(row["requests"] > 0 for row in rows)
    assert sum(row["requests"] for row in rows) == sse["runs"]["proxy"]["turns"]
