"""The process sampler: CPU seconds, RSS, open descriptors and connections of the proxy (and
the mock) over time, plus the machine's load average, read with psutil.

One task samples every ``interval`` seconds into a list; scenarios mark their phases
(``phase(label)``) and the report slices the samples by phase. Sampling is a few reads of
``/proc`` and costs well under a millisecond.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import attrs
import psutil
import trio


@attrs.frozen
class Sample:
    t: float  # trio clock
    phase: str
    cpu_s: float  # user + system seconds since the process started
    rss: int
    fds: int
    loadavg: float  # one-minute load average of the machine
    mock_cpu_s: float | None = None
    mock_rss: int | None = None
    bench_cpu_s: float = 0.0  # this process: the load generator


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def read_process(process: psutil.Process) -> tuple[float, int, int]:
    with process.oneshot():
        times = process.cpu_times()
        return times.user + times.system, process.memory_info().rss, process.num_fds()


def connections(pid: int, port: int) -> dict[str, int]:
    """The process's TCP connections: accepted on ``port`` (downstream) and the others
    (upstream, mostly pooled keep-alive connections to the mock)."""
    counts = {"downstream": 0, "upstream": 0}
    try:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status != psutil.CONN_ESTABLISHED:
                continue
            if conn.laddr and conn.laddr.port == port:
                counts["downstream"] += 1
            else:
                counts["upstream"] += 1
    except psutil.Error:
        pass
    return counts


@attrs.define(eq=False)
class Sampler:
    pid: int | None
    mock_pid: int | None = None
    interval: float = 0.25
    samples: list[Sample] = attrs.field(factory=list)
    current: str = "idle"
    _process: psutil.Process | None = None
    _mock: psutil.Process | None = None
    _own: psutil.Process = attrs.field(factory=psutil.Process)

    def __attrs_post_init__(self) -> None:
        if self.pid is not None:
            self._process = psutil.Process(self.pid)
        if self.mock_pid is not None:
            self._mock = psutil.Process(self.mock_pid)

    def phase(self, label: str) -> None:
        self.current = label
        self.sample()

    def sample(self) -> Sample | None:
        if self._process is None:
            return None
        try:
            cpu, rss, fds = read_process(self._process)
        except psutil.Error:
            return None
        mock_cpu = mock_rss = None
        if self._mock is not None:
            with contextlib.suppress(psutil.Error):
                mock_cpu, mock_rss, _ = read_process(self._mock)
        one_minute = float(loadavg().split()[0])
        own = self._own.cpu_times()
        sample = Sample(
            trio.current_time(),
            self.current,
            cpu,
            rss,
            fds,
            one_minute,
            mock_cpu,
            mock_rss,
            own.user + own.system,
        )
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        """Sample until cancelled."""
        if self._process is None:
            return
        while True:
            self.sample()
            await trio.sleep(self.interval)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def window(self, start: float, end: float) -> dict[str, Any]:
        """The proxy process between two instants: CPU seconds and cores used, RSS and
        descriptors at both ends and at most, and the load average seen."""
        inside = [s for s in self.samples if start <= s.t <= end]
        before = [s for s in self.samples if s.t < start]
        after = [s for s in self.samples if s.t > end]
        if before:
            inside = [before[-1], *inside]
        if after:
            inside = [*inside, after[0]]
        if len(inside) < 2:
            return {}
        first, last = inside[0], inside[-1]
        wall = max(1e-9, last.t - first.t)
        out: dict[str, Any] = {
            "cpu_s": round(last.cpu_s - first.cpu_s, 3),
            "cores": round((last.cpu_s - first.cpu_s) / wall, 3),
            "rss_start_mib": round(first.rss / 2**20, 2),
            "rss_end_mib": round(last.rss / 2**20, 2),
            "rss_max_mib": round(max(s.rss for s in inside) / 2**20, 2),
            "fds_start": first.fds,
            "fds_end": last.fds,
            "fds_max": max(s.fds for s in inside),
            "loadavg_max": max(s.loadavg for s in inside),
        }
        if first.mock_cpu_s is not None and last.mock_cpu_s is not None:
            out["mock_cpu_s"] = round(last.mock_cpu_s - first.mock_cpu_s, 3)
            out["mock_cores"] = round((last.mock_cpu_s - first.mock_cpu_s) / wall, 3)
        out["bench_cores"] = round((last.bench_cpu_s - first.bench_cpu_s) / wall, 3)
        return out

    def series(self) -> dict[str, list[Any]]:
        if not self.samples:
            return {}
        t0 = self.samples[0].t
        return {
            "t": [round(s.t - t0, 3) for s in self.samples],
            "phase": [s.phase for s in self.samples],
            "rss_mib": [round(s.rss / 2**20, 2) for s in self.samples],
            "cpu_s": [round(s.cpu_s, 3) for s in self.samples],
            "fds": [s.fds for s in self.samples],
            "loadavg": [s.loadavg for s in self.samples],
        }
