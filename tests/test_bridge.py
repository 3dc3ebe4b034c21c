"""The HTTP bridge: HTTP conversations served over pooled upstream WebSockets, so
``previous_response_id`` works over HTTP (docs/continuity.md, rows B1-B7)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import final_text, parse_sse, request_body, response_id, user_message, wait_until
from trioproxy.harness.mock_upstream import MockConfig


def session(key: str) -> dict[str, str]:
    return {"session-id": key}


async def turn(
    proxy: ProxyEnv, text: str, key: str | None = "conv-1", **extra: Any
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    response = await proxy.client.post(
        proxy.codex_url,
        json=request_body(text, **extra),
        headers=session(key) if key else {},
    )
    return response, parse_sse(response.text) if response.status_code == 200 else []


async def counters(proxy: ProxyEnv) -> dict[str, int]:
    value: dict[str, int] = (await proxy.client.get(f"{proxy.root}/api/stats")).json()["counters"]
    return value


async def lanes(proxy: ProxyEnv) -> dict[str, Any]:
    value: dict[str, Any] = (await proxy.client.get(f"{proxy.root}/api/admission")).json()
    return value


def lane_in_use(admission: dict[str, Any], name: str) -> int:
    return int(admission["lanes"][name]["in_use"])


async def upstream_messages(mock: MockEnv) -> list[dict[str, Any]]:
    return await mock.control.model_requests()


async def test_b1_http_follow_up_with_previous_response_id_stays_on_one_upstream_connection(
    proxy: ProxyEnv,
) -> None:
    first, events = await turn(proxy, "mock:say one")
    assert first.status_code == 200 and final_text(events) == "one"
    anchor = response_id(events)
    second, events = await turn(proxy, "mock:say two", previous_response_id=anchor)
    assert second.status_code == 200, second.text
    assert final_text(events) == "two" and events[-1]["type"] == "response.completed"
    assert second.headers["content-type"].startswith("text/event-stream")
    messages = await upstream_messages(proxy.mock)
    assert [m["transport"] for m in messages] == ["ws", "ws"]
    assert messages[0]["parent"] == messages[1]["parent"]  # one upstream connection
    assert messages[1]["body"]["previous_response_id"] == anchor
    assert len(messages[1]["body"]["input"]) == 1  # incremental, as the client sent it
    stats = await counters(proxy)
    assert stats["bridge_sessions"] == 1 and stats.get("reanchored", 0) == 0


async def test_b1_v1_unary_follow_up_found_by_its_anchor_alone(proxy: ProxyEnv) -> None:
    first = await proxy.client.post(
        proxy.v1_url,
        json={"model": "gpt-5.5", "input": "mock:say one", "prompt_cache_key": "conv-v1"},
    )
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "completed"
    anchor = first.json()["id"]
    # no session key at all: the anchor names the bridge session that owns it
    second = await proxy.client.post(
        proxy.v1_url,
        json={"model": "gpt-5.5", "input": "mock:say two", "previous_response_id": anchor},
    )
    assert second.status_code == 200, second.text
    assert second.json()["output"][-1]["content"][0]["text"] == "two"
    messages = await upstream_messages(proxy.mock)
    assert len({m["parent"] for m in messages}) == 1
    assert messages[1]["body"]["previous_response_id"] == anchor


async def test_b2_bridge_socket_lost_before_created_reconnects_on_its_account_and_reanchors(
    proxy: ProxyEnv,
) -> None:
    _, events = await turn(proxy, "mock:say one")
    anchor = response_id(events)
    owner = (await upstream_messages(proxy.mock))[0]["account"]
    await proxy.mock.control.add_fault("close_before_created", transport="ws", count=1)
    response, events = await turn(proxy, "mock:say two", previous_response_id=anchor)
    assert response.status_code == 200, response.text
    assert final_text(events) == "two"
    upgrades = await proxy.mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert len(upgrades) == 2 and {u["account"] for u in upgrades} == {owner}
    last = (await upstream_messages(proxy.mock))[-1]
    assert last["status"] == 200 and "previous_response_id" not in last["body"]
    assert len(last["body"]["input"]) == 3  # turn 1's input and output, then the new message
    assert (await counters(proxy))["reanchored"] == 1


async def test_b3_account_limited_on_an_anchored_bridge_turn_moves_and_reanchors(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock)
    _, events = await turn(proxy, "mock:say one")
    anchor = response_id(events)
    owner = (await upstream_messages(mock))[0]["account"]
    await mock.control.add_fault("usage_limit", account=owner, transport="ws", count=1)
    response, events = await turn(proxy, "mock:say two", previous_response_id=anchor)
    assert response.status_code == 200, response.text
    assert final_text(events) == "two"
    last = (await upstream_messages(mock))[-1]
    assert last["account"] != owner and last["status"] == 200
    assert "previous_response_id" not in last["body"]
    # the next turn stays on the new account's connection, incrementally
    response, events = await turn(proxy, "mock:say three", previous_response_id=response_id(events))
    assert final_text(events) == "three"
    final = (await upstream_messages(mock))[-1]
    assert final["account"] == last["account"] and final["parent"] == last["parent"]
    assert len(final["body"]["input"]) == 1


async def test_b4_unknown_anchor_short_continuation_fails_closed_as_502(proxy: ProxyEnv) -> None:
    response, _ = await turn(proxy, "mock:say two", previous_response_id="resp_gone_forever")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "stream_incomplete"
    assert "resp_" not in response.text
    assert await upstream_messages(proxy.mock) == []  # nothing was sent upstream


async def test_b4_self_contained_request_with_a_stale_anchor_goes_without_it(
    proxy: ProxyEnv,
) -> None:
    history = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]},
        user_message("mock:say full"),
    ]
    response, events = await turn(
        proxy, "ignored", previous_response_id="resp_gone_forever", input=history
    )
    assert response.status_code == 200, response.text
    assert final_text(events) == "full"
    last = (await upstream_messages(proxy.mock))[-1]
    assert "previous_response_id" not in last["body"] and len(last["body"]["input"]) == 2


async def test_b5_upstream_close_after_output_ends_the_stream_then_the_next_turn_reanchors(
    proxy: ProxyEnv,
) -> None:
    _, events = await turn(proxy, "mock:say one")
    anchor = response_id(events)
    await proxy.mock.control.add_fault(
        "close_after_created", count=1, after_events=3, transport="ws"
    )
    response, events = await turn(proxy, "mock:say two", previous_response_id=anchor)
    assert response.status_code == 200
    assert events and all(e["type"] != "response.completed" for e in events)  # cut short
    # the client retries the same request (as the Codex CLI does on an incomplete stream)
    response, events = await turn(proxy, "mock:say two", previous_response_id=anchor)
    assert response.status_code == 200 and final_text(events) == "two"
    last = (await upstream_messages(proxy.mock))[-1]
    assert "previous_response_id" not in last["body"]
    assert (await counters(proxy))["reanchored"] == 1


async def test_b6_client_leaving_mid_turn_frees_its_slots_and_the_conversation_goes_on(
    proxy: ProxyEnv,
) -> None:
    _, events = await turn(proxy, "mock:say one")
    anchor = response_id(events)
    await proxy.mock.control.add_fault("slow", event_delay=0.2, deltas=20, count=1)
    seen: list[str] = []
    with trio.move_on_after(30):
        async with proxy.client.stream(
            "POST",
            proxy.codex_url,
            json=request_body("mock:say abandoned", previous_response_id=anchor),
            headers=session("conv-1"),
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:])["type"])
                    if "response.output_text.delta" in seen:
                        break  # the client leaves mid-stream
    assert "response.created" in seen
    # the abandoned upstream socket is closed; the HTTP slot is back; the session lives on
    await wait_until(lambda: proxy.mock.backend.stats.in_flight == 0, 10)
    admission = await lanes(proxy)
    assert lane_in_use(admission, "proxy_http") == 0 and lane_in_use(admission, "bridge") == 1
    response, events = await turn(proxy, "mock:say two", previous_response_id=anchor)
    assert response.status_code == 200 and final_text(events) == "two"
    assert (await counters(proxy))["reanchored"] == 1


async def test_b7_queue_limit_answers_a_local_429(mock: MockEnv, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(mock, bridge_queue_limit=1)
    await mock.control.add_fault("slow", event_delay=0.25, deltas=10, count=1)
    results: list[tuple[int, str | None, str | None]] = []

    async def post(text: str) -> None:
        response, _ = await turn(proxy, text)
        code = response.json()["error"]["code"] if response.status_code != 200 else None
        results.append((response.status_code, code, response.headers.get("x-trioproxy-overload")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, "mock:say slow")
        await wait_until(lambda: mock.backend.stats.in_flight >= 1)
        await wait_until(lambda: len(mock.backend.recorder.records) >= 2)  # upgrade + message
        nursery.start_soon(post, "mock:say queued")
        nursery.start_soon(post, "mock:say rejected")
    assert sorted(r[0] for r in results) == [200, 200, 429]
    assert (429, "proxy_overloaded", "bridge_queue") in results


async def test_bridge_sessions_are_bounded_idle_ones_evicted_busy_ones_never(
    mock: MockEnv, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(mock, bridge_max_sessions=1)
    _, events = await turn(proxy, "mock:say a", key="conv-a")
    anchor_a = response_id(events)
    response, _ = await turn(proxy, "mock:say b", key="conv-b")  # evicts idle conv-a
    assert response.status_code == 200
    assert (await counters(proxy))["bridge_evicted"] == 1
    # conv-a's socket is gone and so is its memory: a short continuation fails closed
    response, _ = await turn(proxy, "mock:say a2", key="conv-a", previous_response_id=anchor_a)
    assert response.status_code == 502 and response.json()["error"]["code"] == "stream_incomplete"
    # while the only session is busy, a new conversation is served over plain HTTP
    await mock.control.add_fault("slow", event_delay=0.2, deltas=10, count=1)
    done: list[int] = []

    async def busy() -> None:
        response, _ = await turn(proxy, "mock:say busy", key="conv-c")
        done.append(response.status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        # conv-c's message reached upstream (after conv-a's and conv-b's)
        await wait_until(lambda: sum(r.method == "WS" for r in mock.backend.recorder.records) == 3)
        response, events = await turn(proxy, "mock:say plain", key="conv-d")
        assert response.status_code == 200 and final_text(events) == "plain"
    assert done == [200]
    transports = [m["transport"] for m in await upstream_messages(mock)]
    assert transports.count("http") == 1
    assert (await counters(proxy))["bridge_full"] == 1


async def test_bridge_idle_ttl_closes_the_session_and_its_upstream_socket(
    mock: MockEnv, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(mock, bridge_idle_ttl=0.3)
    response, _ = await turn(proxy, "mock:say one")
    assert response.status_code == 200
    await wait_until(lambda: mock.backend.stats.in_flight == 0, 10)
    admission = await lanes(proxy)
    assert lane_in_use(admission, "bridge") == 0
    upgrades = await mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert len(upgrades) == 1 and upgrades[0]["open"] is False
    assert (await counters(proxy))["bridge_idle_closed"] == 1


async def test_bridge_upstream_handshake_carries_only_allowed_headers(
    mock: MockEnv, make_proxy: ProxyFactory
) -> None:
    # with an API key: a request carrying x-forwarded-for came through a reverse proxy
    proxy = await make_proxy(mock, api_key=True)
    sent = {
        "authorization": f"Bearer {proxy.api_key}",
        "chatgpt-account-id": "acct-of-the-client",
        "cookie": "a=b",
        "x-forwarded-for": "10.0.0.1",
        "session-id": "thread-42",
        "originator": "codex_exec",
        "openai-beta": "responses=experimental",
    }
    response = await proxy.client.post(proxy.codex_url, json=request_body(), headers=sent)
    assert response.status_code == 200
    upgrade = (
        await proxy.mock.control.requests(method="GET", path="/backend-api/codex/responses")
    )[0]
    headers = {k: v for k, v in upgrade["headers"]}
    names = [k for k, _ in upgrade["headers"]]
    for dropped in ("cookie", "x-forwarded-for", "content-type", "content-length"):
        assert dropped not in names, dropped
    assert headers["chatgpt-account-id"] == upgrade["account"]
    assert headers["authorization"] != f"Bearer {proxy.api_key}"
    assert headers["session-id"] == "thread-42" and headers["originator"] == "codex_exec"
    assert "responses_websockets=2026-02-06" in headers["openai-beta"]


async def test_openai_sdk_previous_response_id_over_http(proxy: ProxyEnv) -> None:
    import openai

    def run() -> tuple[str, str, str]:
        client = openai.OpenAI(base_url=f"{proxy.root}/v1", api_key="unused", max_retries=0)
        try:
            first = client.responses.create(
                model="gpt-5.5", input="mock:say first", prompt_cache_key="sdk-conv"
            )
            second = client.responses.create(
                model="gpt-5.5",
                input="mock:say second",
                previous_response_id=first.id,
                prompt_cache_key="sdk-conv",
            )
            return first.id, first.output_text, second.output_text
        finally:
            client.close()

    first_id, first_text, second_text = await trio.to_thread.run_sync(run)
    assert (first_text, second_text) == ("first", "second")
    messages = await upstream_messages(proxy.mock)
    assert len({m["parent"] for m in messages}) == 1
    assert messages[1]["body"]["previous_response_id"] == first_id


async def test_drain_lets_a_bridged_turn_finish_then_closes_its_session(
    make_mock: MockFactory, tmp_path: Path
) -> None:
    from tests.test_proxy_lifecycle import direct_settings, seed_accounts
    from trioproxy.server import serve_proxy

    mock = await make_mock(MockConfig(accounts=1))
    settings = direct_settings(mock, tmp_path / "data", drain_grace=0.3, drain_timeout=10.0)
    await seed_accounts(settings, mock, "acct-mock-1")
    await mock.control.add_fault("slow", event_delay=0.1, deltas=10, count=1)
    shutdown = trio.Event()
    seen: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_proxy, settings, shutdown_event=shutdown))

        async def bridged_turn() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.post(
                    f"http://127.0.0.1:{port}/backend-api/codex/responses",
                    json=request_body("mock:say drained"),
                    headers=session("conv-drain"),
                )
                seen["turn"] = (response.status_code, final_text(parse_sse(response.text)))

        nursery.start_soon(bridged_turn)
        await wait_until(lambda: any(r.method == "WS" for r in mock.backend.recorder.records))
        shutdown.set()
    assert seen["turn"] == (200, "drained")  # the turn in flight finished
    upgrades = await mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert len(upgrades) == 1 and upgrades[0]["open"] is False  # and its socket was closed


async def test_a_bridged_turn_with_no_usable_account_gets_the_pool_answer(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    empty = await make_proxy(mock, accounts=[])
    response, _ = await turn(empty, "mock:say one")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_available_account"
    proxy = await make_proxy(mock)
    response, events = await turn(proxy, "mock:say one")
    assert response.status_code == 200
    anchor = response_id(events)
    # the account is spent: the next turn's usage-limit error resets the pin, no account is
    # left, and the client gets the pool's usage-limit answer (not a bridge failure)
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=900)
    await mock.control.add_fault("usage_limit", on="upgrade", resets_in=900)
    response, _ = await turn(proxy, "mock:say two", previous_response_id=anchor)
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "usage_limit_reached"
    assert "resp_" not in response.text
