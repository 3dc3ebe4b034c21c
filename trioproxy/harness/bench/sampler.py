"""The process sampler: CPU seconds, RSS, open descriptors and connections of the proxy (and
the mock) over time, plus the machine's load average and the CPU time its hypervisor took
away (steal), read with psutil and from ``/proc``.

One task samples every ``interval`` seconds into a list; scenarios mark their phases
(``phase(label)``) and the report slices the samples by phase. A sample is a few reads of
``/proc``, cheap next to the interval between two.
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
    steal: int = 0  # the machine's steal ticks so far (/proc/stat), and all its ticks
    ticks: int = 0


def machine_ticks() -> tuple[int, int]:
    """(steal, all) CPU ticks of the machine since boot, from ``/proc/stat``; (0, 0) where
    there is none. Steal is time a virtual machine's CPUs were ready to run and the host ran
    something else: work the load average does not show."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        values = [int(v) for v in fields[1:9]]
    except (OSError, ValueError):
        return 0, 0
    if len(values) < 8:
        return 0, 0
    return values[7], sum(values)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds the process has run, all its threads. psutil's user + system time counts
    10 ms clock ticks, so a short phase can read as no CPU at all; the main thread (the
    event loop, nearly all of a trio process's work) is read in nanoseconds from
    ``/proc/PID/schedstat`` instead where Linux has it. The other threads keep their ticks,
    exited ones included, so the figure never goes backwards by more than a tick."""
    times = process.cpu_times()
    total = float(times.user + times.system)
    try:
        with open(f"/proc/{process.pid}/schedstat") as f:
            main_ns = int(f.read().split()[0])
        with open(f"/proc/{process.pid}/task/{process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        main_ticks = (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return total
    return max(0.0, total - main_ticks) + main_ns / 1e9


_TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def read_process(process: psutil.Process) -> tuple[float, int, int]:
    cpu = cpu_seconds(process)
    with process.oneshot():
        return cpu, process.memory_info().rss, process.num_fds()


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
        own_cpu = cpu_seconds(self._own)
        steal, ticks = machine_ticks()
        sample = Sample(
            trio.current_time(),
            self.current,
            cpu,
            rss,
            fds,
            one_minute,
            mock_cpu,
            mock_rss,
            own_cpu,
            steal,
            ticks,
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
        if first.ticks:  # /proc/stat was read; a window shorter than one tick saw no steal
            ticks = last.ticks - first.ticks
            out["steal_pct"] = round(100 * (last.steal - first.steal) / ticks, 1) if ticks else 0.0
        if first.mock_cpu_s is not None and last.mock_cpu_s is not None:
            out["mock_cpu_s"] = round(last.mock_cpu_s - first.mock_cpu_s, 3)
            out["mock_cores"] = round((last.mock_cpu_s - first.mock_cpu_s) / wall, 3)
        out["bench_cores"] = round((last.bench_cpu_s - first.bench_cpu_s) / wall, 3)
        return out

    def windows(self, spans: list[tuple[float, float]]) -> dict[str, Any]:
        """``window`` over several spans (the rounds of one target): CPU seconds and wall
        time add up, RSS and descriptors are taken over all of them."""
        views = [v for v in (self.window(a, b) for a, b in spans) if v]
        if len(views) <= 1:
            return views[0] if views else {}
        walls = [b - a for a, b in spans]
        wall = max(1e-9, sum(walls))
        out: dict[str, Any] = {
            "cpu_s": round(sum(v["cpu_s"] for v in views), 3),
            "rss_start_mib": views[0]["rss_start_mib"],
            "rss_end_mib": views[-1]["rss_end_mib"],
            "rss_max_mib": max(v["rss_max_mib"] for v in views),
            "fds_start": views[0]["fds_start"],
            "fds_end": views[-1]["fds_end"],
            "fds_max": max(v["fds_max"] for v in views),
            "loadavg_max": max(v["loadavg_max"] for v in views),
        }
        out["cores"] = round(out["cpu_s"] / wall, 3)
        if all("steal_pct" in v for v in views):
            stolen = sum(v["steal_pct"] * w for v, w in zip(views, walls, strict=False))
            out["steal_pct"] = round(stolen / wall, 1)
        if all("mock_cpu_s" in v for v in views):
            out["mock_cpu_s"] = round(sum(v["mock_cpu_s"] for v in views), 3)
            out["mock_cores"] = round(out["mock_cpu_s"] / wall, 3)
        bench_cpu = sum(v["bench_cores"] * w for v, w in zip(views, walls, strict=False))
        out["bench_cores"] = round(bench_cpu / wall, 3)
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
