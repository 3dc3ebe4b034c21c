"""What one run of a scenario against one target records: HDR histograms of time to first
byte and turn latency, counters, errors by code, and a per-second time series.

Everything here is plain bookkeeping (no I/O); times are trio's clock in seconds, stored in
the histograms as microseconds.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import attrs
from hdrh.histogram import HdrHistogram

HIGHEST_US = 600_000_000  # ten minutes
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CDF_POINTS = (
    *(float(p) for p in range(0, 90, 2)),
    *(90 + p / 2 for p in range(0, 18)),
    99.0,
    99.5,
    99.9,
    99.99,
    100.0,
)


@attrs.define(eq=False)
class Latency:
    """One latency distribution (microsecond resolution, 3 significant digits)."""

    hist: HdrHistogram = attrs.field(factory=lambda: HdrHistogram(1, HIGHEST_US, 3))

    def record(self, seconds: float) -> None:
        self.hist.record_value(min(HIGHEST_US, max(1, round(seconds * 1e6))))

    @property
    def count(self) -> int:
        return int(self.hist.get_total_count())

    def percentile_ms(self, p: float) -> float:
        return float(self.hist.get_value_at_percentile(p)) / 1000.0

    def summary(self) -> dict[str, Any]:
        """``{"count", "mean", "p50", "p90", "p99", "p99.9", "max"}`` in milliseconds."""
        if self.count == 0:
            return {"count": 0}
        out: dict[str, Any] = {
            "count": self.count,
            "mean": round(float(self.hist.get_mean_value()) / 1000.0, 3),
        }
        for p in PERCENTILES:
            out[f"p{p:g}"] = round(self.percentile_ms(p), 3)
        out["max"] = round(float(self.hist.get_max_value()) / 1000.0, 3)
        return out

    def cdf_ms(self) -> list[tuple[float, float]]:
        """(milliseconds, percentile) points for a CDF plot."""
        if self.count == 0:
            return []
        return [(round(self.percentile_ms(p), 3), p) for p in CDF_POINTS]


@attrs.define(eq=False)
class RunStats:
    """Counters of one scenario run against one target (``proxy`` or ``direct``)."""

    scenario: str
    target: str
    started: float = 0.0
    ended: float = 0.0
    ttfb: Latency = attrs.field(factory=Latency)
    latency: Latency = attrs.field(factory=Latency)
    extra: dict[str, Latency] = attrs.field(factory=dict)
    turns: int = 0
    events: int = 0
    bytes: int = 0
    sessions: int = 0
    abandoned: int = 0
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    overload_rejections: int = 0
    per_second: dict[int, list[int]] = attrs.field(factory=dict)  # second -> [turns, events]
    notes: dict[str, Any] = attrs.field(factory=dict)
    # the phases merged into this one (rounds): (started, ended) of each, in order
    windows: list[tuple[float, float]] = attrs.field(factory=list)

    def _slot(self, now: float) -> list[int]:
        second = max(0, int(now - self.started))
        slot = self.per_second.get(second)
        if slot is None:
            slot = self.per_second[second] = [0, 0]
        return slot

    def turn_done(self, now: float, events: int, nbytes: int) -> None:
        self.turns += 1
        self.events += events
        self.bytes += nbytes
        slot = self._slot(now)
        slot[0] += 1
        slot[1] += events

    def events_seen(self, now: float, events: int) -> None:
        """Events of a turn that did not complete (they were relayed all the same)."""
        self.events += events
        self._slot(now)[1] += events

    def error(self, code: str, *, overload: bool = False) -> None:
        self.errors[code] += 1
        if overload:
            self.overload_rejections += 1

    def latency_of(self, name: str) -> Latency:
        found = self.extra.get(name)
        if found is None:
            found = self.extra[name] = Latency()
        return found

    @property
    def wall(self) -> float:
        if self.windows:
            return max(1e-9, sum(end - start for start, end in self.windows))
        return max(1e-9, self.ended - self.started)

    def merge(self, other: RunStats) -> None:
        """Add a later phase of the same scenario and target (a round): histograms and
        counters add up, its seconds follow this run's in the time series, and the wall
        time is the sum of the phases' (not the time between them)."""
        if not self.windows:
            self.windows.append((self.started, self.ended))
        offset = math.ceil(self.wall)
        self.windows.append((other.started, other.ended))
        self.ended = other.ended
        self.ttfb.hist.add(other.ttfb.hist)
        self.latency.hist.add(other.latency.hist)
        for name, lat in other.extra.items():
            self.latency_of(name).hist.add(lat.hist)
        self.turns += other.turns
        self.events += other.events
        self.bytes += other.bytes
        self.sessions += other.sessions
        self.abandoned += other.abandoned
        self.errors.update(other.errors)
        self.overload_rejections += other.overload_rejections
        for second, (turns, events) in other.per_second.items():
            slot = self.per_second.setdefault(offset + second, [0, 0])
            slot[0] += turns
            slot[1] += events
        self.notes.setdefault("rounds", 1)
        self.notes["rounds"] += 1
        self.notes["loadavg_end"] = other.notes.get("loadavg_end")

    def summary(self) -> dict[str, Any]:
        # every second of the run, the quiet ones included
        seconds = list(range(max(self.per_second) + 1)) if self.per_second else []
        return {
            "scenario": self.scenario,
            "target": self.target,
            "wall_s": round(self.wall, 3),
            "turns": self.turns,
            "turns_per_s": round(self.turns / self.wall, 2),
            "events": self.events,
            "events_per_s": round(self.events / self.wall, 1),
            "bytes": self.bytes,
            "sessions": self.sessions,
            "abandoned": self.abandoned,
            "errors": dict(sorted(self.errors.items())),
            "error_count": sum(self.errors.values()),
            "overload_rejections": self.overload_rejections,
            "ttfb_ms": self.ttfb.summary(),
            "turn_latency_ms": self.latency.summary(),
            "extra_ms": {name: lat.summary() for name, lat in sorted(self.extra.items())},
            "cdf": {
                "ttfb_ms": self.ttfb.cdf_ms(),
                "turn_latency_ms": self.latency.cdf_ms(),
            },
            "timeseries": {
                "second": seconds,
                "turns": [self.per_second.get(s, (0, 0))[0] for s in seconds],
                "events": [self.per_second.get(s, (0, 0))[1] for s in seconds],
            },
            "notes": self.notes,
        }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)
