"""The hostile-client probe (``python -m trioproxy.harness.bench.hostile``), run for real on
loopback in a reduced size: a proxy process in front of the mock process, raw sockets.

It checks the report's shape and the outcomes the server guards promise (a deflate bomb is
closed 1009, tricklers are cut 408 while normal requests are served); it asserts nothing
about memory figures beyond their being measured."""

from __future__ import annotations

from typing import Any

from trioproxy.harness.bench.hostile import PROBES, Sizes, run_probes, table

SMALL = Sizes(
    deflate_compressed=32_000,  # inflates to about 32 MB, past the 8 MiB limit set below
    deflate_many=0,
    body_clients=3,
    body_bytes=2_000_000,
    items_body_bytes=2_000_000,
    tricklers=50,
    trickle_length=1000,
    trickle_limit=10.0,
    pipelines=2,
    pipeline_bytes=64 * 1024,
    pipeline_hold=0.3,
    settle_limit=3.0,
    client_limit=15.0,
)
OPTIONS = {"max-body-bytes": 8 * 1024 * 1024, "body-min-rate-grace": 1.0}


async def test_every_probe_in_a_reduced_size() -> None:
    results = await run_probes(list(PROBES), SMALL, OPTIONS)
    by_name: dict[str, dict[str, Any]] = {r["probe"]: r for r in results}
    assert list(by_name) == [
        "deflate x1",
        "bodies 3x2MB",
        "bodies items 2MB",
        "trickle x50",
        "pipeline x2",
    ]
    for result in results:
        assert 0 < result["rss_before_mib"] <= result["rss_peak_mib"], result
        assert result["rss_settled_mib"] > 0 and result["samples"] > 10, result
        assert result["settle_s"] <= SMALL.settle_limit + 1.0
        assert result["after"]["budget_held"] == 0, result
        assert result["after"]["proxy_websocket_in_use"] == 0, result

    deflate = by_name["deflate x1"]["clients"]
    assert deflate["ends"] == {"close_1009": 1}
    assert deflate["inflates_to_mib"] > 8

    assert by_name["bodies 3x2MB"]["clients"]["answers"] == {"200": 3}
    items = by_name["bodies items 2MB"]["clients"]
    assert items["items"] > 20_000 and items["answers"] == {"200": 1}

    trickle = by_name["trickle x50"]
    assert trickle["clients"]["answers"] == {"408": 50}
    assert trickle["clients"]["cut_408_last_s"] < SMALL.trickle_limit
    assert trickle["normal"]["served"] >= 1
    assert trickle["normal"]["first_429_s"] is None

    pipeline = by_name["pipeline x2"]
    assert pipeline["clients"]["in_flight_before_pipelining"] == 2
    assert pipeline["clients"]["sent_min"] == pipeline["clients"]["pipelined_bytes_each"]
    assert pipeline["normal"]["served"] >= 1
    # pipelined under the read-ahead bound, a client that leaves gives its slot back at once
    assert pipeline["clients"]["lane_released_after_close_s"] is not None

    rows = table(results).splitlines()
    assert len(rows) == 2 + len(results) and rows[0].startswith("| probe |")
