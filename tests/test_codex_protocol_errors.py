"""Upstream errors inside a 200 stream: before any output they are failover points like an
HTTP error answer; after output has started they reach the client as they came. Each case
runs over the three fronts (plain HTTP, WebSocket, bridge) against the mock's
``stream_error`` fault (docs/codex-protocol.md)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MockEnv, ProxyEnv, ProxyFactory
from tests.helpers import final_text
from tests.test_failover_fronts import RESPONSES_FRONTS, accounts, turn
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("type")) for e in events]


@pytest.mark.parametrize("front", RESPONSES_FRONTS)
@pytest.mark.parametrize(
    "fault",
    [
        {"event": "error", "code": "server_is_overloaded"},  # no status at all
        {"event": "error", "code": "server_is_overloaded", "pretty": 1},  # multi-line JSON
        {"event": "error", "code": "slow_down", "status": 503},
        {"event": "response.failed", "code": "server_is_overloaded"},
        {"event": "response.failed", "code": "server_error"},
    ],
    ids=["error-no-status", "error-multi-line", "error-503", "failed-overloaded", "failed-500"],
)
async def test_an_error_event_before_output_fails_over_like_an_http_error(
    proxy: ProxyEnv, front: str, fault: dict[str, Any]
) -> None:
    await proxy.mock.control.add_fault("stream_error", count=1, **fault)
    answer = await turn(proxy, front)
    assert answer.status == 200 and final_text(answer.events) == DEFAULT_ANSWER
    # the client sees one clean turn: nothing of the failed attempt
    assert kinds(answer.events).count("response.created") == 1
    assert "error" not in kinds(answer.events) and "response.failed" not in kinds(answer.events)
    records = await proxy.mock.control.model_requests()
    assert [r["error_code"] for r in records] == [fault["code"], None]
    # (a failover: the account is fine, the next attempt went elsewhere)
    assert records[0]["account"] != records[1]["account"]


@pytest.mark.parametrize("front", RESPONSES_FRONTS)
async def test_a_usage_limit_event_without_status_moves_the_turn_and_the_pool_learns(
    mock: MockEnv, make_proxy: ProxyFactory, front: str
) -> None:
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    await mock.control.add_fault(
        "stream_error", count=1, account="acct-mock-1", code="usage_limit_reached"
    )
    answer = await turn(proxy, front)
    assert answer.status == 200 and final_text(answer.events) == DEFAULT_ANSWER
    records = await mock.control.model_requests()
    assert [(r["account"], r["error_code"]) for r in records] == [
        ("acct-mock-1", "usage_limit_reached"),
        ("acct-mock-2", None),
    ]
    assert (await accounts(proxy))["acct-mock-1"]["state"] == "exhausted"


@pytest.mark.parametrize("front", RESPONSES_FRONTS)
@pytest.mark.parametrize("pretty", [0, 1])
async def test_an_error_event_after_output_started_is_relayed_as_it_came(
    proxy: ProxyEnv, front: str, pretty: int
) -> None:
    await proxy.mock.control.add_fault(
        "stream_error", count=1, code="server_is_overloaded", after_events=4, pretty=pretty
    )
    answer = await turn(proxy, front)
    # output had reached the client: no failover, the error ends the stream as upstream sent it
    assert "response.output_item.added" in kinds(answer.events)
    last = answer.events[-1]
    assert last["type"] == "error" and last["error"]["code"] == "server_is_overloaded"
    assert len(await proxy.mock.control.model_requests()) == 1


@pytest.mark.parametrize("front", RESPONSES_FRONTS)
async def test_an_error_the_proxy_cannot_act_on_is_relayed_as_it_came(
    proxy: ProxyEnv, front: str
) -> None:
    await proxy.mock.control.add_fault(
        "stream_error", count=1, event="response.failed", code="context_length_exceeded"
    )
    answer = await turn(proxy, front)
    assert kinds(answer.events)[-3:] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]
    assert answer.events[-1]["response"]["error"]["code"] == "context_length_exceeded"
    assert len(await proxy.mock.control.model_requests()) == 1


@pytest.mark.parametrize("front", RESPONSES_FRONTS)
async def test_the_preamble_is_held_at_most_half_the_keepalive_interval(
    mock: MockEnv, make_proxy: ProxyFactory, front: str
) -> None:
    # upstream is slow between events: its output (here an error in its place) comes later
    # than the hold (0.5 s), so the turn is committed with the preamble and the error is
    # relayed as it came, not failed over (and an SSE client never got a keep-alive)
    proxy = await make_proxy(mock, keepalive_interval=1.0)
    await mock.control.configure(event_delay=0.7)
    await mock.control.add_fault("stream_error", count=1, code="server_is_overloaded")
    answer = await turn(proxy, front)
    assert kinds(answer.events)[-3:] == ["response.created", "response.in_progress", "error"]
    assert "keepalive" not in kinds(answer.events)
    assert len(await mock.control.model_requests()) == 1
