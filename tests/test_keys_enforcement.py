"""A key's policy, budgets, caps and account group, enforced by a live proxy on loopback in
front of the mock backend, over the HTTP, WebSocket and bridge fronts; and every turn's
usage charged exactly to its key, account and model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from tests.conftest import MockEnv, ProxyEnv, start_proxy
from tests.helpers import (
    open_ws,
    parse_sse,
    rejected_upgrade,
    request_body,
    wait_until,
    ws_turn,
)
from trioproxy.store import Store

RESPONSES = "/backend-api/codex/responses"
FLUSH = 0.1


def open_store(env: ProxyEnv) -> Store:
    settings = env.settings
    return Store.open(
        settings.resolved_database_url, data_dir=settings.data_dir, secret_key=settings.secret_key
    )


async def add_key(env: ProxyEnv, name: str, policy: dict[str, Any] | None = None) -> str:
    """A new key in the proxy's store, once the running proxy has picked it up."""
    with open_store(env) as store:
        _, secret = store.create_api_key(name, policy=policy)
    with trio.fail_after(10):
        while True:
            answer = await env.client.get(f"{env.root}/v1/models", headers=auth(secret))
            if answer.status_code == 200:
                return secret
            await trio.sleep(0.05)


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def upstream_turns(mock: MockEnv) -> int:
    """Turns upstream saw: HTTP POSTs and WebSocket messages (not handshakes)."""
    records = mock.backend.recorder.query(path=RESPONSES)
    return sum(1 for r in records if r.method in ("POST", "WS"))


async def settled_usage(env: ProxyEnv, key_id: str, requests: int) -> list[dict[str, Any]]:
    """The key's hourly usage rows once ``requests`` requests are written."""
    with trio.fail_after(10):
        while True:
            with open_store(env) as store:
                rows = store.usage_report(
                    since=None, until=None, key_id=key_id, account_id=None, model=None,
                    group_by=("key", "account", "model"), bucket="total",
                )  # fmt: skip
            if sum(r["requests"] for r in rows) >= requests:
                return rows
            await trio.sleep(0.05)


@pytest.fixture
async def keyed(nursery: trio.Nursery, mock: MockEnv, tmp_path: Path) -> AsyncIterator[ProxyEnv]:
    env = await start_proxy(nursery, mock, tmp_path, api_key=True, usage_flush_interval=FLUSH)
    yield env
    await env.client.aclose()


def key_id_of(secret: str) -> str:
    return secret.split("_")[1]


async def test_model_and_effort_outside_the_policy_are_refused_before_upstream(
    keyed: ProxyEnv, mock: MockEnv
) -> None:
    secret = await add_key(
        keyed, "narrow", {"models": ["gpt-5.4*", "re:^o[0-9]$"], "max_reasoning_effort": "low"}
    )
    before = upstream_turns(mock)
    for url in (keyed.codex_url, keyed.v1_url):
        answer = await keyed.client.post(url, json=request_body(), headers=auth(secret))
        assert answer.status_code == 403, answer.text
        error = answer.json()["error"]
        assert error["code"] == "model_not_allowed" and error["param"] == "model"
        assert error["allowed"] == ["gpt-5.4*", "re:^o[0-9]$"]
        answer = await keyed.client.post(
            url,
            json=request_body(model="gpt-5.4-mini", reasoning={"effort": "high"}),
            headers=auth(secret),
        )
        assert answer.status_code == 403
        error = answer.json()["error"]
        assert error["code"] == "reasoning_effort_not_allowed"
        assert error["allowed"] == ["none", "minimal", "low"]
    async with open_ws(keyed.codex_url, auth(secret)) as ws:
        (event,) = await ws_turn(ws, request_body())
        assert event["type"] == "error" and event["status"] == 403
        assert event["error"]["code"] == "model_not_allowed"
        # the session goes on: an allowed turn completes
        events = await ws_turn(ws, request_body(model="o3", reasoning={"effort": "low"}))
        assert events[-1]["type"] == "response.completed"
    assert upstream_turns(mock) == before + 1  # only the allowed turn went upstream
    answer = await keyed.client.post(
        keyed.codex_url, json=request_body(model="gpt-5.4"), headers=auth(secret)
    )
    assert answer.status_code == 200


async def test_a_spent_budget_refuses_http_and_websocket_until_the_window_frees(
    keyed: ProxyEnv,
) -> None:
    secret = await add_key(keyed, "two-a-day", {"budgets": [{"window": "daily", "requests": 2}]})
    for _ in range(2):
        answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
        assert answer.status_code == 200
    answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    assert answer.status_code == 429
    error = answer.json()["error"]
    assert error["code"] == "key_budget_exceeded" and error["type"] == "usage_limit_reached"
    assert error["budget"] == "daily/calendar" and error["limit"] == "requests"
    retry_after = int(answer.headers["retry-after"])
    assert 0 < retry_after <= 86400 and error["resets_in_seconds"] == retry_after
    # a new WebSocket session of the spent key is refused at the handshake
    refused = await rejected_upgrade(keyed.client, keyed.codex_url, auth(secret))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "key_budget_exceeded"
    # another key is not affected
    other = await add_key(keyed, "other")
    answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(other))
    assert answer.status_code == 200


async def test_a_budget_spent_inside_a_websocket_session_refuses_its_next_turn(
    keyed: ProxyEnv,
) -> None:
    secret = await add_key(keyed, "ws", {"budgets": [{"window": "5h", "requests": 2}]})
    async with open_ws(keyed.codex_url, auth(secret)) as ws:
        for _ in range(2):
            events = await ws_turn(ws, request_body())
            assert events[-1]["type"] == "response.completed"
        (event,) = await ws_turn(ws, request_body())
        assert event["type"] == "error" and event["status"] == 429
        assert event["error"]["type"] == "usage_limit_reached"
        assert event["error"]["code"] == "key_budget_exceeded"
        assert event["error"]["budget"] == "5h/rolling"
        assert 0 < event["error"]["resets_in_seconds"] <= 5 * 3600
        assert int(event["headers"]["retry-after"]) == event["error"]["resets_in_seconds"]


async def test_a_running_turn_finishes_past_the_budget_and_the_next_is_refused(
    keyed: ProxyEnv,
) -> None:
    secret = await add_key(keyed, "tiny", {"budgets": [{"window": "daily", "tokens": 1}]})
    answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    assert answer.status_code == 200
    assert parse_sse(answer.text)[-1]["type"] == "response.completed"
    answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    assert answer.status_code == 429 and answer.json()["error"]["limit"] == "tokens"


async def test_every_turn_is_charged_to_its_key_account_and_model(
    keyed: ProxyEnv, mock: MockEnv
) -> None:
    secret = await add_key(keyed, "metered")
    expected = {"input_tokens": 0, "output_tokens": 0, "cached_tokens": 0, "reasoning": 0}

    def count(usage: dict[str, Any]) -> None:
        expected["input_tokens"] += usage["input_tokens"]
        expected["output_tokens"] += usage["output_tokens"]
        expected["cached_tokens"] += usage["input_tokens_details"]["cached_tokens"]
        expected["reasoning"] += usage["output_tokens_details"]["reasoning_tokens"]

    # HTTP (codex route), HTTP bridge (a conversation key), /v1 unary, WebSocket: 2 each
    for headers in ({}, {"session-id": "metered-conversation"}):
        for _ in range(2):
            answer = await keyed.client.post(
                keyed.codex_url, json=request_body(), headers={**auth(secret), **headers}
            )
            count(parse_sse(answer.text)[-1]["response"]["usage"])
    for _ in range(2):
        answer = await keyed.client.post(
            keyed.v1_url, json=request_body(stream=False), headers=auth(secret)
        )
        count(answer.json()["usage"])
    async with open_ws(keyed.codex_url, auth(secret)) as ws:
        for _ in range(2):
            count((await ws_turn(ws, request_body()))[-1]["response"]["usage"])
    rows = await settled_usage(keyed, key_id_of(secret), 8)
    assert sum(r["requests"] for r in rows) == 8
    assert sum(r["errors"] for r in rows) == 0
    assert sum(r["input_tokens"] for r in rows) == expected["input_tokens"] > 0
    assert sum(r["output_tokens"] for r in rows) == expected["output_tokens"] > 0
    assert sum(r["cached_tokens"] for r in rows) == expected["cached_tokens"]
    assert sum(r["reasoning_tokens"] for r in rows) == expected["reasoning"]
    assert {r["model"] for r in rows} == {"gpt-5.5"}
    assert {r["account_id"] for r in rows} <= set(mock.account_ids())
    # priced from the table: gpt-5.5 at 5 / 0.5 / 30 US dollars per million tokens
    fresh = expected["input_tokens"] - expected["cached_tokens"]
    cost = (fresh * 5.0 + expected["cached_tokens"] * 0.5 + expected["output_tokens"] * 30.0) / 1e6
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(cost, rel=1e-6)
    # the request log names the key and carries the same figures
    with open_store(keyed) as store:
        logged = [r for r in store.recent_requests(50) if r["key_id"] == key_id_of(secret)]
    assert len(logged) == 8
    assert sum(r["input_tokens"] for r in logged) == expected["input_tokens"]


async def test_the_concurrency_cap_of_a_key_is_held_for_the_turn(
    keyed: ProxyEnv, mock: MockEnv
) -> None:
    secret = await add_key(keyed, "one-at-a-time", {"max_requests": 1, "max_sessions": 1})
    await mock.control.add_fault("stall", seconds=30)
    async with trio.open_nursery() as nursery:
        first: list[httpx.Response] = []

        async def slow() -> None:
            first.append(
                await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
            )

        nursery.start_soon(slow)
        await wait_until(lambda: bool(mock.backend.recorder.query(path=RESPONSES)))
        second = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "key_concurrency_exceeded"
        assert second.headers["x-trioproxy-overload"] == f"key:{key_id_of(secret)}:requests"
        await mock.control.clear_faults()  # the stalled turn goes on
    assert first[0].status_code == 200
    # the slot was given back when the request ended
    answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    assert answer.status_code == 200
    # sessions: a second WebSocket of the key is refused while the first is open
    async with open_ws(keyed.codex_url, auth(secret)) as ws:
        refused = await rejected_upgrade(keyed.client, keyed.codex_url, auth(secret))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "key_concurrency_exceeded"
        events = await ws_turn(ws, request_body())
        assert events[-1]["type"] == "response.completed"
    with trio.fail_after(5):
        while True:  # the session's slot is free once the proxy saw it leave
            try:
                async with open_ws(keyed.codex_url, auth(secret)) as ws:
                    events = await ws_turn(ws, request_body())
                    break
            except trio_websocket.HandshakeError:
                await trio.sleep(0.02)
    assert events[-1]["type"] == "response.completed"


async def test_a_key_with_an_account_group_uses_only_those_accounts(
    keyed: ProxyEnv, mock: MockEnv
) -> None:
    secret = await add_key(keyed, "group", {"accounts": ["acct-mock-2"]})
    since = max((r.id for r in mock.backend.recorder.records), default=0)
    for index in range(4):
        headers = {**auth(secret), "session-id": f"group-{index}"} if index % 2 else auth(secret)
        answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=headers)
        assert answer.status_code == 200
    async with open_ws(keyed.codex_url, auth(secret)) as ws:
        await ws_turn(ws, request_body())
    used = {r.account for r in mock.backend.recorder.query(since=since) if r.account}
    assert used == {"acct-mock-2"}
    # its only account spent: the key is refused, never failed over to another account
    await mock.control.add_fault("usage_limit", account="acct-mock-2")
    since = max(r.id for r in mock.backend.recorder.records)
    answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "usage_limit_reached"  # its accounts are spent
    assert int(answer.headers["retry-after"]) > 0
    used = {r.account for r in mock.backend.recorder.query(since=since) if r.account}
    assert used == {"acct-mock-2"}
    # a key without a group still reaches the others
    answer = await keyed.client.post(keyed.codex_url, json=request_body())
    assert answer.status_code == 200


async def test_the_codex_usage_endpoint_shows_a_budgeted_key_its_own_budget(
    keyed: ProxyEnv,
) -> None:
    secret = await add_key(
        keyed,
        "status",
        {
            "budgets": [
                {"window": "5h", "requests": 4},
                {"window": "weekly", "reset": "rolling", "requests": 100},
            ]
        },
    )
    for _ in range(3):
        await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    view = (
        await keyed.client.get(f"{keyed.root}/backend-api/wham/usage", headers=auth(secret))
    ).json()
    primary, secondary = (
        view["rate_limit"]["primary_window"],
        view["rate_limit"]["secondary_window"],
    )
    assert primary["limit_window_seconds"] == 5 * 3600 and primary["used_percent"] == 75
    assert secondary["limit_window_seconds"] == 7 * 86400 and secondary["used_percent"] == 3
    assert view["rate_limit"]["allowed"] is True
    await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    view = (await keyed.client.get(f"{keyed.root}/api/codex/usage", headers=auth(secret))).json()
    assert view["rate_limit"]["limit_reached"] is True
    assert view["rate_limit"]["primary_window"]["used_percent"] == 100
    # the tests' own key has no budget: it sees the pool
    pool = (await keyed.client.get(f"{keyed.root}/backend-api/wham/usage")).json()
    assert pool["rate_limit"]["allowed"] is True
    assert pool["rate_limit"]["primary_window"]["used_percent"] < 100


async def test_unknown_revoked_expired_and_disabled_keys_get_their_own_errors(
    keyed: ProxyEnv,
) -> None:
    secret = await add_key(keyed, "lifecycle")
    key_id = key_id_of(secret)
    answer = await keyed.client.post(
        keyed.codex_url, json=request_body(), headers=auth(secret[:-2] + "zz")
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (401, "invalid_api_key")

    async def refused_with(status: int, code: str) -> tuple[int, str]:
        """What the key gets once the proxy has picked up the change (or after 10 s)."""
        seen: tuple[int, str] = (0, "")
        with trio.move_on_after(10):
            while seen != (status, code):
                answer = await keyed.client.post(
                    keyed.codex_url, json=request_body(), headers=auth(secret)
                )
                error = answer.json()["error"] if answer.status_code != 200 else {}
                seen = (answer.status_code, error.get("code", ""))
                await trio.sleep(0.05)
        return seen

    with open_store(keyed) as store:
        store.update_api_key(key_id, disabled=True)
    assert await refused_with(403, "api_key_disabled") == (403, "api_key_disabled")
    with open_store(keyed) as store:
        store.update_api_key(key_id, disabled=False, expires_at=1.0)
    assert await refused_with(401, "api_key_expired") == (401, "api_key_expired")
    with open_store(keyed) as store:
        store.revoke_api_key(key_id)
    assert await refused_with(401, "api_key_revoked") == (401, "api_key_revoked")


async def test_a_key_with_a_policy_cannot_use_the_management_api(keyed: ProxyEnv) -> None:
    limited = await add_key(keyed, "limited", {"budgets": [{"window": "daily", "requests": 5}]})
    for method, path in (
        ("GET", "/api/keys"),
        ("POST", "/api/keys"),
        ("GET", "/api/usage"),
        ("GET", "/api/accounts"),
        ("GET", "/api/requests"),
        ("GET", "/metrics"),
    ):
        answer = await keyed.client.request(
            method, f"{keyed.root}{path}", headers=auth(limited), json={"name": "escape"}
        )
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["error"]["code"] == "operator_key_required"
    with open_store(keyed) as store:
        assert [k.name for k in store.list_api_keys()] == ["tests", "limited"]
    # what a client reads stays open to it
    assert (
        await keyed.client.get(f"{keyed.root}/api/codex/usage", headers=auth(limited))
    ).status_code == 200
    assert (
        await keyed.client.get(f"{keyed.root}/v1/models", headers=auth(limited))
    ).status_code == 200
    # the key without a policy manages keys
    assert (await keyed.client.get(f"{keyed.root}/api/keys")).status_code == 200


async def test_a_budgeted_key_reads_its_budget_where_the_codex_cli_reads_rate_limits(
    keyed: ProxyEnv,
) -> None:
    secret = await add_key(keyed, "shown", {"budgets": [{"window": "5h", "requests": 4}]})
    first = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    # the head is written before the turn is charged: nothing used yet
    assert first.headers["x-codex-primary-used-percent"] == "0.0"
    assert first.headers["x-codex-primary-window-minutes"] == "300"
    assert "x-codex-secondary-used-percent" not in first.headers  # the account's is gone
    second = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    assert second.headers["x-codex-primary-used-percent"] == "25.0"
    async with open_ws(keyed.codex_url, auth(secret)) as ws:
        events = await ws_turn(ws, request_body())
    (limits,) = [e for e in events if e["type"] == "codex.rate_limits"]
    assert limits["rate_limits"]["primary"]["used_percent"] == 50.0
    assert limits["rate_limits"]["primary"]["window_minutes"] == 300
    assert limits["rate_limits"]["secondary"] is None
    await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    refused = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(secret))
    assert refused.status_code == 429
    assert refused.headers["x-codex-primary-used-percent"] == "100.0"
    # a key without budgets reads the serving account's windows, as upstream sent them
    plain = await keyed.client.post(keyed.codex_url, json=request_body())
    assert "x-codex-secondary-used-percent" in plain.headers
