"""The pool usage endpoints (upstream ``/wham/usage`` shape) and routing around exhausted
accounts, over loopback against the mock backend."""

from __future__ import annotations

import functools
from pathlib import Path

import httpx
import trio

from tests.conftest import MockFactory, ProxyFactory
from tests.helpers import final_text, post_responses, request_body
from tests.quota_support import accounts, eventually
from tests.test_proxy_lifecycle import direct_settings, seed_accounts
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.server import serve_proxy


async def test_pool_usage_endpoints_answer_in_the_upstream_shape(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=3))
    for account_id, used in (("acct-mock-1", 100), ("acct-mock-2", 300), ("acct-mock-3", 500)):
        await mock.control.patch_account(account_id, primary_used=used)  # 10, 30, 50 %
    await mock.control.patch_account("acct-mock-1", secondary_used=600)  # 6 % of 10000
    proxy = await make_proxy(mock, usage_poll_interval=3600)

    async def all_polled() -> bool:
        return all(a["poll"]["last_ok_at"] for a in (await accounts(proxy)).values())

    await eventually(all_polled)
    windows = {a["account_id"]: a for a in await mock.control.accounts()}
    body = (await proxy.client.get(proxy.root + "/backend-api/wham/usage")).json()
    assert body["plan_type"] == "plus"
    limit = body["rate_limit"]
    assert (limit["allowed"], limit["limit_reached"]) == (True, False)
    assert limit["primary_window"]["used_percent"] == 30  # (10 + 30 + 50) / 3
    assert limit["primary_window"]["limit_window_seconds"] == 18000
    assert limit["primary_window"]["reset_at"] == min(
        w["primary"]["reset_at"] for w in windows.values()
    )
    assert limit["secondary_window"]["used_percent"] == 2  # (6 + 0 + 0) / 3
    # the reset that matters is the one of an account with something used
    assert limit["secondary_window"]["reset_at"] == windows["acct-mock-1"]["secondary"]["reset_at"]
    assert body["rate_limit_reached_type"] is None and body["additional_rate_limits"] == []
    other = (await proxy.client.get(proxy.root + "/api/codex/usage")).json()
    assert other["rate_limit"]["primary_window"]["reset_at"] == limit["primary_window"]["reset_at"]
    # the pool summary comes with the account list
    listed = (await proxy.client.get(proxy.root + "/api/accounts")).json()
    assert listed["pool"]["rate_limit"]["primary_window"]["used_percent"] == 30


async def test_exhausted_pool_reports_limit_reached_and_the_earliest_return(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=1200)
    await mock.control.patch_account("acct-mock-2", exhaust="primary", resets_in=600)
    proxy = await make_proxy(mock)
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 429 and response.json()["error"]["code"] == "usage_limit_reached"
    soonest = (await mock.control.account("acct-mock-2"))["primary"]["reset_at"]
    body = (await proxy.client.get(proxy.root + "/backend-api/wham/usage")).json()
    limit = body["rate_limit"]
    assert (limit["allowed"], limit["limit_reached"]) == (False, True)
    assert limit["primary_window"]["used_percent"] == 100
    assert limit["primary_window"]["reset_at"] == soonest
    assert body["rate_limit_reached_type"] == {"kind": "rate_limit_reached"}
    listed = await accounts(proxy)
    assert {a["state"] for a in listed.values()} == {"exhausted"}
    assert listed["acct-mock-2"]["quota"]["usage_limit_until"] == soonest


async def test_usage_endpoints_take_the_same_client_auth(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, api_key=True)
    async with httpx.AsyncClient() as anonymous:
        for path in ("/backend-api/wham/usage", "/api/codex/usage"):
            refused = await anonymous.get(proxy.root + path)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "missing_api_key"
            assert (await proxy.client.get(proxy.root + path)).status_code == 200


async def test_an_exhausted_account_is_skipped_and_used_again_after_its_reset(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    # acct-mock-1's window is full and resets in 2 s: its next request gets a 429
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=2)
    for _ in range(3):
        response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    served = [(r["account"], r["status"]) for r in await mock.control.model_requests()]
    assert served[:2] == [("acct-mock-1", 429), ("acct-mock-2", 200)]
    # every answer came from acct-mock-2; acct-mock-1 is only tried again once the proxy's
    # lock (whole seconds) has run out, possibly just before the mock's own window rolls
    assert [s for s in served if s[1] == 200] == [("acct-mock-2", 200)] * 3
    assert {s for s in served if s[1] != 200} == {("acct-mock-1", 429)}

    async def recovered() -> bool:
        # resets_at is whole seconds: the mock's own window may roll up to 1 s later
        upstream = (await mock.control.account("acct-mock-1"))["primary"]["used"] == 0
        return bool(upstream and (await accounts(proxy))["acct-mock-1"]["state"] == "active")

    await eventually(recovered)
    await mock.control.clear_requests()
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200
    assert [r["account"] for r in await mock.control.model_requests()] == ["acct-mock-1"]


async def test_a_429_lock_survives_a_restart(make_mock: MockFactory, tmp_path: Path) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    settings = direct_settings(mock, tmp_path / "data", routing_strategy="fill_first")
    await seed_accounts(settings, mock, "acct-mock-1", "acct-mock-2")
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=3600)
    for run in range(2):
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(serve_proxy, settings, shutdown_event=shutdown)
            )
            async with httpx.AsyncClient() as http:
                response = await http.post(
                    f"http://127.0.0.1:{port}/backend-api/codex/responses", json=request_body()
                )
                assert response.status_code == 200
                listed = (await http.get(f"http://127.0.0.1:{port}/api/accounts")).json()
            states = {a["account_id"]: a["state"] for a in listed["accounts"]}
            assert states == {"acct-mock-1": "exhausted", "acct-mock-2": "active"}, run
            shutdown.set()
    # the first run learned it from a 429; the second run never asked acct-mock-1
    attempts = [(r["account"], r["status"]) for r in await mock.control.model_requests()]
    assert attempts == [("acct-mock-1", 429), ("acct-mock-2", 200), ("acct-mock-2", 200)]
