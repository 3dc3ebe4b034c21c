"""The Prometheus exposition of admission statistics, parsed back with prometheus_client."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from trioproxy.admission import AccountCaps, Admission, Overloaded
from trioproxy.metrics import CONTENT_TYPE, render_metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """``({family: type}, {(sample name, sorted labels): value})``."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, key
            samples[key] = sample.value
    return types, samples


def make_admission() -> Admission:
    return Admission(
        lanes={
            "proxy_http": (3, 0.0),
            "proxy_websocket": (2, 0.0),
            "compact": (1, 0.0),
            "dashboard": (4, 0.0),
        },
        account_caps=AccountCaps(streams=2, creates=1, wait=0.0, fail_fast=True),
        work={"refresh": 1, "connect": 5, "create": 6},
    )


async def test_render_metrics_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    admission = make_admission()
    ws = admission.lane("proxy_websocket")
    async with ws.lease(), ws.lease():
        with pytest.raises(Overloaded):
            async with ws.lease():
                pass
    async with (
        admission.lane("proxy_http").lease(),
        admission.account_slot("acct-1", "stream"),
        admission.account_slot("acct-1", "create"),
        admission.account_slot('acct-"2"\\x', "stream"),
        admission.work("connect"),
    ):
        with pytest.raises(Overloaded):
            async with admission.account_slot("acct-1", "create"):
                pass
        text = render_metrics(admission.statistics(), {"trioproxy_sessions_open": 7, "up": 1})

    types, samples = parse(text)
    for name in ("in_use", "limit", "waiting"):
        assert types[f"trioproxy_lane_{name}"] == "gauge"
        assert f"# TYPE trioproxy_lane_{name} gauge" in text
        assert f"# HELP trioproxy_lane_{name} " in text
    for name in ("admitted", "rejected"):
        assert types[f"trioproxy_lane_{name}"] == "counter"
        assert f"# TYPE trioproxy_lane_{name}_total counter" in text
    assert types["trioproxy_account_in_flight"] == "gauge"
    assert types["trioproxy_sessions_open"] == "gauge"

    def lane(metric: str, name: str) -> float:
        return samples[(f"trioproxy_lane_{metric}", (("lane", name),))]

    assert lane("limit", "proxy_http") == 3
    assert lane("in_use", "proxy_http") == 1
    assert lane("in_use", "proxy_websocket") == 0
    assert lane("limit", "proxy_websocket") == 2
    assert lane("admitted_total", "proxy_websocket") == 2
    assert lane("rejected_total", "proxy_websocket") == 1
    assert lane("waiting", "dashboard") == 0
    assert lane("limit", "work:connect") == 5
    assert lane("in_use", "work:connect") == 1
    assert lane("in_use", "work:refresh") == 0
    lanes = {dict(labels)["lane"] for (name, labels) in samples if name == "trioproxy_lane_limit"}
    assert lanes == {
        "proxy_http",
        "proxy_websocket",
        "compact",
        "dashboard",
        "work:refresh",
        "work:connect",
        "work:create",
    }

    def account(metric: str, account_id: str, kind: str) -> float:
        key = (f"trioproxy_account_{metric}", (("account", account_id), ("kind", kind)))
        return samples[key]

    assert account("in_flight", "acct-1", "stream") == 1
    assert account("in_flight", "acct-1", "create") == 1
    assert account("in_flight", 'acct-"2"\\x', "stream") == 1  # label escaping survives
    assert account("in_flight", 'acct-"2"\\x', "create") == 0
    assert account("waiting", "acct-1", "stream") == 0
    assert samples[("trioproxy_account_rejected_total", (("kind", "create"),))] == 1
    assert samples[("trioproxy_account_admitted_total", (("kind", "stream"),))] == 2
    assert samples[("trioproxy_account_limit", (("kind", "stream"),))] == 2
    assert samples[("trioproxy_sessions_open", ())] == 7
    assert samples[("up", ())] == 1


async def test_idle_accounts_disappear_from_metrics() -> None:
    admission = make_admission()
    async with admission.account_slot("acct-1", "stream"):
        pass
    _, samples = parse(render_metrics(admission.statistics()))
    assert not [key for key in samples if key[0] == "trioproxy_account_in_flight"]
    assert samples[("trioproxy_account_admitted_total", (("kind", "stream"),))] == 1
    assert samples[("trioproxy_lane_in_use", (("lane", "proxy_http"),))] == 0


def test_extra_gauge_names_are_checked() -> None:
    stats = make_admission().statistics()
    for bad in (
        "has space",
        "9starts_with_digit",
        "trioproxy_lane_in_use",
        "trioproxy_lane_admitted",
    ):
        with pytest.raises(ValueError):
            render_metrics(stats, {bad: 1.0})
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
