"""Prometheus text exposition of the admission statistics (``GET /metrics``).

Theory of operation
-------------------
Nothing here keeps state: :func:`render_metrics` takes one frozen
:class:`~trioproxy.admission.AdmissionStatistics` snapshot (plus any extra gauges the caller
read from other components' ``statistics()``), wraps it in a throw-away collector on a private
:class:`prometheus_client.CollectorRegistry` and renders it with
:func:`prometheus_client.generate_latest`. The process-global default registry is never
touched, so tests and several apps in one process cannot collide.

Request lanes and work lanes share the ``trioproxy_lane_*`` families (label ``lane``:
``proxy_http``, ..., ``work:refresh``, ...). Per-account gauges are labelled ``account`` and
``kind``; only accounts with a slot held or waited for appear, so the label set stays bounded
by the accounts in use.

Error handling
--------------
An extra gauge whose name is not a valid Prometheus metric name, or that collides with one of
the families above, is a :class:`ValueError` (a programming error, not a scrape-time one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trioproxy.admission import AdmissionStatistics

__all__ = ["CONTENT_TYPE", "AdmissionCollector", "render_metrics"]

#: the Content-Type of :func:`render_metrics`' output (text format 0.0.4: every name used is a
#: classic Prometheus name, so no escaping scheme is needed).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")

_RESERVED = frozenset(
    {
        "trioproxy_lane_in_use",
        "trioproxy_lane_limit",
        "trioproxy_lane_waiting",
        "trioproxy_lane_admitted_total",
        "trioproxy_lane_rejected_total",
        "trioproxy_account_in_flight",
        "trioproxy_account_waiting",
        "trioproxy_account_limit",
        "trioproxy_account_admitted_total",
        "trioproxy_account_rejected_total",
    }
)
# a counter's family is named without "_total", so "x" and "x_total" would collide.
_RESERVED_FAMILIES = frozenset(name.removesuffix("_total") for name in _RESERVED)


class AdmissionCollector(Collector):
    """Yields the metric families of one admission snapshot and some extra gauges."""

    def __init__(
        self, stats: AdmissionStatistics, extra: Mapping[str, float] | None = None
    ) -> None:
        self.stats = stats
        self.extra = {name: float(value) for name, value in (extra or {}).items()}
        for name in self.extra:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a valid Prometheus metric name")
            if name.removesuffix("_total") in _RESERVED_FAMILIES:
                raise ValueError(f"extra gauge {name!r} collides with an admission metric")

    def collect(self) -> Iterable[Metric]:
        lanes = self.stats.all_lanes()
        by_lane = ["lane"]
        in_use = GaugeMetricFamily(
            "trioproxy_lane_in_use", "Slots of the lane held now.", labels=by_lane
        )
        limit = GaugeMetricFamily(
            "trioproxy_lane_limit", "Most slots the lane holds at once.", labels=by_lane
        )
        waiting = GaugeMetricFamily(
            "trioproxy_lane_waiting", "Tasks waiting for a slot of the lane.", labels=by_lane
        )
        admitted = CounterMetricFamily(
            "trioproxy_lane_admitted_total", "Leases granted by the lane.", labels=by_lane
        )
        rejected = CounterMetricFamily(
            "trioproxy_lane_rejected_total",
            "Leases refused by the lane (answered 429 proxy_overloaded).",
            labels=by_lane,
        )
        for lane in lanes:
            label = [lane.name]
            in_use.add_metric(label, lane.in_use)
            limit.add_metric(label, lane.limit)
            waiting.add_metric(label, lane.waiting)
            admitted.add_metric(label, lane.admitted_total)
            rejected.add_metric(label, lane.rejected_total)
        yield from (in_use, limit, waiting, admitted, rejected)

        by_account = ["account", "kind"]
        in_flight = GaugeMetricFamily(
            "trioproxy_account_in_flight",
            "Per-account slots held now (kind: stream or create).",
            labels=by_account,
        )
        account_waiting = GaugeMetricFamily(
            "trioproxy_account_waiting",
            "Tasks waiting for a per-account slot.",
            labels=by_account,
        )
        for account_id, account in sorted(self.stats.accounts.items()):
            in_flight.add_metric([account_id, "stream"], account.streams)
            in_flight.add_metric([account_id, "create"], account.creates)
            account_waiting.add_metric([account_id, "stream"], account.streams_waiting)
            account_waiting.add_metric([account_id, "create"], account.creates_waiting)
        yield from (in_flight, account_waiting)

        by_kind = ["kind"]
        account_limit = GaugeMetricFamily(
            "trioproxy_account_limit", "Per-account cap of each kind.", labels=by_kind
        )
        account_admitted = CounterMetricFamily(
            "trioproxy_account_admitted_total",
            "Per-account slots granted, all accounts.",
            labels=by_kind,
        )
        account_rejected = CounterMetricFamily(
            "trioproxy_account_rejected_total",
            "Per-account slots refused, all accounts.",
            labels=by_kind,
        )
        for kind, totals in self.stats.account_totals.items():
            account_limit.add_metric([kind], totals.limit)
            account_admitted.add_metric([kind], totals.admitted_total)
            account_rejected.add_metric([kind], totals.rejected_total)
        yield from (account_limit, account_admitted, account_rejected)

        for name, value in self.extra.items():
            yield GaugeMetricFamily(name, f"trioproxy gauge {name}.", value=value)


def render_metrics(stats: AdmissionStatistics, extra: Mapping[str, float] | None = None) -> str:
    """The Prometheus text exposition (format 0.0.4, see :data:`CONTENT_TYPE`) of ``stats``
    and of ``extra`` gauges given as ``{metric_name: value}``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AdmissionCollector(stats, extra))
    return generate_latest(registry).decode("utf-8")
