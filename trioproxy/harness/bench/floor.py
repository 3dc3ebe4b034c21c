"""The proxy's floor: turns sent one after another, with nothing else going on, through the
proxy and directly to the mock, each a process of its own (the bench's stack).

With one turn at a time nothing waits behind other streams' work, so the difference between
the two is what the proxy costs a turn by itself: the CPU it spends (read from
``/proc``, per turn) and the time to first byte it adds (its CPU on the way plus the extra
hop through the kernel in each direction). Under load (``trioproxy bench``) the overhead
is this floor plus the time each wake-up waits behind the other streams.

``python -m trioproxy.harness.bench.floor [TURNS]`` (default 2000; the direct baseline gets
half as many).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import trio

from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import HttpClient
from trioproxy.harness.bench.sampler import cpu_seconds
from trioproxy.harness.bench.stack import Endpoint, start_stack


async def _turns(endpoint: Endpoint, body: bytes, count: int) -> dict[str, float]:
    client = HttpClient(endpoint.host, endpoint.port, endpoint.headers_for(0))
    ttfb: list[float] = []
    try:
        for _ in range(20):  # warm-up: connections, pools
            await client.sse_turn(endpoint.path, body, [])
        start = trio.current_time()
        for _ in range(count):
            outcome = await client.sse_turn(endpoint.path, body, [])
            if not outcome.completed or outcome.ttfb is None:
                raise RuntimeError(f"turn failed: {outcome.error}")
            ttfb.append(outcome.ttfb)
        elapsed = trio.current_time() - start
    finally:
        await client.aclose()
    ttfb.sort()
    return {
        "ms_per_turn": round(elapsed / count * 1000, 3),
        "ttfb_p50_ms": round(ttfb[len(ttfb) // 2] * 1000, 3),
    }


async def measure_floor(turns: int = 2000) -> dict[str, Any]:
    body = bodies.encode(
        bodies.request([bodies.developer_message(2048), bodies.user_message("hello")], thread=None)
    )
    results: dict[str, Any] = {"turns": turns}
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            stack = await start_stack(
                nursery, Path(tmp), accounts=2, proxy_options={"log-level": "warning"}, logs=[]
            )
            assert stack.direct is not None and stack.proxy_pid is not None
            # the mock answers at once: 13 events, no delays (its defaults)
            results["direct"] = await _turns(stack.direct, body, max(1, turns // 2))
            proxy = psutil.Process(stack.proxy_pid)
            before = cpu_seconds(proxy)
            results["proxy"] = await _turns(stack.proxy, body, turns)
            results["proxy"]["cpu_ms_per_turn"] = round(
                (cpu_seconds(proxy) - before) / (turns + 20) * 1000, 3
            )
            nursery.cancel_scope.cancel(reason="measured")
    results["proxy_ttfb_added_ms"] = round(
        results["proxy"]["ttfb_p50_ms"] - results["direct"]["ttfb_p50_ms"], 3
    )
    return results


def main() -> None:
    turns = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(trio.run(measure_floor, turns))


if __name__ == "__main__":
    main()
