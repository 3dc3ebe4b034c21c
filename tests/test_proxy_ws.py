"""The proxy's WebSocket sessions through real sockets, in front of the mock backend."""

from __future__ import annotations

import json

import trio

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import (
    final_text,
    open_ws,
    rejected_upgrade,
    request_body,
    response_id,
    user_message,
    ws_turn,
)
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER

BETA = {"openai-beta": "responses_websockets=2026-02-06"}


async def test_multi_turn_with_previous_response_id_on_one_upstream_connection(
    proxy: ProxyEnv,
) -> None:
    async with open_ws(proxy.codex_url, {**BETA, "session-id": "thread-ws"}) as ws:
        assert ws.handshake_headers is not None
        names = {k.decode().lower() for k, _ in ws.handshake_headers}
        assert {"x-codex-turn-state", "x-codex-primary-used-percent", "x-models-etag"} <= names
        prewarm = await ws_turn(ws, request_body("warm", generate=False))
        first = await ws_turn(
            ws, request_body("mock:exec echo hi", previous_response_id=response_id(prewarm))
        )
        call = next(
            e["item"]
            for e in first
            if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"
        )
        second = await ws_turn(
            ws,
            {
                "model": "gpt-5.5",
                "previous_response_id": response_id(first),
                "input": [
                    {"type": "function_call_output", "call_id": call["call_id"], "output": "hi"}
                ],
            },
        )
        assert final_text(second) == "Tool output received: hi"
    upgrades = await proxy.mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert len(upgrades) == 1
    messages = await proxy.mock.control.model_requests(transport="ws")
    assert [m["status"] for m in messages] == [200, 200, 200]
    assert {m["parent"] for m in messages} == {upgrades[0]["id"]}
    # the upstream handshake carried the pool account and the WebSocket beta, not the client's
    headers = dict(upgrades[0]["headers"])
    assert headers["openai-beta"] == "responses_websockets=2026-02-06"
    assert headers["chatgpt-account-id"] == upgrades[0]["account"]


async def test_http_only_beta_is_not_forwarded_on_the_websocket(proxy: ProxyEnv) -> None:
    async with open_ws(
        proxy.codex_url, {"openai-beta": "responses=experimental, other_feature=1"}
    ) as ws:
        await ws_turn(ws, request_body())
    upgrade = (
        await proxy.mock.control.requests(method="GET", path="/backend-api/codex/responses")
    )[-1]
    assert (
        dict(upgrade["headers"])["openai-beta"]
        == "responses_websockets=2026-02-06, other_feature=1"
    )


async def test_connect_fails_over_when_an_account_refuses_the_upgrade(proxy: ProxyEnv) -> None:
    await proxy.mock.control.add_fault("usage_limit", on="upgrade", count=1)
    async with open_ws(proxy.codex_url, BETA) as ws:
        events = await ws_turn(ws, request_body())
        assert final_text(events) == DEFAULT_ANSWER
    upgrades = await proxy.mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert [u["status"] for u in upgrades] == [429, 101]
    assert upgrades[0]["account"] != upgrades[1]["account"]


async def test_unanchored_turn_fails_over_on_a_usage_limit_error_event(proxy: ProxyEnv) -> None:
    async with open_ws(proxy.codex_url, BETA) as ws:
        await ws_turn(ws, request_body())
        first_account = (await proxy.mock.control.model_requests())[-1]["account"]
        await proxy.mock.control.add_fault("usage_limit", account=first_account, count=1)
        events = await ws_turn(ws, request_body("mock:say moved"))
        assert final_text(events) == "moved"
        assert not any(e["type"] == "error" for e in events)
    messages = await proxy.mock.control.model_requests(transport="ws")
    assert [(m["account"] == first_account, m["status"]) for m in messages] == [
        (True, 200),
        (True, 429),
        (False, 200),
    ]


async def test_anchored_turn_moves_with_its_conversation_when_the_account_is_limited(
    proxy: ProxyEnv,
) -> None:
    async with open_ws(proxy.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("mock:exec echo one"))
        call = next(
            e["item"]
            for e in first
            if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"
        )
        account = (await proxy.mock.control.model_requests())[-1]["account"]
        await proxy.mock.control.add_fault("usage_limit", account=account, count=1)
        follow_up = {
            "model": "gpt-5.5",
            "previous_response_id": response_id(first),
            "input": [
                {"type": "function_call_output", "call_id": call["call_id"], "output": "one"}
            ],
        }
        events = await ws_turn(ws, follow_up)
        assert final_text(events) == "Tool output received: one"
        assert not any(e["type"] == "error" for e in events)
    messages = await proxy.mock.control.model_requests(transport="ws")
    assert [(m["account"] == account, m["status"]) for m in messages] == [
        (True, 200),
        (True, 429),
        (False, 200),
    ]
    moved = messages[-1]["body"]
    # re-anchored: the whole conversation, no anchor, and no reasoning from the other account
    assert "previous_response_id" not in moved
    assert [i.get("type", "message") for i in moved["input"]] == [
        "message",
        "function_call",
        "function_call_output",
    ]


async def test_upstream_close_before_created_is_absorbed_for_an_unanchored_turn(
    proxy: ProxyEnv,
) -> None:
    await proxy.mock.control.add_fault("close_before_created", count=1, transport="ws")
    async with open_ws(proxy.codex_url, BETA) as ws:
        events = await ws_turn(ws, request_body())
        assert final_text(events) == DEFAULT_ANSWER


async def test_close_after_output_reaches_the_client_as_1011(proxy: ProxyEnv) -> None:
    import pytest
    import trio_websocket

    await proxy.mock.control.add_fault(
        "close_after_created", count=1, after_events=3, transport="ws"
    )
    async with open_ws(proxy.codex_url, BETA) as ws:
        await ws.send_message(json.dumps({"type": "response.create", **request_body()}))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1011


async def test_garbage_frames_get_error_events_and_the_session_continues(proxy: ProxyEnv) -> None:
    async with open_ws(proxy.codex_url, BETA) as ws:
        await ws.send_message("not json")
        assert json.loads(await ws.get_message())["error"]["code"] == "invalid_message"
        await ws.send_message(b"\x00\xff")
        assert json.loads(await ws.get_message())["error"]["code"] == "invalid_frame"
        await ws.send_message(json.dumps({"type": "response.cancel"}))
        assert json.loads(await ws.get_message())["error"]["code"] == "invalid_message"
        assert final_text(await ws_turn(ws, request_body())) == DEFAULT_ANSWER


async def test_pool_exhausted_refuses_the_upgrade_with_the_usage_limit_429(proxy: ProxyEnv) -> None:
    for account in proxy.mock.account_ids():
        await proxy.mock.control.patch_account(account, exhaust="primary", resets_in=900)
    await proxy.mock.control.add_fault("usage_limit", on="upgrade", resets_in=900)
    response = await rejected_upgrade(proxy.client, proxy.codex_url, BETA)
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "usage_limit_reached"
    assert response.json()["error"]["resets_at"] > 0


async def test_cross_account_policy_against_a_strict_backend(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    """A backend that rejects reasoning encrypted by another account: the proxy strips it
    when the conversation moves, and keeps it when it stays."""
    mock = await make_mock(MockConfig(accounts=2, strict_encrypted_content=True))
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    async with open_ws(proxy.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("mock:exec echo one"))
        call = next(
            e["item"]
            for e in first
            if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"
        )
        tool_output = [
            {"type": "function_call_output", "call_id": call["call_id"], "output": "one"}
        ]
        # same account: upstream forgot the anchor, the proxy re-anchors with the reasoning
        await mock.control.add_fault("previous_response_not_found", count=1)
        second = await ws_turn(
            ws,
            {"model": "gpt-5.5", "previous_response_id": response_id(first), "input": tool_output},
        )
        assert final_text(second) == "Tool output received: one"
        kept = (await mock.control.model_requests())[-1]
        assert kept["account"] == "acct-mock-1" and any(
            i["type"] == "reasoning" for i in kept["body"]["input"]
        )
        # another account: the reasoning of acct-mock-1 is left out, and the strict backend accepts
        await mock.control.add_fault("usage_limit", account="acct-mock-1", count=1)
        third = await ws_turn(
            ws,
            {
                "model": "gpt-5.5",
                "previous_response_id": response_id(second),
                "input": [user_message("again")],
            },
        )
        assert final_text(third) == "Hello from the trioproxy mock backend."
        moved = (await mock.control.model_requests())[-1]
        assert moved["account"] == "acct-mock-2" and moved["status"] == 200
        assert not any(i.get("type") == "reasoning" for i in moved["body"]["input"])
    # and the strict backend does reject foreign reasoning (so the stripping is what made it work)
    foreign = {**moved["body"], "input": [*kept["body"]["input"]]}
    foreign.pop("type", None)
    response = await mock.client.post(
        mock.responses_url, headers=mock.auth("acct-mock-2"), json=foreign
    )
    assert (
        response.status_code == 400
        and response.json()["error"]["code"] == "invalid_encrypted_content"
    )


async def test_w7_request_errors_pass_through_and_change_nothing(proxy: ProxyEnv) -> None:
    async with open_ws(proxy.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body())
        bad = {
            "model": "gpt-5.5",
            "previous_response_id": response_id(first),
            "input": [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}],
        }
        events = await ws_turn(ws, bad)
        assert events[-1]["type"] == "error" and events[-1]["status"] == 400
        assert "resp_" not in json.dumps(events[-1])
        again = await ws_turn(ws, request_body(previous_response_id=response_id(first)))
        assert final_text(again) == DEFAULT_ANSWER
    messages = await proxy.mock.control.model_requests(transport="ws")
    assert len({m["parent"] for m in messages}) == 1 and len({m["account"] for m in messages}) == 1


async def test_w8_connection_limit_on_an_anchored_turn_reconnects_and_reanchors(
    proxy: ProxyEnv,
) -> None:
    async with open_ws(proxy.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body())
        await proxy.mock.control.add_fault("connection_limit", count=1)
        events = await ws_turn(ws, request_body(previous_response_id=response_id(first)))
        assert final_text(events) == DEFAULT_ANSWER
    messages = await proxy.mock.control.model_requests(transport="ws")
    assert [m["status"] for m in messages] == [200, 400, 200]
    assert (
        messages[2]["parent"] != messages[1]["parent"]
        and messages[2]["account"] == messages[0]["account"]
    )
    assert "previous_response_id" not in messages[2]["body"]


async def test_upstream_socket_is_rotated_between_turns_before_its_age_limit(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, upstream_ws_max_age=0.3)
    async with open_ws(proxy.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body())
        await trio.sleep(0.4)
        second = await ws_turn(ws, request_body(previous_response_id=response_id(first)))
        assert final_text(second) == DEFAULT_ANSWER
    upgrades = await mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert len(upgrades) == 2 and upgrades[0]["account"] == upgrades[1]["account"]
    messages = await mock.control.model_requests(transport="ws")
    assert (
        messages[1]["parent"] == upgrades[1]["id"]
        and "previous_response_id" not in messages[1]["body"]
    )
    assert (await proxy.client.get(f"{proxy.root}/api/stats")).json()["counters"][
        "upstream_rotated"
    ] == 1
