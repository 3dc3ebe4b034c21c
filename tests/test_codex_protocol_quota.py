"""Accounts with a weekly (secondary) usage window only: upstream sends no primary figure in
its rate-limit headers, ``codex.rate_limits`` events and ``/wham/usage``. The proxy learns
such accounts from every signal, routes by the window they have, drops a primary figure an
account no longer has, and answers the pool's usage with ``primary_window: null`` when no
account has one (docs/quota.md, docs/codex-protocol.md)."""

from __future__ import annotations

from tests.conftest import MockFactory, ProxyFactory
from tests.helpers import final_text, post_responses, request_body
from tests.quota_support import accounts, eventually
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER


async def test_weekly_only_headers_and_events_are_learned_and_routed_on(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2, secondary_limit=10000))
    for account_id in ("acct-mock-1", "acct-mock-2"):
        await mock.control.patch_account(account_id, weekly_only=True, secondary_used=4000)
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    quota = (await accounts(proxy))["acct-mock-1"]["quota"]
    assert quota["primary"] is None
    assert quota["secondary"]["used_percent"] == 40.0
    assert quota["secondary"]["window_minutes"] == 10080
    assert quota["headroom"] == 60.0 and quota["exhausted_until"] is None
    usage = (await proxy.client.get(proxy.root + "/backend-api/wham/usage")).json()
    assert usage["rate_limit"]["primary_window"] is None
    assert usage["rate_limit"]["secondary_window"]["limit_window_seconds"] == 604800
    assert usage["rate_limit"]["allowed"] is True

    # the weekly window fills up; the proxy learns it from the response headers alone (no
    # codex.rate_limits event, no 429) and routes around the account before its reset
    await mock.control.configure(rate_limit_events=False)
    await mock.control.patch_account("acct-mock-1", secondary_used=9999)  # shows as 100.0 %
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200
    listed = await accounts(proxy)
    assert listed["acct-mock-1"]["state"] == "exhausted"
    assert listed["acct-mock-1"]["quota"]["exhausted_until"] is not None
    assert listed["acct-mock-2"]["state"] == "active"
    await mock.control.clear_requests()
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200
    assert [r["account"] for r in await mock.control.model_requests()] == ["acct-mock-2"]


async def test_a_primary_window_the_account_no_longer_has_stops_counting(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2, primary_limit=100))
    await mock.control.patch_account("acct-mock-1", primary_used=100)  # primary full
    proxy = await make_proxy(mock, routing_strategy="fill_first", usage_poll_interval=0.2)

    async def state(account_id: str, wanted: str) -> bool:
        return bool((await accounts(proxy))[account_id]["state"] == wanted)

    await eventually(lambda: state("acct-mock-1", "exhausted"))
    # upstream now reports the weekly window only for it: the stale full primary is dropped
    await mock.control.patch_account("acct-mock-1", weekly_only=True)
    await eventually(lambda: state("acct-mock-1", "active"))
    quota = (await accounts(proxy))["acct-mock-1"]["quota"]
    assert quota["primary"] is None and quota["secondary"]["source"] == "poll"
    await mock.control.clear_requests()
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    assert [r["account"] for r in await mock.control.model_requests()] == ["acct-mock-1"]
    # a pool with a primary window somewhere still reports one
    usage = (await proxy.client.get(proxy.root + "/backend-api/wham/usage")).json()
    assert usage["rate_limit"]["primary_window"] is not None
