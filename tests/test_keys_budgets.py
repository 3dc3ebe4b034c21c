"""Budget windows across their resets, under ``trio.testing.MockClock``: the key ring (the
server's enforcement) charging requests and refusing them until the window frees, with its
counters written to and restored from a real store."""

from __future__ import annotations

import calendar
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trioproxy.accounts.pool import UnixClock
from trioproxy.keys.ring import Client, KeyRing
from trioproxy.protocol.errors import ProxyError
from trioproxy.reqlog import RequestRecord
from trioproxy.store import Store

#: Monday 2 March 2026, 20:00 UTC
T0 = float(calendar.timegm((2026, 3, 2, 20, 0, 0)))


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()  # moves only when a test jumps it


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store.open(f"sqlite:///{tmp_path / 'keys.db'}", data_dir=tmp_path) as opened:
        yield opened


def record(key_id: str, tokens: tuple[int, int] = (10, 5)) -> RequestRecord:
    done = RequestRecord(0.0, "req", "/backend-api/codex/responses", "http", started=0.0)
    done.key_id, done.account_id, done.model, done.status = key_id, "acct-1", "gpt-5.5", 200
    done.input_tokens, done.output_tokens = tokens
    return done


async def ring_at(store: Store, when: float) -> KeyRing:
    ring = KeyRing(store, UnixClock(offset=when - trio.current_time()))
    await ring.load()
    return ring


def refusal(ring: KeyRing, key_id: str) -> dict[str, Any] | None:
    try:
        Client(key_id, ring.keys[key_id]).check("gpt-5.5", None, ring.clock.now())
    except ProxyError as exc:
        assert exc.status == 429
        return {**exc.body["error"], "retry_after": int(dict(exc.headers)["retry-after"])}
    return None


async def test_a_rolling_window_frees_when_its_oldest_slot_leaves(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    key, _ = store.create_api_key("r", policy={"budgets": [{"window": "5h", "requests": 2}]})
    ring = await ring_at(store, T0)
    ring.charge(record(key.key_id))
    mock_clock.jump(3600)
    ring.charge(record(key.key_id))
    refused = refusal(ring, key.key_id)
    assert refused is not None and refused["code"] == "key_budget_exceeded"
    assert refused["budget"] == "5h/rolling" and refused["limit"] == "requests"
    assert refused["retry_after"] == 4 * 3600  # the first request leaves the window at T0+5h
    mock_clock.jump(4 * 3600 - 1)
    assert refusal(ring, key.key_id) is not None
    mock_clock.jump(1)
    assert refusal(ring, key.key_id) is None
    ring.charge(record(key.key_id))  # two in the window again: the second one's slot frees next
    assert refusal(ring, key.key_id)["retry_after"] == 3600  # type: ignore[index]


@pytest.mark.parametrize(
    ("window", "frees_at"),
    [
        ("daily", calendar.timegm((2026, 3, 3, 0, 0, 0))),
        ("weekly", calendar.timegm((2026, 3, 9, 0, 0, 0))),  # the next Monday
        ("monthly", calendar.timegm((2026, 4, 1, 0, 0, 0))),
    ],
)
async def test_a_calendar_window_starts_again_at_its_utc_boundary(
    store: Store, mock_clock: trio.testing.MockClock, window: str, frees_at: int
) -> None:
    policy = {"budgets": [{"window": window, "reset": "calendar", "tokens": 100}]}
    key, _ = store.create_api_key("c", policy=policy)
    ring = await ring_at(store, T0)
    for _ in range(6):
        ring.charge(record(key.key_id))  # 15 tokens each: 90, under the limit
    assert refusal(ring, key.key_id) is None
    ring.charge(record(key.key_id))  # 105: spent
    refused = refusal(ring, key.key_id)
    assert refused is not None and refused["limit"] == "tokens"
    assert refused["resets_at"] == frees_at and refused["retry_after"] == frees_at - T0
    mock_clock.jump(frees_at - T0 - 1)
    assert refusal(ring, key.key_id) is not None
    mock_clock.jump(1)
    assert refusal(ring, key.key_id) is None
    assert ring.keys[key.key_id].budgets_view(ring.clock.now())[0]["used"]["tokens"] == 0


async def test_counters_survive_a_restart_and_new_budgets_start_from_stored_usage(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    key, _ = store.create_api_key(
        "p", policy={"budgets": [{"window": "5h", "requests": 3, "cost_usd": 100}]}
    )
    ring = await ring_at(store, T0)
    for _ in range(3):
        ring.charge(record(key.key_id))
    await ring.flush()
    # a new process (the same store) refuses the same way, and frees at the same time
    mock_clock.jump(60)
    restarted = await ring_at(store, T0 + 60)
    refused = refusal(restarted, key.key_id)
    assert refused is not None and refused["retry_after"] == 5 * 3600 - 60
    # a budget added later starts from the usage already stored for its window
    store.update_api_key(
        key.key_id, policy={"budgets": [{"window": "daily", "reset": "calendar", "tokens": 50}]}
    )
    await restarted.reload_if_changed()
    view = restarted.keys[key.key_id].budgets_view(restarted.clock.now())
    assert [b["window"] for b in view] == ["daily"]
    assert view[0]["used"]["tokens"] == 45 and view[0]["used"]["requests"] == 3
    restarted.charge(record(key.key_id))
    assert refusal(restarted, key.key_id)["limit"] == "tokens"  # type: ignore[index]


async def test_requests_refused_before_an_account_spend_nothing(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    key, _ = store.create_api_key("z", policy={"budgets": [{"window": "daily", "requests": 1}]})
    ring = await ring_at(store, T0)
    refused = record(key.key_id, (0, 0))
    refused.account_id, refused.status, refused.input_tokens = None, 429, None
    for _ in range(5):
        ring.charge(refused)
    assert refusal(ring, key.key_id) is None
    await ring.flush()
    (row,) = store.usage_report(
        since=None, until=None, key_id=key.key_id, account_id=None, model=None,
        group_by=("key",), bucket="total",
    )  # fmt: skip
    assert row["requests"] == 5 and row["errors"] == 5  # logged as usage, not spent
    # and a budget added later does not start from them either
    assert store.key_usage_by_hour(key.key_id, T0 - 1) == []
