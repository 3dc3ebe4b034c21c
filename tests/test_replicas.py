"""Several proxies (replicas) on one real PostgreSQL database, in front of the mock backend:
the store, token refreshes and account state shared between them."""

from __future__ import annotations

from typing import Any

import trio

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import final_text, post_responses, request_body
from tests.pg_support import PgServer
from tests.quota_support import accounts
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER

SECRET = "replicas-share-this-secret"


async def replicas(
    make_proxy: ProxyFactory, mock: MockEnv, url: str, count: int, **options: Any
) -> list[ProxyEnv]:
    """``count`` proxies on the database at ``url``; the first imports the mock's accounts
    (through its management API), the others find them in the database when they start."""
    first = await make_proxy(mock, database_url=url, secret_key=SECRET, **options)
    others = [
        await make_proxy(mock, database_url=url, secret_key=SECRET, accounts=[], **options)
        for _ in range(count - 1)
    ]
    return [first, *others]


async def test_three_replicas_refresh_an_expired_account_once(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer
) -> None:
    # upstream no longer takes the account's access token: every replica's first requests
    # get a 401 and want a refresh; the auth server takes half a second, so the other
    # replicas' flights start meanwhile
    mock = await make_mock(MockConfig(accounts=1))
    proxies = await replicas(make_proxy, mock, pg_server.database(), 3)
    await mock.control.patch_account("acct-mock-1", expire_tokens=True)
    await mock.control.add_fault("slow", on="token", first_event_delay=0.5)
    statuses: list[int] = []

    async def one(proxy: ProxyEnv) -> None:
        response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        statuses.append(response.status_code)
        assert final_text(events) == DEFAULT_ANSWER

    async with trio.open_nursery() as nursery:
        for proxy in proxies:
            for _ in range(100):
                nursery.start_soon(one, proxy)
    assert statuses == [200] * 300
    refreshes = await mock.control.requests(path="/oauth/token")
    assert len(refreshes) == 1 and refreshes[0]["status"] == 200
    assert refreshes[0]["body"]["refresh_reason"] == "unauthorized_recovery"
    fresh = mock.backend.accounts["acct-mock-1"].current_access_token(mock.backend.clock.now())
    for proxy in proxies:
        assert (await accounts(proxy))["acct-mock-1"]["state"] == "active"
    served = [r for r in await mock.control.model_requests() if r["status"] == 200]
    assert len(served) == 300
    assert {dict(r["headers"])["authorization"] for r in served} == {f"Bearer {fresh}"}
