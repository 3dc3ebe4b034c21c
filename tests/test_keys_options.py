"""Budget specs, expiry times and policy changes as the API and the CLI read them
(``trioproxy/keys/options.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from trioproxy.keys.options import (
    checked_policy,
    expand_budget_specs,
    format_budget_spec,
    parse_budget_spec,
    parse_when,
    policy_change,
)
from trioproxy.keys.policy import PolicyError

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
JAN_31_2030 = 1_896_048_000.0  # 2030-01-31T00:00:00Z


@pytest.mark.parametrize(
    ("spec", "budget"),
    [
        ("5h:tokens=2000000,requests=500", {"window": "5h", "tokens": 2000000, "requests": 500}),
        (
            "monthly:calendar:cost_usd=50",
            {"window": "monthly", "reset": "calendar", "cost_usd": 50},
        ),
        (
            "daily:rolling:output_tokens=100000",
            {"window": "daily", "reset": "rolling", "output_tokens": 100000},
        ),
        ("weekly:cost_usd=12.5", {"window": "weekly", "cost_usd": 12.5}),
        (
            "daily:tokens=100k,input_tokens=2M",
            {"window": "daily", "tokens": 100000, "input_tokens": 2000000},
        ),
        ("daily:tokens=1.5M", {"window": "daily", "tokens": 1500000}),
        ("daily:tokens=2_000_000", {"window": "daily", "tokens": 2000000}),
        (
            " 5h : reasoning_tokens = 10 , cached_input_tokens=5 ",
            {"window": "5h", "reasoning_tokens": 10, "cached_input_tokens": 5},
        ),
        ("daily:cost_usd=.5", {"window": "daily", "cost_usd": 0.5}),
    ],
)
def test_budget_specs_are_read(spec: str, budget: dict[str, Any]) -> None:
    read = parse_budget_spec(spec)
    assert read == budget
    assert [type(value) for value in read.values()] == [type(value) for value in budget.values()]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "is not a budget"),
        ("5h", "is not a budget"),
        ("5h:", "is not a budget"),
        (":tokens=5", "is not a budget"),
        ("6h:tokens=5", "the window is one of 5h, daily, weekly, monthly, not '6h'"),
        ("daily:sliding:tokens=5", "the reset is rolling or calendar, not 'sliding'"),
        ("daily:tokens", "'tokens' is not LIMIT=VALUE"),
        ("daily:=5", "'=5' is not LIMIT=VALUE"),
        ("daily:tokens=5,", "'' is not LIMIT=VALUE"),
        ("daily:words=5", "the limit is one of requests, tokens, input_tokens"),
        ("daily:tokens=5,tokens=6", "tokens is given twice"),
        ("daily:tokens=-1", "tokens=-1 is not a positive number"),
        ("daily:tokens=lots", "tokens=lots is not a positive number"),
        ("daily:tokens=5G", "tokens=5G is not a positive number"),
        ("daily:tokens=inf", "tokens=inf is not a positive number"),
        ("a:b:c:tokens=5", "the window is one of"),
    ],
)
def test_bad_budget_specs_are_refused_with_the_reason(spec: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_budget_spec(spec)
    assert says in str(caught.value)
    assert repr(spec.strip()) in str(caught.value)


@pytest.mark.parametrize(
    "budget",
    [
        {"window": "5h", "reset": "rolling", "requests": 500, "tokens": 2000000},
        {"window": "monthly", "reset": "calendar", "cost_usd": 50.0},
        {"window": "daily", "reset": "rolling", "output_tokens": 1500, "reasoning_tokens": 7},
        {"window": "weekly", "reset": "calendar", "cost_usd": 0.25, "input_tokens": 3000000},
    ],
)
def test_a_formatted_spec_reads_back_to_the_same_budget(budget: dict[str, Any]) -> None:
    spec = format_budget_spec(budget)
    assert checked_policy({"budgets": [spec]}) == {"budgets": [budget]}


def test_formatted_specs_are_short() -> None:
    assert (
        format_budget_spec({"window": "5h", "reset": "rolling", "requests": 500, "tokens": 2000000})
        == "5h:requests=500,tokens=2M"
    )
    assert format_budget_spec({"window": "monthly", "reset": "calendar", "cost_usd": 50.0}) == (
        "monthly:cost_usd=50"
    )
    assert format_budget_spec({"window": "daily", "reset": "rolling", "tokens": 1500}) == (
        "daily:rolling:tokens=1500"
    )
    assert format_budget_spec({"window": "weekly", "tokens": 3000}) == "weekly:tokens=3k"


@pytest.mark.parametrize(
    ("value", "moment"),
    [
        (1_800_000_000, 1_800_000_000.0),
        (1_800_000_000.5, 1_800_000_000.5),
        ("1800000000", 1_800_000_000.0),
        ("2030-01-31", JAN_31_2030),
        ("2030-01-31T18:00", JAN_31_2030 + 18 * 3600),
        ("2030-01-31T18:00:00Z", JAN_31_2030 + 18 * 3600),
        ("2030-01-31T18:00+02:00", JAN_31_2030 + 16 * 3600),
        ("2030-01-31 18:00:30", JAN_31_2030 + 18 * 3600 + 30),
        ("45s", NOW + 45),
        ("90m", NOW + 90 * 60),
        ("12h", NOW + 12 * 3600),
        ("30d", NOW + 30 * 86400),
        ("2w", NOW + 14 * 86400),
        ("1.5D", NOW + 1.5 * 86400),
        (" 7d ", NOW + 7 * 86400),
        ("1000", 1000.0),  # in the past: the caller judges that
    ],
)
def test_times_are_read(value: object, moment: float) -> None:
    assert parse_when(value, NOW) == moment


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("soon", "is not a time; use unix seconds"),
        ("2030-02-30", "is not a time"),
        ("", "is not a time"),
        ("30y", "is not a time"),
        ("0d", "a span from now is longer than zero"),
        (True, "is not a time"),
        (None, "is not a time"),
        ([1], "is not a time"),
        (0, "is not a time from 1970 to 9999"),
        (-5, "is not a time from 1970 to 9999"),
        ("-5", "is not a time from 1970 to 9999"),
        (float("nan"), "is not a time from 1970 to 9999"),
        (float("inf"), "is not a time from 1970 to 9999"),
        (1e12, "is not a time from 1970 to 9999"),
        ("0001-01-01", "is not a time from 1970 to 9999"),
    ],
)
def test_bad_times_are_refused(value: object, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_when(value, NOW)
    assert says in str(caught.value)


def test_checked_policy_normalizes_and_reads_specs() -> None:
    assert checked_policy(None) is None
    assert checked_policy({}) is None
    assert checked_policy(
        {
            "accounts": ["b", "a"],
            "budgets": ["5h:tokens=1M", {"window": "daily", "requests": 3}],
            "max_reasoning_effort": "low",
        }
    ) == {
        "max_reasoning_effort": "low",
        "budgets": [
            {"window": "5h", "reset": "rolling", "tokens": 1000000},
            {"window": "daily", "reset": "calendar", "requests": 3},
        ],
        "accounts": ["a", "b"],
    }
    assert expand_budget_specs({"models": ["x"]}) == {"models": ["x"]}
    assert expand_budget_specs(["not", "a", "policy"]) == ["not", "a", "policy"]


@pytest.mark.parametrize(
    ("policy", "param"),
    [
        ({"budgets": ["5h:tokens=1", "6h:tokens=1"]}, "budgets[1]"),
        ({"budgets": ["5h:calendar:tokens=1"]}, "budgets[0].reset"),
        ({"budgets": ["daily:tokens=0.5"]}, "budgets[0].tokens"),
        ({"budgets": ["daily:tokens=1", "daily:requests=2"]}, "budgets"),
        ({"budgets": [7]}, "budgets[0]"),
        ({"models": ["re:("]}, "models[0]"),
        ({"colour": 1}, "colour"),
        ("everything", "policy"),
    ],
)
def test_checked_policy_names_the_field_it_refuses(policy: object, param: str) -> None:
    with pytest.raises(PolicyError) as caught:
        checked_policy(policy)
    assert caught.value.param == param


def test_policy_change_from_cli_options() -> None:
    assert policy_change() == {}
    assert policy_change(
        models=["gpt-5*", "re:^o3$"],
        max_effort="high",
        budgets=["5h:tokens=2M", "monthly:calendar:cost_usd=50"],
        max_sessions=2,
        max_requests=4,
        accounts=["acct-1"],
    ) == {
        "models": ["gpt-5*", "re:^o3$"],
        "max_reasoning_effort": "high",
        "budgets": [
            {"window": "5h", "tokens": 2000000},
            {"window": "monthly", "reset": "calendar", "cost_usd": 50},
        ],
        "max_sessions": 2,
        "max_requests": 4,
        "accounts": ["acct-1"],
    }
    # the JSON's fields first, then the options over them; clearing sets a field to null
    assert policy_change(
        policy_json='{"max_sessions": 3, "accounts": null, "models": ["a"]}',
        max_sessions=5,
        clear_models=True,
        clear_budgets=True,
    ) == {"max_sessions": 5, "accounts": None, "models": None, "budgets": None}
    assert policy_change(models=["b"], clear_models=True) == {"models": ["b"]}


@pytest.mark.parametrize(
    ("options", "param", "says"),
    [
        ({"policy_json": "{"}, "policy", "--policy-json is not JSON"),
        ({"policy_json": "[1]"}, "policy", "--policy-json is a JSON object"),
        ({"budgets": ["5h:tokens=1", "daily"]}, "budgets[1]", "'daily' is not a budget"),
    ],
)
def test_policy_change_refuses_what_it_cannot_read(
    options: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        policy_change(**options)
    assert caught.value.param == param and says in str(caught.value)
