"""Several proxies (replicas) on one real PostgreSQL database, in front of the mock backend:
the store, token refreshes and account state shared between them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory, start_proxy
from tests.helpers import final_text, post_responses, request_body
from tests.pg_support import PgServer
from tests.quota_support import accounts, eventually
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.store import Store
from trioproxy.store.coordination import lease_holder, take_lease

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


async def test_a_429_lock_and_account_changes_reach_the_other_replicas(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer
) -> None:
    mock = await make_mock(MockConfig(accounts=3))
    proxies = await replicas(
        make_proxy, mock, pg_server.database(), 2, routing_strategy="fill_first"
    )
    first, second = proxies
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=3600)
    response, _ = await post_responses(first.client, first.codex_url, {}, request_body())
    assert response.status_code == 200  # acct-mock-1 refused it; acct-mock-2 answered
    assert [r["account"] for r in await mock.control.model_requests()] == [
        "acct-mock-1",
        "acct-mock-2",
    ]
    began = trio.current_time()

    async def second_knows() -> bool:
        return bool((await accounts(second))["acct-mock-1"]["state"] == "exhausted")

    await eventually(second_knows)
    print(f"429 lock reached the other replica in {trio.current_time() - began:.2f} s")
    await mock.control.clear_requests()
    response, _ = await post_responses(second.client, second.codex_url, {}, request_body())
    assert response.status_code == 200
    # the other replica never tries the locked account
    assert [r["account"] for r in await mock.control.model_requests()] == ["acct-mock-2"]

    # an account removed through one replica leaves the other's pool
    assert (
        await second.client.delete(f"{second.root}/api/accounts/acct-mock-3")
    ).status_code == 200

    async def first_forgot() -> bool:
        return "acct-mock-3" not in await accounts(first)

    await eventually(first_forgot)
    # and one imported through it joins the other's
    auth = await mock.control.auth_json("acct-mock-3")
    assert (await first.client.post(f"{first.root}/api/accounts", json=auth)).status_code in (
        200,
        201,
    )

    async def second_has_it() -> bool:
        return "acct-mock-3" in await accounts(second)

    await eventually(second_has_it)


@attrs.define(eq=False)
class Replica:
    env: ProxyEnv
    scope: trio.CancelScope
    stopped: trio.Event


async def start_replica(
    nursery: trio.Nursery, mock: MockEnv, path: Path, url: str, **options: Any
) -> Replica:
    """A replica that the test can stop (cancelling ``scope`` is a clean shutdown;
    ``stopped`` is set once it is over)."""
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[Replica]) -> None:
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    env = await start_proxy(
                        inner, mock, path, database_url=url, secret_key=SECRET, **options
                    )
                    task_status.started(Replica(env, scope, stopped))
        finally:
            stopped.set()

    replica: Replica = await nursery.start(run)
    return replica


async def lease_holders(proxies: list[ProxyEnv]) -> list[int]:
    """The indexes of the replicas that hold the quota-services lease now."""
    held = []
    for index, proxy in enumerate(proxies):
        stats = (await proxy.client.get(proxy.root + "/api/stats")).json()
        if any(lease["held"] for lease in stats["replica"]["leases"]):
            held.append(index)
    return held


async def test_one_replica_at_a_time_runs_the_quota_jobs_and_another_takes_over(
    nursery: trio.Nursery, make_mock: MockFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    url = pg_server.database()
    options: dict[str, Any] = {"lease_term": 1.5, "models_refresh_interval": 3600}
    started = [
        await start_replica(
            nursery, mock, tmp_path / f"r{i}", url, accounts=[] if i else None, **options
        )
        for i in range(3)
    ]
    proxies = [replica.env for replica in started]
    try:
        await leader_changes(mock, url, tmp_path, started)
    finally:
        for proxy in proxies:
            await proxy.client.aclose()


def seize_lease(store: Store, name: str, holder: str, term: float) -> bool:
    """Lease ``name`` written to ``holder`` from the end of its current holder's term on (as
    if that term had run out), so the current holder's renewals are refused from now on."""
    for _ in range(20):  # (the holder may renew between the read and the write)
        current = lease_holder(store, name)
        if current is not None and take_lease(store, name, holder, term, now=current[1] + 0.001):
            return True
    return False


async def leader_changes(mock: MockEnv, url: str, tmp_path: Path, started: list[Replica]) -> None:
    proxies = [replica.env for replica in started]

    async def one_leader() -> bool:
        return len(await lease_holders(proxies)) == 1

    await eventually(one_leader)
    (leader,) = await lease_holders(proxies)

    # the lease holder fetches the model lists; the others take them from the store
    await mock.control.clear_requests()
    refreshed = await proxies[leader].client.post(proxies[leader].root + "/api/models/refresh")
    assert refreshed.status_code == 200

    async def everyone_has_the_lists() -> bool:
        views = [(await p.client.get(p.root + "/api/models")).json() for p in proxies]
        return all(v["source"] == "upstream" and "plus" in v["plans"] for v in views)

    await eventually(everyone_has_the_lists)
    assert len(await mock.control.requests(path="/backend-api/codex/models")) == 1

    # the holder dies without giving the lease up: its row stays as a killed process leaves
    # it, a holder that no longer renews with a term still running (written here, in the
    # holder's stead, before it stops: a process stopped gracefully would give the lease up,
    # and a survivor could take it at once). Another replica takes over once that term has
    # run out.
    dying = started[leader]
    stats = (await dying.env.client.get(dying.env.root + "/api/stats")).json()
    (lease,) = stats["replica"]["leases"]
    with Store.open(url, data_dir=tmp_path / "writer", secret_key=SECRET) as store:
        assert seize_lease(store, "quota-services", "killed-replica", lease["term"])
    began = trio.current_time()
    dying.scope.cancel()
    await dying.stopped.wait()
    survivors = [p for i, p in enumerate(proxies) if i != leader]

    async def taken_over() -> bool:
        return len(await lease_holders(survivors)) == 1

    await eventually(taken_over)
    took = trio.current_time() - began
    print(f"lease taken over {took:.2f} s after its holder died (term {lease['term']} s)")
    assert took >= lease["term"] / 3  # not before the dead holder's term ran out


async def test_a_key_budget_adds_up_what_every_replica_charged(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    url = pg_server.database()
    first = await make_proxy(
        mock, database_url=url, secret_key=SECRET, replica_name="r1", usage_flush_interval=0.1
    )
    second = await make_proxy(
        mock,
        database_url=url,
        secret_key=SECRET,
        replica_name="r2",
        usage_flush_interval=0.1,
        accounts=[],
    )
    with Store.open(url, data_dir=tmp_path / "admin", secret_key=SECRET) as store:
        _, operator = store.create_api_key("operator")
        _, secret = store.create_api_key(
            "team", policy={"budgets": [{"window": "5h", "requests": 4}]}
        )

    async def both_know_the_key() -> bool:
        # (until a replica reads the keys, it serves loopback clients without any)
        for proxy in (first, second):
            for presented, status in ((secret, 200), ("trx_unknown_key", 401)):
                answer = await proxy.client.get(
                    f"{proxy.root}/v1/models", headers={"authorization": f"Bearer {presented}"}
                )
                if answer.status_code != status:
                    return False
        return True

    await eventually(both_know_the_key)
    headers = {"authorization": f"Bearer {secret}"}
    for proxy in (first, second, first):
        answer = await proxy.client.post(proxy.codex_url, json=request_body(), headers=headers)
        assert answer.status_code == 200

    def sees(proxy: ProxyEnv, requests: int) -> Callable[[], Awaitable[bool]]:
        """Whether ``proxy`` counts ``requests`` against the team's budget."""

        async def check() -> bool:
            view = await proxy.client.get(
                f"{proxy.root}/api/keys", headers={"authorization": f"Bearer {operator}"}
            )
            (team,) = [k for k in view.json()["keys"] if k["name"] == "team"]
            return bool(team["budgets"][0]["used"]["requests"] == requests)

        return check

    await eventually(sees(second, 3))
    answer = await second.client.post(second.codex_url, json=request_body(), headers=headers)
    assert answer.status_code == 200  # the fourth, counted on the second replica
    await eventually(sees(first, 4))
    for proxy in (first, second):
        answer = await proxy.client.post(proxy.codex_url, json=request_body(), headers=headers)
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "key_budget_exceeded"
    served = [r for r in await mock.control.model_requests() if r["status"] == 200]
    assert len(served) == 4
