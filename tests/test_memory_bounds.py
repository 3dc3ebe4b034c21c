"""Nothing the proxy keeps grows with the number of turns it served.

The proxy's own allocations (any traceback frame in ``trioproxy/``, the mock's excluded) are
snapshotted with ``tracemalloc`` after a warm-up that fills every bounded structure (the
conversation budget, the response ids each connection and bridge session keeps, the routing
table), and again after hundreds more turns of the same traffic: what is still allocated
then, per turn, must be noise. A structure that keeps something per turn (an id, a record, a
label) makes these fail.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import WS_BETA, parse_sse, request_body, response_id, user_message
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.upstream.ws import open_upstream_websocket

PACKAGE = Path(__file__).resolve().parent.parent / "trioproxy"
PER_TURN_NOISE = 64  # bytes: a response id kept per turn is about twice that
# tracemalloc slows every allocation down: on a busy machine these take minutes
pytestmark = pytest.mark.timeout(600)


def proxy_allocations(snapshot: tracemalloc.Snapshot) -> int:
    kept = snapshot.filter_traces(
        [
            tracemalloc.Filter(True, f"{PACKAGE}/*", all_frames=True),
            tracemalloc.Filter(False, f"{PACKAGE}/harness/*", all_frames=True),
        ]
    )
    return sum(stat.size for stat in kept.statistics("filename"))


async def growth_per_turn(turns: Callable[[int], Awaitable[None]], warm: int, count: int) -> float:
    """The proxy's allocations grown per turn over ``count`` turns, measured after ``warm``
    turns and one window of ``count // 2`` more: the allocator's own churn settles in the
    first window (it levels off there). Two windows of ``count`` turns follow, and the
    smaller growth counts: a structure that keeps something per turn grows in every window,
    while a burst of trio's or the allocator's own bookkeeping lands in one."""
    await turns(warm)
    gc.collect()
    tracemalloc.start(4)
    try:
        await turns(count // 2)
        gc.collect()
        sizes = [proxy_allocations(tracemalloc.take_snapshot())]
        for _ in range(2):
            await turns(count)
            gc.collect()
            sizes.append(proxy_allocations(tracemalloc.take_snapshot()))
    finally:
        tracemalloc.stop()
    return min(sizes[1] - sizes[0], sizes[2] - sizes[1]) / count


async def quiet_proxy(make_mock: MockFactory, make_proxy: ProxyFactory) -> ProxyEnv:
    # the mock keeps no request records; the conversation budget is tiny, so it is full
    # after the warm-up and forgets as much as it learns
    mock = await make_mock(MockConfig(accounts=4, record=False))
    return await make_proxy(mock, reanchor_total_max_bytes=32 * 1024)


async def test_bridged_http_turns_leave_nothing_behind(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await quiet_proxy(make_mock, make_proxy)
    keys = [f"conversation-{i}" for i in range(4)]
    anchors: dict[str, str] = {}
    done = 0

    async def turns(count: int) -> None:
        nonlocal done
        for _ in range(count):
            key = keys[done % len(keys)]
            extra: dict[str, Any] = {}
            if done % 3 == 2 and key in anchors:  # every third turn continues the last one
                extra = {"previous_response_id": anchors[key], "input": [user_message("more")]}
            body = request_body(f"mock:say turn {done}", **extra)
            response = await proxy.client.post(
                proxy.codex_url, json=body, headers={"session-id": key}
            )
            assert response.status_code == 200, response.text
            anchors[key] = response_id(parse_sse(response.text))
            done += 1

    per_turn = await growth_per_turn(turns, warm=400, count=600)
    assert per_turn < PER_TURN_NOISE


async def test_websocket_sessions_leave_nothing_behind(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await quiet_proxy(make_mock, make_proxy)
    url = proxy.codex_url.replace("http://", "ws://", 1)

    async def sessions(count: int) -> None:
        # five chained turns per socket, then a new socket (count is in turns)
        for _ in range(count // 5):
            async with open_upstream_websocket(url, [("openai-beta", WS_BETA)]) as ws:
                anchor: str | None = None
                for n in range(5):
                    extra: dict[str, Any] = {"previous_response_id": anchor} if anchor else {}
                    message = {"type": "response.create", **request_body(f"mock:say {n}", **extra)}
                    await ws.send_text(json.dumps(message))
                    while True:
                        event = json.loads(await ws.receive())
                        if event["type"] == "response.created":
                            anchor = event["response"]["id"]
                        if event["type"] == "response.completed":
                            break

    per_turn = await growth_per_turn(sessions, warm=200, count=600)
    assert per_turn < PER_TURN_NOISE
