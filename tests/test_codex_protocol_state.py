"""Echoed per-account state (``x-codex-turn-state``): the client gets it marked with the
account that issued it, and the proxy forwards its echo (upstream's value) only to that
account and routes it back there, over every front (plain HTTP, WebSocket, bridge). The
mock runs with ``strict_turn_state``: an account that gets another account's turn state
refuses the request, as a backend that routes by it would misroute it
(docs/codex-protocol.md)."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from tests.conftest import MockEnv, ProxyEnv, ProxyFactory
from tests.helpers import TERMINAL, WS_BETA, final_text, post_responses, request_body
from tests.test_failover_fronts import RESPONSES_FRONTS
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.upstream.ws import open_upstream_websocket

TURN_STATE = "x-codex-turn-state"


def upstream_value(seen: str) -> str:
    """Upstream's turn state in the value a client got (``tp1.<account tag>.<value>``)."""
    mark, tag, value = seen.split(".", 2)
    assert mark == "tp1" and len(tag) == 12
    return value


async def turn(proxy: ProxyEnv, front: str, state: str | None) -> tuple[int, str | None, str]:
    """One turn over ``front`` echoing ``state``: the status, the turn state the client got
    (response head or 101), and the answer's text."""
    echo = {TURN_STATE: state} if state else {}
    if front == "ws":
        headers = [("openai-beta", WS_BETA), *echo.items()]
        url = proxy.codex_url.replace("http://", "ws://", 1)
        async with open_upstream_websocket(url, headers) as ws:
            got = dict(ws.handshake_headers).get(TURN_STATE)
            await ws.send_text(json.dumps({"type": "response.create", **request_body()}))
            events: list[dict[str, Any]] = []
            while not events or events[-1].get("type") not in TERMINAL:
                message = await ws.receive()
                assert isinstance(message, str)
                events.append(json.loads(message))
        status = 200 if events[-1]["type"] == "response.completed" else 400
        return status, got, final_text(events)
    if front == "bridge":
        echo["session-id"] = f"conv-{secrets.token_hex(6)}"
    response, events = await post_responses(proxy.client, proxy.codex_url, echo, request_body())
    return response.status_code, response.headers.get(TURN_STATE), final_text(events)


async def upstream_openings(mock: MockEnv) -> list[tuple[str, str | None]]:
    """Each POST or WebSocket upgrade that reached the mock: its account and the turn state
    it carried."""
    records = await mock.control.requests(path="/backend-api/codex/responses")
    return [
        (r["account"], {k.lower(): v for k, v in r["headers"]}.get(TURN_STATE))
        for r in records
        if r["method"] in ("POST", "GET")
    ]


@pytest.mark.parametrize("front", RESPONSES_FRONTS)
async def test_turn_state_goes_only_to_the_account_that_issued_it(
    mock: MockEnv, make_proxy: ProxyFactory, front: str
) -> None:
    await mock.control.configure(strict_turn_state=True)
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    status, issued, _ = await turn(proxy, front, None)
    assert status == 200 and issued is not None
    assert upstream_value(issued).startswith("ts_acct-mock-1_")

    # the conversation stays on its account: the echo is forwarded, and given back
    await mock.control.clear_requests()
    status, again, text = await turn(proxy, front, issued)
    assert (status, text) == (200, DEFAULT_ANSWER)
    assert (await upstream_openings(mock))[0] == ("acct-mock-1", upstream_value(issued))
    if front != "ws":  # (a WebSocket client's 101 comes from the connect made before)
        assert again == issued

    # the turn fails over to another account: that account never gets the first's state
    await mock.control.clear_requests()
    await mock.control.add_fault("usage_limit", count=1, account="acct-mock-1")
    status, moved, text = await turn(proxy, front, issued)
    assert (status, text) == (200, DEFAULT_ANSWER)
    openings = await upstream_openings(mock)
    assert ("acct-mock-2", None) in openings
    assert all(state in (None, upstream_value(issued)) for _, state in openings)
    assert all(state is None for account, state in openings if account != "acct-mock-1")
    if front != "ws":
        assert moved is not None and upstream_value(moved).startswith("ts_acct-mock-2_")
    assert (await mock.control.stats())["foreign_turn_states"] == 0


@pytest.mark.parametrize("front", RESPONSES_FRONTS)
@pytest.mark.parametrize("echo", ["ts_from_elsewhere", "tp1.000000000000.ts_acct-mock-1_0"])
async def test_a_turn_state_not_marked_for_an_account_of_the_pool_is_not_forwarded(
    mock: MockEnv, make_proxy: ProxyFactory, front: str, echo: str
) -> None:
    await mock.control.configure(strict_turn_state=True)
    proxy = await make_proxy(mock)
    status, _, text = await turn(proxy, front, echo)
    assert (status, text) == (200, DEFAULT_ANSWER)
    assert all(state is None for _, state in await upstream_openings(mock))
    assert (await mock.control.stats())["foreign_turn_states"] == 0


@pytest.mark.parametrize("front", RESPONSES_FRONTS)
async def test_an_echoed_turn_state_routes_the_request_back_to_its_account(
    mock: MockEnv, make_proxy: ProxyFactory, front: str
) -> None:
    await mock.control.configure(strict_turn_state=True)
    proxy = await make_proxy(mock)  # headroom routing: the account just used has the least
    status, issued, _ = await turn(proxy, front, None)
    assert status == 200 and issued is not None
    issuer = upstream_value(issued).split("_")[1]
    for _ in range(3):
        await mock.control.clear_requests()
        status, _, text = await turn(proxy, front, issued)
        assert (status, text) == (200, DEFAULT_ANSWER)
        assert (await upstream_openings(mock))[0] == (issuer, upstream_value(issued))
