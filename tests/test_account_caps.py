"""Per-account caps: concurrent streams and creates per account, held by the turn's own scope;
a busy account is passed over, a turn waits (bounded) when none is free, else a local 429."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import WS_BETA, final_text, open_ws, parse_sse, request_body, wait_until
from trioproxy.harness.mock_upstream import MockConfig


async def admission(proxy: ProxyEnv) -> dict[str, Any]:
    value: dict[str, Any] = (await proxy.client.get(f"{proxy.root}/api/admission")).json()
    return value


async def post(proxy: ProxyEnv, text: str) -> httpx.Response:
    # no session key: plain HTTP turns, routed one by one
    return await proxy.client.post(proxy.codex_url, json=request_body(text))


async def slow_turns(proxy: ProxyEnv, count: int) -> None:
    await proxy.mock.control.add_fault("slow", event_delay=0.15, deltas=12, count=count)


def account_streams(state: dict[str, Any]) -> dict[str, int]:
    return {a: v["streams"] for a, v in state["accounts"].items()}


async def test_a_busy_account_is_passed_over_for_a_free_one(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, account_max_streams=1, routing_strategy="fill_first")
    await slow_turns(proxy, 2)
    results: list[httpx.Response] = []
    seen: dict[str, int] = {}

    async def one(text: str) -> None:
        results.append(await post(proxy, text))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "mock:say first")
        await wait_until(lambda: mock.backend.stats.in_flight >= 1)
        nursery.start_soon(one, "mock:say second")
        await wait_until(lambda: mock.backend.stats.in_flight >= 2)
        seen = account_streams(await admission(proxy))
    assert [r.status_code for r in results] == [200, 200]
    accounts = [m["account"] for m in await mock.control.model_requests()]
    assert sorted(accounts) == ["acct-mock-1", "acct-mock-2"]  # fill_first would stack them
    assert seen == {"acct-mock-1": 1, "acct-mock-2": 1}
    state = await admission(proxy)
    assert state["accounts"] == {}  # every slot back
    assert state["account_totals"]["stream"]["in_use"] == 0


async def test_with_no_free_account_a_turn_fails_fast_with_a_local_429(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, account_max_streams=1, account_cap_wait=0)
    await slow_turns(proxy, 1)
    results: list[httpx.Response] = []

    async def one(text: str) -> None:
        results.append(await post(proxy, text))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "mock:say first")
        await wait_until(lambda: mock.backend.stats.in_flight >= 1)
        rejected = await post(proxy, "mock:say second")
    assert rejected.status_code == 429
    error = rejected.json()["error"]
    assert error["code"] == "proxy_overloaded" and error["type"] == "server_overloaded"
    assert "account:stream" in error["message"]
    assert rejected.headers["x-trioproxy-overload"] == "account:stream"
    assert int(rejected.headers["retry-after"]) >= 1
    assert [r.status_code for r in results] == [200]
    assert len(await mock.control.model_requests()) == 1  # nothing reached upstream


async def test_a_turn_waits_for_a_slot_then_runs(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, account_max_streams=1, account_cap_wait=60)
    await slow_turns(proxy, 1)
    results: list[tuple[int, str]] = []
    waiting: dict[str, Any] = {}

    async def one(text: str) -> None:
        response = await post(proxy, text)
        results.append((response.status_code, final_text(parse_sse(response.text))))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "mock:say first")
        await wait_until(lambda: mock.backend.stats.in_flight >= 1)
        nursery.start_soon(one, "mock:say second")

        async def queued() -> bool:
            state = await admission(proxy)
            account = state["accounts"].get("acct-mock-1") or {}
            return bool(account.get("streams_waiting"))

        for _ in range(500):  # bounded: at most ~10 s
            if await queued():
                break
            await trio.sleep(0.02)
        waiting = (await admission(proxy))["accounts"]["acct-mock-1"]
    assert waiting["streams"] == 1 and waiting["streams_waiting"] == 1
    assert sorted(results) == [(200, "first"), (200, "second")]
    assert (await admission(proxy))["accounts"] == {}


async def test_a_pinned_websocket_session_at_its_cap_gets_a_local_429_and_goes_on(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, account_max_streams=1, account_cap_wait=0)
    async with open_ws(proxy.codex_url, {"openai-beta": WS_BETA}) as ws:
        await ws.send_message(
            json.dumps({"type": "response.create", **request_body("mock:say pinned")})
        )
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "response.completed":
            events.append(json.loads(await ws.get_message()))
        await slow_turns(proxy, 1)
        async with trio.open_nursery() as nursery:

            async def hog() -> None:
                assert (await post(proxy, "mock:say hog")).status_code == 200

            nursery.start_soon(hog)
            await wait_until(lambda: len(mock.backend.recorder.records) >= 3)
            await ws.send_message(
                json.dumps({"type": "response.create", **request_body("mock:say blocked")})
            )
            error = json.loads(await ws.get_message())
        assert error["type"] == "error" and error["status"] == 429
        assert error["error"]["code"] == "proxy_overloaded"
        assert error["headers"]["x-trioproxy-overload"] == "account:stream"
        # the session is still there once the slot is free
        await ws.send_message(
            json.dumps({"type": "response.create", **request_body("mock:say again")})
        )
        events.clear()
        while not events or events[-1]["type"] not in ("response.completed", "error"):
            events.append(json.loads(await ws.get_message()))
        assert final_text(events) == "again"
    await wait_until(lambda: mock.backend.stats.in_flight == 0, 10)
    assert (await admission(proxy))["accounts"] == {}


async def test_the_global_create_limit_queues_requests_waiting_for_their_first_event(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, work_create_limit=1)
    await mock.control.add_fault("slow", first_event_delay=1.0, count=2)
    results: list[int] = []
    state: dict[str, Any] = {}

    async def one(text: str) -> None:
        results.append((await post(proxy, text)).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "mock:say first")
        nursery.start_soon(one, "mock:say second")
        for _ in range(500):  # bounded: at most ~10 s
            state = (await admission(proxy))["work"]["create"]
            if state["waiting"]:
                break
            await trio.sleep(0.02)
    assert state["in_use"] == 1 and state["waiting"] == 1 and state["limit"] == 1
    assert results == [200, 200]
    assert (await admission(proxy))["work"]["create"]["in_use"] == 0
