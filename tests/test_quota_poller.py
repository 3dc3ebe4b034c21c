"""The usage poller: schedule and cooldowns under MockClock (an in-memory usage source), then
against the mock backend over loopback (one refresh on 401, deactivation, re-import)."""

from __future__ import annotations

from typing import Any

import attrs
import trio
import trio.lowlevel
import trio.testing

from tests.conftest import MockFactory, ProxyFactory
from tests.helpers import post_responses, request_body
from tests.quota_support import accounts, eventually
from tests.test_protocol import record
from trioproxy.accounts.poller import UsagePoller
from trioproxy.accounts.pool import Account, Pool, UnixClock
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.backend import DEACTIVATED_MESSAGE
from trioproxy.store import Store

INVALIDATED = {"error": {"message": "token invalidated", "code": "token_invalidated"}}


@attrs.define
class FakeUsage:
    """An in-memory usage endpoint: answers from a script, records when it was asked."""

    clock: UnixClock
    answers: list[tuple[int, dict[str, Any]]] = attrs.field(factory=list)
    default: tuple[int, dict[str, Any]] = (200, {"rate_limit": {}})
    fetches: list[float] = attrs.field(factory=list)
    refreshes: list[float] = attrs.field(factory=list)
    active: int = 0
    peak: int = 0

    async def token(self, account: Account) -> str:
        return "tok"

    async def refresh(self, account: Account, stale_token: str) -> str:
        self.refreshes.append(self.clock.now())
        return "tok2"

    async def fetch(self, account: Account, token: str) -> tuple[int, dict[str, Any]]:
        self.fetches.append(self.clock.now())
        self.active += 1
        self.peak = max(self.peak, self.active)
        await trio.lowlevel.checkpoint()
        self.active -= 1
        return self.answers.pop(0) if self.answers else self.default


def usage_body(used: float) -> dict[str, Any]:
    return {
        "plan_type": "plus",
        "rate_limit": {"primary_window": {"used_percent": used, "limit_window_seconds": 18000}},
    }


async def test_repeated_401s_refresh_once_then_back_off(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    pool = Pool(clock=UnixClock())
    pool.sync([record("a", 1)])
    start = pool.clock.now()
    source = FakeUsage(pool.clock, answers=[(401, INVALIDATED)] * 5, default=(200, usage_body(7)))
    poller = UsagePoller(pool, source, interval=100.0, max_cooldown=1000.0, jitter=0.0)
    await nursery.start(poller.run)
    await trio.sleep(2600)
    relative = [round(t - start) for t in source.fetches]
    # t=0: 401, one refresh, retry 401 -> 2x interval; then 4x, 8x, then capped at 1000
    assert relative[:5] == [0, 0, 200, 600, 1400]
    assert [round(t - start) for t in source.refreshes] == [0]  # one refresh per 401 streak
    assert relative[5:] == [2400, 2500]  # a 200 ends the streak: every interval again
    poll = pool.accounts["a"].poll
    assert poll.unauthorized_streak == 0 and poll.last_error is None
    primary = pool.accounts["a"].quota.primary
    assert primary is not None and primary.used_percent == 7 and primary.source == "poll"


async def test_polls_are_jittered_concurrency_limited_and_an_import_is_polled_at_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    pool = Pool(clock=UnixClock())
    pool.sync([record(name, i) for i, name in enumerate("abcdef")])
    source = FakeUsage(pool.clock)
    poller = UsagePoller(pool, source, interval=100.0, concurrency=2, jitter=0.1)
    await nursery.start(poller.run)
    start = pool.clock.now()
    await trio.sleep(50)
    assert len(source.fetches) == 6 and source.peak == 2
    await trio.sleep(100)
    second = sorted(t - start for t in source.fetches[6:])
    assert len(second) == 6 and all(90 <= t <= 110 for t in second)
    assert len({round(t, 3) for t in second}) > 1  # not all at once
    pool.sync([*(a.record for a in pool.accounts.values()), record("g", 9)])
    await trio.sleep(1)
    assert pool.accounts["g"].poll.polls == 1  # right after the import


async def test_a_401_on_the_usage_endpoint_costs_one_refresh_then_a_cooldown(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    await mock.control.add_fault("token_invalidated", on="usage", account="acct-mock-1")
    proxy = await make_proxy(mock, usage_poll_interval=3600, usage_poll_max_cooldown=86400)

    async def account(account_id: str) -> dict[str, Any]:
        return (await accounts(proxy))[account_id]

    async def both_polled() -> bool:
        listed = await accounts(proxy)
        return (
            listed["acct-mock-1"]["poll"]["unauthorized_streak"] == 1
            and listed["acct-mock-2"]["poll"]["last_ok_at"] is not None
        )

    await eventually(both_polled)
    polls = await mock.control.requests(path="/backend-api/wham/usage", account="acct-mock-1")
    assert [p["status"] for p in polls] == [401, 401]  # before and after the one refresh
    assert (await mock.control.account("acct-mock-1"))["refresh_count"] == 1
    one = await account("acct-mock-1")
    assert one["state"] == "active" and one["poll"]["last_error"] == "401 token_invalidated"
    assert (
        one["poll"]["cooldown_until"]
        > (await proxy.client.get(proxy.root + "/api/accounts")).json()["now"] + 7000
    )
    two = await account("acct-mock-2")
    assert two["quota"]["primary"]["source"] == "poll"
    assert two["quota"]["primary"]["window_minutes"] == 300


async def test_deactivated_on_the_usage_endpoint_leaves_rotation_until_reimported(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    await mock.control.patch_account("acct-mock-2", deactivated=True)
    proxy = await make_proxy(mock, usage_poll_interval=3600, routing_strategy="round_robin")

    async def states() -> dict[str, dict[str, Any]]:
        return await accounts(proxy)

    async def deactivated() -> bool:
        return bool((await states())["acct-mock-2"]["state"] == "deactivated")

    await eventually(deactivated)
    assert (await states())["acct-mock-2"]["state_reason"] == DEACTIVATED_MESSAGE
    for _ in range(4):  # never routed there
        response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        assert response.status_code == 200
    served = {r["account"] for r in await mock.control.model_requests()}
    assert served == {"acct-mock-1"}
    # stored (a restart or another replica sees it too); and no more polls
    settings = proxy.settings
    with Store.open(settings.resolved_database_url, data_dir=settings.data_dir) as store:
        stored = store.get_account("acct-mock-2")
    assert stored is not None and stored.state == "deactivated"
    polls = await mock.control.requests(path="/backend-api/wham/usage")
    assert sorted(p["status"] for p in polls) == [200, 401]  # acct-mock-1 once, acct-mock-2 once
    # re-imported: back in rotation and polled at once
    await mock.control.patch_account("acct-mock-2", deactivated=False)
    auth = await mock.control.auth_json("acct-mock-2")
    assert (await proxy.client.post(proxy.root + "/api/accounts", json=auth)).status_code == 200

    async def polled_again() -> bool:
        return (await states())["acct-mock-2"]["poll"]["last_ok_at"] is not None

    await eventually(polled_again)
    assert (await states())["acct-mock-2"]["state"] == "active"
