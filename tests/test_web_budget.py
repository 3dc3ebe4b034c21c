"""The request-memory budget (web/budget.py), without sockets."""

from __future__ import annotations

import pytest

from trioproxy.web.budget import GIB, BudgetFull, ByteBudget, default_limit, memory_available


def test_a_reservation_grows_until_the_limit_and_gives_everything_back() -> None:
    budget = ByteBudget(100)
    with budget.reserve() as one, budget.reserve() as two:
        one.grow(60)
        two.grow(40)
        with pytest.raises(BudgetFull):
            two.grow(1)  # refused, and charged nothing
        assert (one.held, two.held) == (60, 40)
        assert budget.statistics().held == 100
        assert budget.available() == 0
    stats = budget.statistics()
    assert (stats.held, stats.peak, stats.refused_total, stats.reservations) == (0, 100, 1, 0)


def test_a_reservation_is_given_back_when_its_block_fails() -> None:
    budget = ByteBudget(10)
    with pytest.raises(RuntimeError), budget.reserve() as reservation:
        reservation.grow(10)
        raise RuntimeError("the holder failed")
    assert budget.statistics().held == 0
    with pytest.raises(RuntimeError, match="given back"):
        reservation.grow(1)  # a reservation outlives its block only as a record


def test_a_grow_past_the_limit_never_takes_the_budget_over_it() -> None:
    budget = ByteBudget(1000)
    with budget.reserve() as reservation:
        for _ in range(100):
            try:
                reservation.grow(37)
            except BudgetFull as exc:
                assert exc.held + exc.wanted > exc.limit
        assert budget.statistics().peak <= 1000


def test_the_default_limit_is_an_eighth_of_memory_at_most_one_gib() -> None:
    assert 0 < default_limit() <= GIB
    assert default_limit() == min(GIB, memory_available() // 8)
    with pytest.raises(ValueError):
        ByteBudget(0)
