"""WebSocket protocol details as current Codex clients speak them: ``response.processed``
notifications, upstream error events written as multi-line JSON, and upstream's 60-minute
connection limit, met on the WebSocket front and on the HTTP bridge (the two fronts that
keep an upstream socket) against the mock (docs/codex-protocol.md)."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from tests.conftest import ProxyEnv
from tests.helpers import (
    WS_BETA,
    final_text,
    open_ws,
    post_responses,
    request_body,
    response_id,
    ws_turn,
)
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER

BETA = {"openai-beta": WS_BETA}


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("type")) for e in events]


async def test_response_processed_is_relayed_on_the_socket_that_holds_the_response(
    proxy: ProxyEnv,
) -> None:
    async with open_ws(proxy.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("mock:say one"))
        anchor = response_id(first)
        await ws.send_message(json.dumps({"type": "response.processed", "response_id": anchor}))
        # nothing is answered to it: the next message the client gets is its next turn's
        second = await ws_turn(ws, request_body("mock:say two", previous_response_id=anchor))
        assert final_text(second) == "two" and "error" not in kinds(second)
    assert (await proxy.mock.control.stats())["processed_messages"] == 1
    upgrade = (await proxy.mock.control.requests(method="GET", frames=True))[0]
    inbound = [f["data"] for f in upgrade["frames"] if f["dir"] == "in"]
    assert {"type": "response.processed", "response_id": anchor} in inbound
    messages = await proxy.mock.control.model_requests(transport="ws")
    assert len({m["parent"] for m in messages}) == 1  # one upstream socket throughout


async def test_response_processed_for_a_response_the_socket_does_not_hold_is_dropped(
    proxy: ProxyEnv,
) -> None:
    async with open_ws(proxy.codex_url, BETA) as ws:
        processed = {"type": "response.processed", "response_id": "resp_elsewhere"}
        await ws.send_message(json.dumps(processed))
        events = await ws_turn(ws, request_body())
        assert final_text(events) == DEFAULT_ANSWER and "error" not in kinds(events)
    assert (await proxy.mock.control.stats())["processed_messages"] == 0


LIMITS = [
    ("connection_limit", {"status": 0}),
    ("connection_limit", {"status": 0, "pretty": 1}),
    ("connection_limit", {"status": 400, "pretty": 1}),
    # the limit announced inside a turn, after response.created but before any output
    ("stream_error", {"code": "websocket_connection_limit_reached", "after_events": 2}),
]


async def _bridge_turn(proxy: ProxyEnv, key: str, text: str, **extra: Any) -> list[dict[str, Any]]:
    response, events = await post_responses(
        proxy.client, proxy.codex_url, {"session-id": key}, request_body(text, **extra)
    )
    assert response.status_code == 200, response.text
    return events


@pytest.mark.parametrize("front", ["ws", "bridge"])
@pytest.mark.parametrize(("kind", "params"), LIMITS)
async def test_the_connection_limit_reanchors_on_a_fresh_socket_unnoticed(
    proxy: ProxyEnv, front: str, kind: str, params: dict[str, Any]
) -> None:
    mock = proxy.mock
    if front == "ws":
        async with open_ws(proxy.codex_url, BETA) as ws:
            first = await ws_turn(ws, request_body("mock:say one"))
            await mock.control.add_fault(kind, count=1, transport="ws", **params)
            second = await ws_turn(
                ws, request_body("mock:say two", previous_response_id=response_id(first))
            )
            third = await ws_turn(
                ws, request_body("mock:say three", previous_response_id=response_id(second))
            )
    else:
        key = f"conv-{secrets.token_hex(6)}"
        first = await _bridge_turn(proxy, key, "mock:say one")
        await mock.control.add_fault(kind, count=1, transport="ws", **params)
        second = await _bridge_turn(
            proxy, key, "mock:say two", previous_response_id=response_id(first)
        )
        third = await _bridge_turn(
            proxy, key, "mock:say three", previous_response_id=response_id(second)
        )
    # the client saw two ordinary turns after the first
    assert [final_text(e) for e in (first, second, third)] == ["one", "two", "three"]
    assert all("error" not in kinds(events) for events in (second, third))
    assert kinds(second).count("response.created") == 1
    messages = await mock.control.model_requests(transport="ws")
    assert [m["error_code"] for m in messages] == [
        None,
        "websocket_connection_limit_reached",
        None,
        None,
    ]
    # a fresh socket on the same account; the turn re-anchored (its whole input resent)
    assert messages[2]["parent"] != messages[1]["parent"] == messages[0]["parent"]
    assert messages[2]["account"] == messages[0]["account"]
    assert "previous_response_id" not in messages[2]["body"]
    assert len(messages[2]["body"]["input"]) > 1
    # and the next turn continues on the new socket with its anchor
    assert messages[3]["parent"] == messages[2]["parent"]
    assert messages[3]["body"]["previous_response_id"] == response_id(second)
