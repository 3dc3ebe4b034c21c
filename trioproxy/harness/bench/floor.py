"""The proxy's CPU floor per turn: the mock, a proxy and one client in a single trio process,
turns sent one after another with no upstream delay, through the proxy and directly.

With everything on one thread there is no waiting for another process to be scheduled, so the
difference between the two is the CPU the proxy spends on a turn (and before its first byte),
whatever else the machine is doing. ``python -m trioproxy.harness.bench.floor [TURNS]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import trio

from trioproxy.config import load_settings
from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import HttpClient
from trioproxy.harness.bench.stack import MOCK_LIMIT
from trioproxy.harness.mock_upstream import MockBackend, MockConfig, serve_mock
from trioproxy.harness.mock_upstream.client import MockControl
from trioproxy.server import serve_proxy

PATH = "/backend-api/codex/responses"


async def _turns(client: HttpClient, body: bytes, count: int) -> dict[str, float]:
    ttfb: list[float] = []
    start = trio.current_time()
    for _ in range(count):
        outcome = await client.sse_turn(PATH, body, [])
        if not outcome.completed or outcome.ttfb is None:
            raise RuntimeError(f"turn failed: {outcome.error}")
        ttfb.append(outcome.ttfb)
    elapsed = trio.current_time() - start
    ttfb.sort()
    return {
        "ms_per_turn": round(elapsed / count * 1000, 3),
        "ttfb_p50_ms": round(ttfb[len(ttfb) // 2] * 1000, 3),
    }


async def measure_floor(turns: int = 500, warmup: int = 20) -> dict[str, Any]:
    backend = MockBackend(
        MockConfig(
            accounts=2,
            record=False,
            record_frames=False,
            primary_limit=MOCK_LIMIT,
            secondary_limit=MOCK_LIMIT,
        )
    )
    body = bodies.encode(
        bodies.request([bodies.developer_message(2048), bodies.user_message("hello")], thread=None)
    )
    results: dict[str, Any] = {"turns": turns}
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            mock_port = await nursery.start(serve_mock, backend, "127.0.0.1", 0)
            root = f"http://127.0.0.1:{mock_port}"
            settings = load_settings(
                environ={},
                overrides={
                    "port": 0,
                    "data_dir": str(Path(tmp) / "proxy"),
                    "upstream_base_url": f"{root}/backend-api",
                    "auth_base_url": root,
                    "log_level": "warning",
                },
            )
            proxy_port = await nursery.start(serve_proxy, settings)
            async with MockControl(root) as control, httpx.AsyncClient(trust_env=False) as http:
                for account in await control.accounts():
                    auth = await control.auth_json(account["account_id"])
                    await http.post(f"http://127.0.0.1:{proxy_port}/api/accounts", json=auth)
                tokens = (await control.auth_json("acct-mock-1"))["tokens"]
            direct_headers = [
                ("authorization", f"Bearer {tokens['access_token']}"),
                ("chatgpt-account-id", tokens["account_id"]),
            ]
            for name, port, headers in (
                ("direct", mock_port, direct_headers),
                ("proxy", proxy_port, []),
            ):
                client = HttpClient("127.0.0.1", port, headers)
                try:
                    await _turns(client, body, warmup)
                    results[name] = await _turns(client, body, turns)
                finally:
                    await client.aclose()
            nursery.cancel_scope.cancel(reason="measured")
    results["proxy_cpu_ms_per_turn"] = round(
        results["proxy"]["ms_per_turn"] - results["direct"]["ms_per_turn"], 3
    )
    results["proxy_ttfb_added_ms"] = round(
        results["proxy"]["ttfb_p50_ms"] - results["direct"]["ttfb_p50_ms"], 3
    )
    return results


def main() -> None:
    turns = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    print(trio.run(measure_floor, turns))


if __name__ == "__main__":
    main()
