"""Failover is one behaviour: each scenario runs over every way a turn can reach upstream.

The fronts: a plain HTTP turn (``POST /backend-api/codex/responses``), a WebSocket session
(a new socket per turn, so the upstream connect before the handshake is answered is tested
too), an HTTP turn through the bridge (a ``session-id`` of its own per turn, so each
starts a bridge session), and the other client APIs: a Chat Completions request
(``POST /v1/chat/completions``) and an Anthropic Messages one (``POST /v1/messages``), each
the same turn translated. Everything goes through loopback sockets against the mock; the
WebSocket client is the proxy's own upstream client (it reports a refused handshake with its
status and body, and closes its socket on every path).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import attrs
import pytest
import trio

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import TERMINAL, WS_BETA, final_text, post_responses, request_body
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.upstream.ws import UpstreamRejected, open_upstream_websocket

#: the Responses API's own fronts (tests that read its events use these)
RESPONSES_FRONTS = ["http", "ws", "bridge"]
FRONTS = [*RESPONSES_FRONTS, "chat", "messages"]
#: the fronts whose errors keep the proxy's envelope (Anthropic clients get their own shape)
ENVELOPE_FRONTS = ["http", "ws", "bridge", "chat"]


@attrs.frozen
class Answer:
    status: int
    events: list[dict[str, Any]]
    error: dict[str, Any] | None  # the error envelope's "error" object


async def turn(proxy: ProxyEnv, front: str, body: dict[str, Any] | None = None) -> Answer:
    """One turn over ``front``: the status the client saw, its events, its error."""
    body = body or request_body()
    if front == "ws":
        return await _ws_turn(proxy, body)
    if front in ("chat", "messages"):
        return await _translated_turn(proxy, front, body)
    headers = {"session-id": f"conv-{secrets.token_hex(6)}"} if front == "bridge" else {}
    response, events = await post_responses(proxy.client, proxy.codex_url, headers, body)
    error = response.json()["error"] if response.status_code != 200 and not events else None
    return Answer(response.status_code, events, error)


async def _translated_turn(proxy: ProxyEnv, front: str, body: dict[str, Any]) -> Answer:
    """The turn as a (non-streamed) Chat Completions or Messages request; its answer's text
    as the output item a Responses client would have seen."""
    text = "".join(p["text"] for item in body["input"] for p in item["content"])
    messages = [{"role": "user", "content": text}]
    if front == "chat":
        url, request = "/v1/chat/completions", {"model": body["model"], "messages": messages}
    else:
        url = "/v1/messages"
        request = {"model": body["model"], "max_tokens": 1024, "messages": messages}
    response = await proxy.client.post(proxy.root + url, json=request)
    value = response.json()
    if response.status_code != 200:
        return Answer(response.status_code, [], value["error"])
    if front == "chat":
        answer = value["choices"][0]["message"]["content"]
    else:
        answer = "".join(b["text"] for b in value["content"] if b["type"] == "text")
    item = {"type": "message", "content": [{"type": "output_text", "text": answer}]}
    return Answer(200, [{"type": "response.output_item.done", "item": item}], None)


async def _ws_turn(proxy: ProxyEnv, body: dict[str, Any]) -> Answer:
    headers = [("openai-beta", WS_BETA)]
    if proxy.api_key:
        headers.append(("authorization", f"Bearer {proxy.api_key}"))
    url = proxy.codex_url.replace("http://", "ws://", 1)
    try:
        async with open_upstream_websocket(url, headers) as ws:
            await ws.send_text(json.dumps({"type": "response.create", **body}))
            events: list[dict[str, Any]] = []
            while not events or events[-1].get("type") not in TERMINAL:
                message = await ws.receive()
                assert isinstance(message, str)
                events.append(json.loads(message))
    except UpstreamRejected as rejected:
        return Answer(rejected.status, [], json.loads(rejected.body)["error"])
    last = events[-1]
    if last["type"] == "error":
        return Answer(int(last.get("status", 400)), events, last["error"])
    return Answer(200, events, None)


async def accounts(proxy: ProxyEnv) -> dict[str, dict[str, Any]]:
    response = await proxy.client.get(proxy.root + "/api/accounts")
    return {a["account_id"]: a for a in response.json()["accounts"]}


@pytest.mark.parametrize("front", FRONTS)
async def test_a_usage_limit_before_the_first_event_moves_the_turn_and_the_pool_learns(
    mock: MockEnv, make_proxy: ProxyFactory, front: str
) -> None:
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=3600)
    answer = await turn(proxy, front)
    assert answer.status == 200 and final_text(answer.events) == DEFAULT_ANSWER
    records = [(r["account"], r["status"]) for r in await mock.control.model_requests()]
    # (a WebSocket session may learn the limit from its handshake's rate-limit headers and
    # never send the turn to the limited account)
    assert records in ([("acct-mock-1", 429), ("acct-mock-2", 200)], [("acct-mock-2", 200)])
    assert records == [("acct-mock-1", 429), ("acct-mock-2", 200)] or front == "ws"
    assert (await accounts(proxy))["acct-mock-1"]["state"] == "exhausted"
    # the pool learned: the limited account is not tried again before its reset
    await mock.control.clear_requests()
    assert (await turn(proxy, front)).status == 200
    assert [r["account"] for r in await mock.control.model_requests()] == ["acct-mock-2"]


@pytest.mark.parametrize("front", FRONTS)
async def test_server_errors_and_overload_before_the_first_event_fail_over(
    proxy: ProxyEnv, front: str
) -> None:
    await proxy.mock.control.add_fault("server_error", count=1)
    await proxy.mock.control.add_fault("overloaded", count=1)
    answer = await turn(proxy, front)
    assert answer.status == 200 and final_text(answer.events) == DEFAULT_ANSWER
    statuses = [r["status"] for r in await proxy.mock.control.model_requests()]
    assert statuses == [500, 503, 200]


@pytest.mark.parametrize("front", ENVELOPE_FRONTS)
async def test_a_limited_pool_answers_the_usage_limit_with_the_earliest_reset(
    proxy: ProxyEnv, front: str
) -> None:
    resets = {"acct-mock-1": 7200, "acct-mock-2": 600, "acct-mock-3": 3600}
    for account, seconds in resets.items():
        await proxy.mock.control.patch_account(account, exhaust="primary", resets_in=seconds)
    earliest = int(proxy.mock.backend.accounts["acct-mock-2"].primary.reset_at)
    tried = []
    for _ in range(2):  # learning it from upstream, then knowing it
        answer = await turn(proxy, front)
        assert answer.status == 429 and answer.error is not None
        assert answer.error["type"] == "usage_limit_reached"
        assert abs(answer.error["resets_at"] - earliest) <= 2
        tried.append(len(await proxy.mock.control.model_requests()))
    assert 1 <= tried[0] <= 3
    assert tried[1] == tried[0]  # the second time, nothing reached upstream


@pytest.mark.parametrize("front", FRONTS)
async def test_one_refresh_serves_every_turn_that_met_the_same_401(
    make_mock: MockFactory, make_proxy: ProxyFactory, front: str
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True)
    await mock.control.add_fault("stall", on="token", seconds=0.3, count=1)
    answers: list[Answer] = []

    async def one() -> None:
        answers.append(await turn(proxy, front))

    async with trio.open_nursery() as group:
        for _ in range(40):
            group.start_soon(one)
    assert [a.status for a in answers] == [200] * 40
    assert all(final_text(a.events) == DEFAULT_ANSWER for a in answers)
    assert (await mock.control.stats())["refreshes"] == 1
    assert len(await mock.control.requests(path="/oauth/token")) == 1


@pytest.mark.parametrize("front", FRONTS)
async def test_a_permanent_refresh_failure_takes_the_account_out(
    mock: MockEnv, make_proxy: ProxyFactory, front: str
) -> None:
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True, refresh_mode="invalidated")
    for _ in range(3):
        answer = await turn(proxy, front)
        assert answer.status == 200 and final_text(answer.events) == DEFAULT_ANSWER
    assert (await accounts(proxy))["acct-mock-1"]["state"] == "reauth_required"
    assert len(await mock.control.requests(path="/oauth/token")) == 1


@pytest.mark.parametrize("front", FRONTS)
async def test_a_transient_refresh_failure_cools_down_and_the_turn_fails_over(
    make_mock: MockFactory, make_proxy: ProxyFactory, front: str
) -> None:
    # tokens within the refresh margin: every account is refreshed before use, and the auth
    # server fails for the first account only
    mock = await make_mock(MockConfig(accounts=2, token_ttl=30))
    proxy = await make_proxy(mock, routing_strategy="fill_first", refresh_cooldown=600)
    await mock.control.add_fault("server_error", on="token", account="acct-mock-1", status=502)
    for _ in range(4):
        answer = await turn(proxy, front)
        assert answer.status == 200 and final_text(answer.events) == DEFAULT_ANSWER
    tries = [r["account"] for r in await mock.control.requests(path="/oauth/token")]
    assert tries.count("acct-mock-1") == 1  # one try, then the cooldown holds
    served = {r["account"] for r in await mock.control.model_requests()}
    assert served == {"acct-mock-2"}
    assert (await accounts(proxy))["acct-mock-1"]["state"] == "active"  # transient: kept


@pytest.mark.parametrize("front", FRONTS)
async def test_an_expiring_token_is_refreshed_before_use(
    make_mock: MockFactory, make_proxy: ProxyFactory, front: str
) -> None:
    mock = await make_mock(MockConfig(accounts=1, token_ttl=30))
    proxy = await make_proxy(mock)
    answer = await turn(proxy, front)
    assert answer.status == 200 and final_text(answer.events) == DEFAULT_ANSWER
    refreshes = await mock.control.requests(path="/oauth/token")
    assert len(refreshes) == 1 and refreshes[0]["body"]["refresh_reason"] == "proactive_expiry"
    fresh = mock.backend.accounts["acct-mock-1"].current_access_token(mock.backend.clock.now())
    sent = await mock.control.requests(path="/backend-api/codex/responses")
    opening = next(r for r in sent if r["method"] in ("POST", "GET"))  # the POST, or the upgrade
    assert dict(opening["headers"])["authorization"] == f"Bearer {fresh}"
