"""The upstream WebSocket between turns: a conversation reads its socket while no turn runs,
so upstream's pings are answered and an upstream close is noticed at once
(``Conversation.keep_link``; docs/continuity.md). Downstream WebSocket sessions and bridge
sessions, through real sockets, against a mock that pings its connections
(``ws_ping_interval``) and closes one that stops answering (``ws_ping_timeout``)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import final_text, open_ws, parse_sse, request_body, response_id, ws_turn
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.upstream.ws import UpstreamClosed, connect_upstream_websocket

BETA = {"openai-beta": "responses_websockets=2026-02-06"}
PING_INTERVAL = 0.1
PING_TIMEOUT = 0.3
IDLE = 1.0  # longer than a ping's interval and timeout together, several times over


async def counters(proxy: ProxyEnv) -> dict[str, int]:
    value: dict[str, int] = (await proxy.client.get(f"{proxy.root}/api/stats")).json()["counters"]
    return value


async def until(check: Any, seconds: float = 5.0) -> None:
    """Poll an async predicate (a counter behind an HTTP API), bounded in time."""
    with trio.fail_after(seconds):
        while True:
            if await check():
                return
            await trio.sleep(0.01)


async def bridge_turn(
    proxy: ProxyEnv, text: str, **extra: Any
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    response = await proxy.client.post(
        proxy.codex_url, json=request_body(text, **extra), headers={"session-id": "conv-live"}
    )
    return response, parse_sse(response.text) if response.status_code == 200 else []


async def pinging_mock(make_mock: MockFactory, **extra: Any) -> MockEnv:
    return await make_mock(
        MockConfig(
            accounts=1,
            ws_ping_interval=PING_INTERVAL,
            ws_ping_timeout=PING_TIMEOUT,
            **extra,
        )
    )


async def test_a_websocket_session_idle_between_turns_keeps_its_upstream_socket(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await pinging_mock(make_mock)
    proxy = await make_proxy(mock)
    async with open_ws(proxy.codex_url, {**BETA, "session-id": "thread-live"}) as ws:
        first = await ws_turn(ws, request_body("mock:say one"))
        assert final_text(first) == "one"
        before = await mock.control.stats()
        await trio.sleep(IDLE)
        idle = await mock.control.stats()
        assert idle["ws_pongs_received"] - before["ws_pongs_received"] >= 3
        assert idle["ws_ping_timeouts"] == 0 and idle["ws_open"] == 1
        second = await ws_turn(
            ws, request_body("mock:say two", previous_response_id=response_id(first))
        )
        assert final_text(second) == "two"
    stats = await mock.control.stats()
    assert stats["ws_connections_total"] == 1 and stats["ws_ping_timeouts"] == 0
    counted = await counters(proxy)
    assert counted.get("reanchored", 0) == 0
    assert counted.get("upstream_closed_between_turns", 0) == 0


async def test_a_bridge_session_idle_between_turns_keeps_its_upstream_socket(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await pinging_mock(make_mock)
    proxy = await make_proxy(mock)
    first, events = await bridge_turn(proxy, "mock:say one")
    assert first.status_code == 200 and final_text(events) == "one"
    before = await mock.control.stats()
    await trio.sleep(IDLE)
    idle = await mock.control.stats()
    assert idle["ws_pongs_received"] - before["ws_pongs_received"] >= 3
    assert idle["ws_ping_timeouts"] == 0 and idle["ws_open"] == 1
    second, events = await bridge_turn(
        proxy, "mock:say two", previous_response_id=response_id(events)
    )
    assert second.status_code == 200 and final_text(events) == "two"
    stats = await mock.control.stats()
    assert stats["ws_connections_total"] == 1 and stats["ws_ping_timeouts"] == 0
    counted = await counters(proxy)
    assert counted["bridge_sessions"] == 1 and counted.get("reanchored", 0) == 0


async def test_turns_in_quick_succession_hand_the_socket_over_without_losing_bytes(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    # pings all the time and answers cut anywhere: the reader is cancelled mid-frame
    mock = await make_mock(
        MockConfig(
            accounts=1,
            ws_ping_interval=0.005,
            ws_ping_timeout=PING_TIMEOUT,
            segmentation="split",
            deltas=8,
        )
    )
    proxy = await make_proxy(mock)
    async with open_ws(proxy.codex_url, {**BETA, "session-id": "thread-quick"}) as ws:
        previous: str | None = None
        for number in range(30):
            extra = {"previous_response_id": previous} if previous else {}
            events = await ws_turn(ws, request_body(f"mock:say turn {number}", **extra))
            assert final_text(events) == f"turn {number}"
            assert events[-1]["type"] == "response.completed"
            previous = response_id(events)
            await trio.sleep(0.01 * (number % 3))
    stats = await mock.control.stats()
    assert stats["ws_connections_total"] == 1 and stats["ws_ping_timeouts"] == 0
    assert stats["ws_pongs_received"] >= 1


async def test_an_upstream_close_between_turns_is_noticed_at_once_and_the_next_turn_reanchors(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    async with open_ws(proxy.codex_url, {**BETA, "session-id": "thread-closed"}) as ws:
        first = await ws_turn(ws, request_body("mock:say one"))
        assert await mock.control.close_websockets(1011) == 1

        async def dropped() -> bool:
            stats = await mock.control.stats()
            closed = (await counters(proxy)).get("upstream_closed_between_turns", 0)
            return closed == 1 and stats["ws_open"] == 0

        await until(dropped, 2.0)  # noticed with no turn running, the socket closed
        second = await ws_turn(
            ws, request_body("mock:say two", previous_response_id=response_id(first))
        )
        assert final_text(second) == "two" and second[-1]["type"] == "response.completed"
    assert (await mock.control.stats())["ws_connections_total"] == 2
    assert (await counters(proxy))["reanchored"] == 1
    messages = await mock.control.model_requests(transport="ws")
    assert [m["status"] for m in messages] == [200, 200]
    resent = messages[1]["body"]
    assert "previous_response_id" not in resent and len(resent["input"]) > 1  # rebuilt


async def test_an_upstream_close_between_bridged_turns_is_noticed_and_the_next_reanchors(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    first, events = await bridge_turn(proxy, "mock:say one")
    assert first.status_code == 200
    assert await mock.control.close_websockets(1011) == 1

    async def dropped() -> bool:
        stats = await mock.control.stats()
        closed = (await counters(proxy)).get("upstream_closed_between_turns", 0)
        return closed == 1 and stats["ws_open"] == 0

    await until(dropped, 2.0)
    second, events = await bridge_turn(
        proxy, "mock:say two", previous_response_id=response_id(events)
    )
    assert second.status_code == 200 and final_text(events) == "two"
    assert (await mock.control.stats())["ws_connections_total"] == 2
    assert (await counters(proxy))["reanchored"] == 1


async def test_the_mock_closes_a_connection_that_stops_answering_pings(
    make_mock: MockFactory,
) -> None:
    # what the proxy is kept from: a socket nobody reads between turns (the upstream client
    # answers pings only inside receive()) is closed with 1011 once a ping goes unanswered
    mock = await pinging_mock(make_mock)
    url = mock.responses_url.replace("http://", "ws://", 1)
    socket = await connect_upstream_websocket(url, list({**mock.ws_headers(), **BETA}.items()))
    try:

        async def timed_out() -> bool:
            return (await mock.control.stats())["ws_ping_timeouts"] == 1

        await until(timed_out, 3.0)
        with pytest.raises(UpstreamClosed) as closed:
            with trio.fail_after(3.0):
                await socket.receive()
        assert closed.value.code == 1011
    finally:
        await socket.aclose()

    async def gone() -> bool:
        return (await mock.control.stats())["ws_open"] == 0

    await until(gone, 3.0)
