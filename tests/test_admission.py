"""Admission: leases come back on every exit, waits are bounded exactly, lanes are isolated,
per-account caps are per account, and abuse leaves every gauge at exactly zero.

Every timed test runs under ``MockClock(autojump_threshold=0)`` (the ``autojump_clock``
fixture, or ``trio.run(..., clock=...)`` inside hypothesis) and asserts exact times.
"""

from __future__ import annotations

import math
import random
from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.admission import (
    AccountCaps,
    AccountStatistics,
    Admission,
    Lane,
    LaneStatistics,
    Overloaded,
)

Clock = trio.testing.MockClock


def make_admission(
    *,
    http: tuple[int, float] = (2, 0.0),
    ws: tuple[int, float] = (2, 5.0),
    caps: AccountCaps | None = None,
    retry_after: int = 2,
) -> Admission:
    return Admission(
        lanes={
            "proxy_http": http,
            "proxy_websocket": ws,
            "compact": (1, 0.0),
            "dashboard": (1, 0.0),
        },
        account_caps=caps or AccountCaps(streams=2, creates=1, wait=3.0, fail_fast=False),
        work={"refresh": 1, "connect": 2, "create": (2, 1.0)},
        retry_after=retry_after,
    )


def lane_stats(
    name: str,
    limit: int,
    in_use: int = 0,
    waiting: int = 0,
    rejected: int = 0,
    admitted: int = 0,
) -> LaneStatistics:
    return LaneStatistics(
        name=name,
        limit=limit,
        in_use=in_use,
        waiting=waiting,
        rejected_total=rejected,
        admitted_total=admitted,
    )


class Boom(Exception):
    pass


async def hold(
    cm: AbstractAsyncContextManager[Any],
    release: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with cm:
        task_status.started()
        await release.wait()


# --- leases come back ---------------------------------------------------------------------


async def test_lease_released_on_normal_exit(autojump_clock: Clock) -> None:
    admission = make_admission()
    lane = admission.lane("proxy_http")
    assert lane.statistics() == lane_stats("proxy_http", 2)
    async with lane.lease() as first:
        assert first.held
        assert lane.statistics() == lane_stats("proxy_http", 2, in_use=1, admitted=1)
        async with lane.lease():
            assert lane.statistics() == lane_stats("proxy_http", 2, in_use=2, admitted=2)
        assert lane.statistics() == lane_stats("proxy_http", 2, in_use=1, admitted=2)
    assert not first.held
    assert lane.statistics() == lane_stats("proxy_http", 2, admitted=2)
    assert admission.idle()
    assert trio.current_time() == 0.0


async def test_lease_released_on_exception(autojump_clock: Clock) -> None:
    admission = make_admission()
    lane = admission.lane("proxy_http")
    with pytest.raises(Boom):
        async with admission.lease("proxy_http"):
            assert lane.statistics().in_use == 1
            raise Boom
    assert lane.statistics() == lane_stats("proxy_http", 2, admitted=1)
    assert admission.idle()


async def test_lease_released_on_cancellation_while_holding(autojump_clock: Clock) -> None:
    admission = make_admission()
    lane = admission.lane("proxy_websocket")
    with trio.move_on_after(7) as scope:
        async with lane.lease():
            assert lane.statistics().in_use == 1
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() == 7.0
    assert lane.statistics() == lane_stats("proxy_websocket", 2, admitted=1)
    assert admission.idle()


async def test_cancellation_while_waiting_does_not_leak(autojump_clock: Clock) -> None:
    admission = make_admission(ws=(1, 60.0))
    lane = admission.lane("proxy_websocket")
    release = trio.Event()
    waiter_scope = trio.CancelScope()
    outcome: list[str] = []

    async def waiter() -> None:
        with waiter_scope:
            async with lane.lease():
                outcome.append("admitted")
        outcome.append("cancelled" if waiter_scope.cancelled_caught else "left")

    async with trio.open_nursery() as nursery:
        await nursery.start(hold, lane.lease(), release)
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert lane.statistics() == lane_stats(
            "proxy_websocket", 1, in_use=1, waiting=1, admitted=1
        )
        await trio.sleep(10)
        waiter_scope.cancel(reason="client went away")
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == ["cancelled"]
        assert lane.statistics() == lane_stats("proxy_websocket", 1, in_use=1, admitted=1)
        release.set()
    # the freed slot went back to the lane, not to the departed waiter
    assert lane.statistics() == lane_stats("proxy_websocket", 1, admitted=1)
    assert trio.current_time() == 10.0
    assert admission.idle()


async def test_cancelled_caller_is_not_admitted_even_with_free_slots(autojump_clock: Clock) -> None:
    admission = make_admission()
    for name in ("proxy_http", "proxy_websocket"):  # fail-fast and waiting lanes
        with trio.CancelScope() as scope:
            scope.cancel()
            async with admission.lane(name).lease():
                pytest.fail("admitted inside a cancelled scope")
        assert admission.lane(name).statistics() == lane_stats(name, 2)
    assert admission.idle()


# --- waits --------------------------------------------------------------------------------


async def test_fail_fast_rejects_at_once(autojump_clock: Clock) -> None:
    admission = make_admission(http=(1, 0.0), retry_after=3)
    lane = admission.lane("proxy_http")
    async with lane.lease():
        await trio.sleep(1)
        with pytest.raises(Overloaded) as info:
            async with lane.lease():
                pytest.fail("admitted past the limit")
        assert trio.current_time() == 1.0
        assert (info.value.lane, info.value.limit, info.value.retry_after) == ("proxy_http", 1, 3)
        assert lane.statistics() == lane_stats("proxy_http", 1, in_use=1, rejected=1, admitted=1)
    assert lane.statistics() == lane_stats("proxy_http", 1, rejected=1, admitted=1)
    assert admission.idle()


async def test_bounded_wait_rejects_after_exactly_wait(autojump_clock: Clock) -> None:
    admission = make_admission(ws=(1, 5.0))
    lane = admission.lane("proxy_websocket")
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(hold, lane.lease(), release)
        await trio.sleep(2)
        with pytest.raises(Overloaded) as info:
            async with lane.lease():
                pytest.fail("admitted past the limit")
        assert trio.current_time() == 7.0
        assert info.value.lane == "proxy_websocket"
        assert lane.statistics() == lane_stats(
            "proxy_websocket", 1, in_use=1, rejected=1, admitted=1
        )
        release.set()
    assert admission.idle()


async def test_bounded_wait_admits_when_a_slot_frees_in_time(autojump_clock: Clock) -> None:
    admission = make_admission(ws=(1, 5.0))
    lane = admission.lane("proxy_websocket")
    admitted_at: list[float] = []

    async def holder() -> None:
        async with lane.lease():
            await trio.sleep(3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        async with lane.lease():
            admitted_at.append(trio.current_time())
            assert lane.statistics() == lane_stats("proxy_websocket", 1, in_use=1, admitted=2)
    assert admitted_at == [3.0]
    assert lane.statistics() == lane_stats("proxy_websocket", 1, admitted=2)


async def test_waiters_are_admitted_in_arrival_order(autojump_clock: Clock) -> None:
    lane = Lane("proxy_websocket", 1, wait=math.inf)
    order: list[int] = []

    async def client(i: int) -> None:
        async with lane.lease():
            order.append(i)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(client, i)
            await trio.testing.wait_all_tasks_blocked()
        assert lane.statistics() == lane_stats(
            "proxy_websocket", 1, in_use=1, waiting=4, admitted=1
        )
    assert order == [0, 1, 2, 3, 4]
    assert trio.current_time() == 5.0


# --- isolation ----------------------------------------------------------------------------


async def test_a_full_lane_does_not_block_another(autojump_clock: Clock) -> None:
    admission = make_admission(ws=(2, 30.0))
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            await nursery.start(hold, admission.lane("proxy_websocket").lease(), release)
        for _ in range(3):  # and a queue behind them
            nursery.start_soon(hold, admission.lane("proxy_websocket").lease(), release)
        await trio.testing.wait_all_tasks_blocked()
        assert admission.lane("proxy_websocket").statistics().waiting == 3
        for name in ("dashboard", "proxy_http", "compact"):
            async with admission.lane(name).lease():
                assert trio.current_time() == 0.0
        async with admission.work("connect"), admission.account_slot("acct-1", "stream"):
            assert trio.current_time() == 0.0
        release.set()
    assert admission.idle()


async def test_per_account_caps_are_per_account(autojump_clock: Clock) -> None:
    admission = make_admission(caps=AccountCaps(streams=2, creates=1, wait=3.0, fail_fast=False))
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            await nursery.start(hold, admission.account_slot("acct-a", "stream"), release)
        stats = admission.statistics()
        assert stats.accounts == {"acct-a": AccountStatistics("acct-a", 2, 0, 0, 0)}
        # another account and another kind of the same account are free
        async with (
            admission.account_slot("acct-b", "stream"),
            admission.account_slot("acct-a", "create"),
        ):
            assert dict(admission.statistics().accounts) == {
                "acct-a": AccountStatistics("acct-a", 2, 1, 0, 0),
                "acct-b": AccountStatistics("acct-b", 1, 0, 0, 0),
            }
        assert trio.current_time() == 0.0
        with pytest.raises(Overloaded) as info:
            async with admission.account_slot("acct-a", "stream"):
                pytest.fail("admitted past the account cap")
        assert trio.current_time() == 3.0
        assert (info.value.lane, info.value.limit) == ("account:stream", 2)
        assert info.value.headers() == [
            ("retry-after", "2"),
            ("x-trioproxy-overload", "account:stream"),
        ]
        totals = admission.statistics().account_totals
        assert totals["stream"] == lane_stats("account:stream", 2, in_use=2, rejected=1, admitted=3)
        assert totals["create"] == lane_stats("account:create", 1, admitted=1)
        release.set()
    assert admission.statistics().accounts == {}
    assert admission.idle()


async def test_account_fail_fast_ignores_wait(autojump_clock: Clock) -> None:
    admission = make_admission(caps=AccountCaps(streams=1, creates=1, wait=30.0, fail_fast=True))
    async with admission.account_slot("acct-a", "create"):
        with pytest.raises(Overloaded) as info:
            async with admission.account_slot("acct-a", "create"):
                pytest.fail("admitted past the account cap")
    assert trio.current_time() == 0.0
    assert (info.value.lane, info.value.limit) == ("account:create", 1)
    assert admission.idle()


async def test_account_waiter_is_admitted_and_accounts_are_forgotten(autojump_clock: Clock) -> None:
    admission = make_admission(caps=AccountCaps(streams=1, creates=1, wait=3.0, fail_fast=False))
    seen: list[tuple[float, AccountStatistics]] = []

    async def holder() -> None:
        async with admission.account_slot("acct-a", "stream"):
            await trio.sleep(2)

    async def waiter() -> None:
        async with admission.account_slot("acct-a", "stream"):
            seen.append((trio.current_time(), admission.statistics().accounts["acct-a"]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert admission.statistics().accounts == {
            "acct-a": AccountStatistics("acct-a", 1, 0, 1, 0)
        }
    assert seen == [(2.0, AccountStatistics("acct-a", 1, 0, 0, 0))]
    assert admission.statistics().accounts == {}
    # an account whose only user was cancelled while waiting is forgotten too
    async with admission.account_slot("acct-a", "stream"):
        with trio.move_on_after(1):
            async with admission.account_slot("acct-a", "stream"):
                pytest.fail("admitted past the account cap")
        with pytest.raises(Overloaded):
            async with admission.account_slot("acct-a", "stream"):
                pytest.fail("admitted past the account cap")
    assert admission.statistics().accounts == {}
    assert admission.idle()


async def test_work_lanes(autojump_clock: Clock) -> None:
    admission = make_admission()
    done: list[float] = []

    async def refresh() -> None:
        async with admission.work("refresh"):  # limit 1, no wait bound of its own
            await trio.sleep(10)
            done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(refresh)
        await trio.testing.wait_all_tasks_blocked()
        assert admission.statistics().work["refresh"] == lane_stats(
            "work:refresh", 1, in_use=1, waiting=2, admitted=1
        )
    assert done == [10.0, 20.0, 30.0]
    async with admission.work("create"), admission.work("create"):
        with pytest.raises(Overloaded) as info:
            async with admission.work("create"):
                pytest.fail("admitted past the work limit")
    assert info.value.lane == "work:create"
    assert trio.current_time() == 31.0
    stats = admission.statistics()
    assert stats.work["create"] == lane_stats("work:create", 2, rejected=1, admitted=2)
    assert stats.work["connect"] == lane_stats("work:connect", 2)
    assert admission.idle()


async def test_the_shape_of_a_session_leaves_nothing_behind(autojump_clock: Clock) -> None:
    """Lane lease around the session, account slot per turn, work leases per step; the client
    goes away at each step in turn."""
    admission = make_admission(ws=(5, 0.0))
    for leave_at in range(6):
        with trio.move_on_after(leave_at + 0.5):
            async with admission.lane("proxy_websocket").lease():
                await trio.sleep(1)  # 0: upgrade
                async with admission.work("connect"):
                    await trio.sleep(1)  # 1: upstream connect
                async with admission.account_slot("acct-a", "stream"):
                    async with admission.account_slot("acct-a", "create"):
                        async with admission.work("create"):
                            await trio.sleep(1)  # 2: response.create
                        await trio.sleep(1)  # 3: before response.created
                    await trio.sleep(1)  # 4: mid-stream
                await trio.sleep(1)  # 5: idle
        assert admission.idle(), leave_at


# --- the answer when full -----------------------------------------------------------------


def test_overloaded_envelope_and_headers() -> None:
    exc = Overloaded("proxy_websocket", 200, 4)
    assert exc.status == 429
    assert str(exc) == "the proxy_websocket lane is full (limit 200)"
    assert exc.envelope() == {
        "error": {
            "type": "server_overloaded",
            "code": "proxy_overloaded",
            "message": "the proxy_websocket lane is full (limit 200)",
            "param": None,
        }
    }
    assert exc.headers() == [("retry-after", "4"), ("x-trioproxy-overload", "proxy_websocket")]
    assert Overloaded("dashboard", 1).headers()[0] == ("retry-after", "1")
    with pytest.raises(ValueError):
        Overloaded("dashboard", 1, 0)


# --- misuse and configuration -------------------------------------------------------------


async def test_leases_are_single_use() -> None:
    admission = make_admission()
    lease = admission.lane("proxy_http").lease()
    async with lease:
        pass
    with pytest.raises(RuntimeError):
        async with lease:
            pass
    with pytest.raises(RuntimeError):
        await admission.lane("proxy_http").lease().__aexit__(None, None, None)
    slot = admission.account_slot("acct-a", "stream")
    async with slot:
        pass
    with pytest.raises(RuntimeError):
        async with slot:
            pass
    with pytest.raises(RuntimeError):
        await admission.account_slot("acct-a", "stream").__aexit__(None, None, None)
    assert admission.idle()


def test_configuration_is_validated() -> None:
    caps = AccountCaps(streams=1, creates=1)
    work: dict[str, int | tuple[int, float]] = {"refresh": 1, "connect": 1, "create": 1}
    for lanes in ({"x": (0, 0.0)}, {"x": (1, -1.0)}, {"x": (1, math.nan)}, {"x": (True, 0.0)}):
        with pytest.raises(ValueError):
            Admission(lanes=lanes, account_caps=caps, work=work)
    with pytest.raises(ValueError, match="missing"):
        Admission(lanes={}, account_caps=caps, work={"refresh": 1, "connect": 1})
    with pytest.raises(ValueError, match="unknown"):
        Admission(lanes={}, account_caps=caps, work={**work, "other": 1})
    with pytest.raises(ValueError, match="account:stream"):
        Admission(lanes={}, account_caps=AccountCaps(streams=0, creates=1), work=work)
    with pytest.raises(ValueError):
        Admission(lanes={}, account_caps=caps, work=work, retry_after=0)
    admission = make_admission()
    with pytest.raises(KeyError, match="proxy_http"):
        admission.lane("nope")
    with pytest.raises(ValueError):
        admission.account_slot("acct-a", "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        admission.work("nope")  # type: ignore[arg-type]


async def test_statistics_json(autojump_clock: Clock) -> None:
    admission = make_admission()
    async with admission.lane("dashboard").lease(), admission.account_slot("acct-a", "stream"):
        body = admission.statistics().as_json()
    assert body["lanes"]["dashboard"] == {
        "name": "dashboard",
        "limit": 1,
        "in_use": 1,
        "waiting": 0,
        "rejected_total": 0,
        "admitted_total": 1,
    }
    assert set(body["lanes"]) == {"proxy_http", "proxy_websocket", "compact", "dashboard"}
    assert set(body["work"]) == {"refresh", "connect", "create"}
    assert body["accounts"] == {
        "acct-a": {"streams": 1, "creates": 0, "streams_waiting": 0, "creates_waiting": 0}
    }
    assert body["account_totals"]["stream"]["admitted_total"] == 1


# --- abuse --------------------------------------------------------------------------------


async def test_storm_of_500_tasks_leaves_every_gauge_at_zero(autojump_clock: Clock) -> None:
    seed = random.Random(20240505)
    rng = random.Random(seed.random())  # the test's own choices
    admission = Admission(
        lanes={
            "proxy_http": (20, 0.0),
            "proxy_websocket": (15, 2.0),
            "compact": (3, 5.0),
            "dashboard": (2, 0.0),
        },
        account_caps=AccountCaps(streams=3, creates=2, wait=2.0, fail_fast=False),
        work={"refresh": 1, "connect": 4, "create": (4, 1.0)},
    )
    lanes = ["proxy_http", "proxy_websocket", "compact", "dashboard"]
    accounts = [f"acct-{i}" for i in range(4)]
    outcomes: dict[str, int] = {"completed": 0, "rejected": 0, "raised": 0, "cancelled": 0}
    scopes: list[trio.CancelScope] = []
    peak: dict[str, int] = {}

    def check() -> None:
        stats = admission.statistics()
        for lane in stats.all_lanes():
            assert 0 <= lane.in_use <= lane.limit, lane
            assert lane.waiting >= 0, lane
            peak[lane.name] = max(peak.get(lane.name, 0), lane.in_use)
        for account in stats.accounts.values():
            assert 0 <= account.streams <= 3 and 0 <= account.creates <= 2, account

    async def step(rng: random.Random) -> None:
        await trio.sleep(rng.choice([0, 0, rng.random(), rng.random() * 5]))
        check()
        if rng.random() < 0.1:
            raise Boom

    async def client(rng: random.Random) -> None:
        scope = trio.CancelScope()
        scopes.append(scope)
        if rng.random() < 0.4:
            scope.deadline = trio.current_time() + rng.random() * 20
        try:
            with scope:
                await trio.sleep(rng.random() * 10)
                async with admission.lane(rng.choice(lanes)).lease():
                    await step(rng)
                    if rng.random() < 0.3:
                        async with admission.work("refresh"):
                            await step(rng)
                    account = rng.choice(accounts)
                    async with admission.account_slot(account, "stream"):
                        async with admission.work("connect"):
                            await step(rng)
                        async with admission.account_slot(account, "create"):
                            async with admission.work("create"):
                                await step(rng)
                            await step(rng)
                        await step(rng)
                    await step(rng)
                outcomes["completed"] += 1
        except Overloaded:
            outcomes["rejected"] += 1
        except Boom:
            outcomes["raised"] += 1
        if scope.cancelled_caught:
            outcomes["cancelled"] += 1

    async def abandoner() -> None:
        # clients leave at random points, whatever they are doing
        for _ in range(150):
            await trio.sleep(rng.random() * 0.5)
            rng.choice(scopes).cancel(reason="client went away")

    async with trio.open_nursery() as nursery:
        for _ in range(500):
            nursery.start_soon(client, random.Random(seed.random()))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(abandoner)
    assert sum(outcomes.values()) == 500
    assert all(n > 20 for n in outcomes.values()), outcomes
    assert all(peak[name] == admission.lane(name).limit for name in lanes), peak
    assert admission.idle()
    stats = admission.statistics()
    assert stats.accounts == {}
    for lane in (*stats.all_lanes(), *stats.account_totals.values()):
        assert (lane.in_use, lane.waiting) == (0, 0), lane
    assert sum(s.admitted_total + s.rejected_total for s in stats.lanes.values()) <= 500
    assert sum(s.rejected_total for s in stats.account_totals.values()) > 0


# --- random sequences (hypothesis) --------------------------------------------------------


@attrs.define(eq=False)
class Actor:
    account: str
    kind: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    leave: trio.Event = attrs.field(factory=trio.Event)
    raise_on_leave: bool = False
    state: str = "new"  # waiting, holding, rejected, done, raised, cancelled
    started_at: float = 0.0
    ended_at: float = 0.0
    admitted: bool = False


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("enter"), st.sampled_from(["a", "b"]), st.sampled_from(["stream", "create"])
        ),
        st.tuples(st.sampled_from(["exit", "raise", "cancel"]), st.integers(0, 50)),
        st.tuples(st.just("sleep"), st.sampled_from([0.25, 0.5, 1.25, 3.75])),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops,
    target=st.sampled_from(["lane", "account"]),
    limit=st.integers(1, 3),
    wait=st.sampled_from([0.0, 1.0, 2.0, math.inf]),
)
def test_random_sequences_keep_gauges_exact(
    ops: list[tuple[Any, ...]], target: str, limit: int, wait: float
) -> None:
    """Whatever happens, ``in_use`` equals the holders, ``waiting`` the waiters, no slot stays
    free while someone waits, rejections come exactly ``wait`` after arrival, and at the end
    everything is back to zero."""
    admission = Admission(
        lanes={"proxy_websocket": (limit, wait)},
        account_caps=AccountCaps(streams=limit, creates=limit, wait=wait),
        work={"refresh": 1, "connect": 1, "create": 1},
    )

    def lease_for(actor: Actor) -> AbstractAsyncContextManager[Any]:
        if target == "lane":
            return admission.lane("proxy_websocket").lease()
        return admission.account_slot(actor.account, actor.kind)  # type: ignore[arg-type]

    async def run(actor: Actor) -> None:
        actor.started_at = trio.current_time()
        actor.state = "waiting"
        with actor.scope:
            try:
                async with lease_for(actor):
                    actor.state = "holding"
                    actor.admitted = True
                    await actor.leave.wait()
                    if actor.raise_on_leave:
                        raise Boom
                actor.state = "done"
            except Overloaded:
                actor.state = "rejected"
                actor.ended_at = trio.current_time()
            except Boom:
                actor.state = "raised"
        if actor.scope.cancelled_caught:
            actor.state = "cancelled"

    def groups(actors: list[Actor]) -> dict[tuple[str, str], list[Actor]]:
        if target == "lane":
            return {("", ""): actors}
        out: dict[tuple[str, str], list[Actor]] = {}
        for actor in actors:
            out.setdefault((actor.account, actor.kind), []).append(actor)
        return out

    def check(actors: list[Actor]) -> None:
        stats = admission.statistics()
        for (account, kind), group in groups(actors).items():
            holders = sum(a.state == "holding" for a in group)
            waiters = sum(a.state == "waiting" for a in group)
            if target == "lane":
                in_use, waiting = (
                    stats.lanes["proxy_websocket"].in_use,
                    stats.lanes["proxy_websocket"].waiting,
                )
            elif account in stats.accounts:
                record = stats.accounts[account]
                in_use = record.streams if kind == "stream" else record.creates
                waiting = record.streams_waiting if kind == "stream" else record.creates_waiting
            else:
                in_use = waiting = 0
            assert (in_use, waiting) == (holders, waiters)
            assert 0 <= in_use <= limit
            assert waiting == 0 or in_use == limit
        live_accounts = {a.account for a in actors if a.state in ("holding", "waiting")}
        assert target == "lane" or set(stats.accounts) == live_accounts
        totals = stats.lanes["proxy_websocket"] if target == "lane" else None
        admitted = sum(a.admitted for a in actors)
        rejected = [a for a in actors if a.state == "rejected"]
        if totals is not None:
            assert (totals.admitted_total, totals.rejected_total) == (admitted, len(rejected))
        else:
            assert sum(s.admitted_total for s in stats.account_totals.values()) == admitted
            assert sum(s.rejected_total for s in stats.account_totals.values()) == len(rejected)
        for a in rejected:
            assert a.ended_at - a.started_at == pytest.approx(wait, abs=1e-9)

    async def scenario() -> None:
        actors: list[Actor] = []
        async with trio.open_nursery() as nursery:
            for op in ops:
                live = [a for a in actors if a.state in ("holding", "waiting")]
                if op[0] == "enter":
                    actor = Actor(account=op[1], kind=op[2])
                    actors.append(actor)
                    nursery.start_soon(run, actor)
                elif op[0] == "sleep":
                    await trio.sleep(op[1])
                elif live:
                    actor = live[op[1] % len(live)]
                    if op[0] == "cancel":
                        actor.scope.cancel(reason="client went away")
                    elif actor.state == "holding":
                        actor.raise_on_leave = op[0] == "raise"
                        actor.leave.set()
                await trio.testing.wait_all_tasks_blocked()
                check(actors)
            for actor in actors:
                actor.scope.cancel(reason="test over")
        check(actors)
        assert all(a.state not in ("holding", "waiting") for a in actors)
        assert admission.idle()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
