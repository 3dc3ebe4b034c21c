"""Quota merging (pure, with hypothesis) and quota-aware routing under MockClock."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from tests.test_protocol import record
from trioproxy.accounts import quota as q
from trioproxy.accounts.pool import Pool, RequestInfo, UnixClock

T0 = 1_800_000_000.0

readings = st.builds(
    q.WindowReading,
    used_percent=st.floats(0, 100),
    reset_at=st.one_of(st.none(), st.floats(T0 - 1000, T0 + 100_000)),
    window_minutes=st.sampled_from([None, 300, 10080]),
)
non_lock = st.builds(
    q.Observation,
    source=st.sampled_from(["headers", "event", "poll"]),
    at=st.floats(T0 - 1000, T0 + 100_000),
    primary=st.one_of(st.none(), readings),
    secondary=st.one_of(st.none(), readings),
)


@given(
    before=st.lists(non_lock, max_size=5),
    resets_in=st.floats(1, 50_000),
    after=st.lists(non_lock, max_size=20),
    probe=st.floats(0, 1),
)
def test_a_429_lock_survives_any_poll_until_its_reset(
    before: list[q.Observation], resets_in: float, after: list[q.Observation], probe: float
) -> None:
    state = q.QuotaState()
    for obs in before:
        state = q.merge(state, obs)
    state = q.merge(state, q.from_usage_limit(T0 + resets_in, T0))
    for obs in after:  # polls saying 0 %, fresher headers, stale events: none lifts the lock
        state = q.merge(state, obs)
        now = T0 + probe * resets_in * 0.999
        assert state.exhausted_until(now) is not None
        assert state.headroom(now) == 0.0
    assert state.lock_until == T0 + resets_in
    # at resets_at the lock lifts by itself (the windows may still say full on their own)
    assert not state.locked(T0 + resets_in)


@given(observations=st.lists(non_lock, min_size=1, max_size=20))
def test_fresher_evidence_wins_whatever_the_arrival_order(
    observations: list[q.Observation],
) -> None:
    state = q.QuotaState()
    for obs in observations:
        state = q.merge(state, obs)
    with_primary = [o for o in observations if o.primary is not None]
    if not with_primary:
        assert state.primary is None
        return
    freshest = max(o.at for o in with_primary)
    assert state.primary is not None and state.primary.at == freshest
    # the figure is that of the last-arriving observation among the freshest
    last = [o for o in with_primary if o.at == freshest][-1]
    assert last.primary is not None and state.primary.used_percent == last.primary.used_percent
    assert state.primary.source == last.source


def test_a_window_that_rolled_over_counts_as_empty() -> None:
    state = q.merge(
        q.QuotaState(),
        q.Observation("poll", T0, q.WindowReading(100.0, T0 + 60, 300)),
    )
    assert state.exhausted_until(T0) == T0 + 60
    assert state.exhausted_until(T0 + 60) is None and state.headroom(T0 + 60) == 100.0


def test_readers_of_each_signal() -> None:
    headers = q.from_headers(
        {
            "x-codex-primary-used-percent": "12.5",
            "x-codex-primary-window-minutes": "300",
            "x-codex-primary-reset-after-seconds": "100",
            "x-codex-secondary-used-percent": "3",
            "x-codex-secondary-reset-at": str(int(T0 + 5000)),
        },
        T0,
    )
    assert headers is not None and headers.primary == q.WindowReading(12.5, T0 + 100, 300)
    assert headers.secondary == q.WindowReading(3.0, T0 + 5000, None)
    assert q.from_headers({"x-codex-credits-balance": "0"}, T0) is None
    usage = q.from_usage(
        {
            "plan_type": "pro",
            "rate_limit": {
                "primary_window": {
                    "used_percent": 40,
                    "limit_window_seconds": 18000,
                    "reset_at": int(T0 + 10),
                },
                "secondary_window": None,
            },
        },
        T0,
    )
    assert usage is not None and usage.plan == "pro" and usage.secondary is None
    assert usage.primary == q.WindowReading(40.0, T0 + 10, 300)
    event = q.from_event(
        {"rate_limits": {"primary": {"used_percent": 7, "window_minutes": 300, "reset_at": 5}}}, T0
    )
    assert event is not None and event.primary == q.WindowReading(7.0, 5.0, 300)
    state = q.QuotaState.from_json(q.merge(q.QuotaState(), headers).to_json())
    assert state.primary is not None and state.primary.source == "headers"


def make_pool(strategy: str = "headroom") -> Pool:
    pool = Pool(strategy=strategy, clock=UnixClock())
    pool.sync([record("a", 1), record("b", 2), record("c", 3)])
    return pool


def usage(used: float, reset_at: float) -> dict[str, object]:
    window = {"used_percent": used, "limit_window_seconds": 18000, "reset_at": reset_at}
    return {"plan_type": "plus", "rate_limit": {"primary_window": window}}


async def test_stale_poll_does_not_reopen_a_429_and_the_lock_lifts_at_resets_at(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = make_pool("fill_first")
    now = pool.clock.now()
    pool.mark_exhausted("a", now + 600)
    await trio.sleep(10)
    # a poll sent after the 429 says "a" is at 0 %: fresher, yet the lock holds
    pool.learn_usage("a", usage(0, now + 600), pool.clock.now())
    decision = pool.select(RequestInfo())
    assert decision.chosen == "b"
    assert ("a", f"usage_limit until {int(now + 600)}") in decision.excluded
    await trio.sleep(589)
    assert pool.select(RequestInfo()).chosen == "b"
    await trio.sleep(1)  # now == resets_at
    assert pool.clock.now() == now + 600
    assert pool.select(RequestInfo()).chosen == "a"


async def test_routing_prefers_headroom_and_reset_drain_prefers_the_soonest_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = make_pool("headroom")
    now = pool.clock.now()
    pool.learn_usage("a", usage(70, now + 100), now)
    pool.learn_usage("b", usage(20, now + 9000), now)
    pool.learn_usage("c", usage(50, now + 4000), now)
    decision = pool.select(RequestInfo())
    assert decision.chosen == "b"
    figures = {c["account"]: c for c in decision.record()["candidates"]}
    assert figures["a"]["headroom"] == 30.0 and figures["a"]["source"] == "poll"
    assert figures["a"]["next_reset"] == now + 100 and figures["a"]["age"] == 0.0
    pool.strategy = "reset_drain"
    assert pool.select(RequestInfo()).chosen == "a"
    pool.learn_headers("a", [("x-codex-primary-used-percent", "100")])
    assert pool.select(RequestInfo()).chosen == "c"  # a is full until its reset
    await trio.sleep(100)  # a's window rolled over: nothing of it is about to be lost
    decision = pool.select(RequestInfo())
    assert decision.chosen == "c" and ("a", "usage_limit until") not in decision.excluded
    assert {c.account_id for c in decision.candidates} == {"a", "b", "c"}


async def test_a_reimport_is_a_fresh_start(autojump_clock: trio.testing.MockClock) -> None:
    pool = make_pool("fill_first")
    pool.mark_exhausted("a", pool.clock.now() + 600)
    pool.take_fresh()
    assert pool.select(RequestInfo()).chosen == "b"
    pool.fresh_start("a")  # POST /api/accounts did it
    assert pool.select(RequestInfo()).chosen == "a"
    assert pool.take_fresh() == {"a"}  # polled at once


locks = st.builds(
    q.from_usage_limit,
    resets_at=st.one_of(st.none(), st.floats(T0 - 1000, T0 + 100_000)),
    at=st.floats(T0 - 1000, T0 + 100_000),
)


@given(
    steps=st.lists(
        st.tuples(
            st.one_of(non_lock, locks, st.none(), st.sampled_from(["active", "deactivated"])),
            st.floats(0, 150_000),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_what_routing_reads_is_always_what_the_quota_says_now(
    steps: list[tuple[q.Observation | str | None, float]],
) -> None:
    """``Account.route`` keeps its figures between decisions; whatever happens (signals
    folded in, the account's state changing, windows resetting, locks ending, time passing
    in any order), they are the ones ``availability`` and ``headroom`` give at that
    moment."""
    pool = Pool(clock=UnixClock())
    pool.sync([record("a", 0.0)])
    account = pool.accounts["a"]
    for change, offset in steps:
        if isinstance(change, str):
            pool.set_state("a", change, None)
        elif change is not None:
            pool.observe("a", change)
        now = T0 - 1000 + offset
        assert account.route(now) == (account.availability(now), account.quota.headroom(now))
        assert account.route(now) == (account.availability(now), account.quota.headroom(now))
