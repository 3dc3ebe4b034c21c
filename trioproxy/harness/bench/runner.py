"""``trioproxy bench``: start (or attach to) the stack, run the scenarios, write the report.

Shape: one nursery owns the mock and proxy processes, the sampler, the progress line and an
optional profiler; the scenarios run in the body and the nursery is cancelled at the end,
which stops every process (SIGTERM, then SIGKILL after five seconds).
"""

from __future__ import annotations

import datetime
import os
import random
import resource
import shlex
import shutil
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import trio

from trioproxy.harness.bench.config import BenchConfig
from trioproxy.harness.bench.phase import Bench, progress
from trioproxy.harness.bench.report import write_report
from trioproxy.harness.bench.sampler import Sampler, loadavg
from trioproxy.harness.bench.scenarios import SCENARIO_FUNCTIONS
from trioproxy.harness.bench.stack import Stack, attach_stack, start_stack


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to the hard one (idle opens thousands)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def proxy_options(config: BenchConfig) -> dict[str, Any]:
    """Options of the proxy started here: room for the idle scenario's sessions, an idle
    timeout longer than the run (the scenario holds sessions open on purpose), and bridge
    sessions that close two seconds after their last request, so that the gauges read after
    each phase show what is left over rather than sessions waiting for their idle TTL."""
    sessions = int(config.sessions or config.get("idle", "sessions"))
    options: dict[str, Any] = {
        "lane-proxy-websocket-limit": max(500, sessions + 200),
        "ws-idle-timeout": 3600,
        "bridge-idle-ttl": 2,
    }
    for item in config.proxy_option:  # the user's last
        name, _, value = item.partition("=")
        options[name.strip().replace("_", "-")] = value.strip()
    return options


async def _profile(
    pid: int,
    output: Path,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``py-spy record`` against the proxy until cancelled (SIGINT makes it write the file)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    async def interrupt(process: trio.Process) -> None:
        process.send_signal(signal.SIGINT)
        with trio.move_on_after(10):
            await process.wait()
        process.kill()

    log = (output.parent / (output.stem + ".log")).open("w")
    try:
        await trio.run_process(
            [py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
             "--output", str(output), "--nonblocking"],
            check=False,
            stdout=log,
            stderr=log,
            deliver_cancel=interrupt,
            task_status=task_status,
        )  # fmt: skip
    finally:
        log.close()


def top_frames(raw: Path, limit: int = 25) -> list[tuple[str, float, float]]:
    """From py-spy's collapsed stacks: (function, self %, total %) of the hottest frames."""
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            total_counts[frame] = total_counts.get(frame, 0) + count
    if not samples:
        return []
    ranked = sorted(self_counts.items(), key=lambda kv: -kv[1])[:limit]
    return [
        (frame, round(100 * n / samples, 2), round(100 * total_counts[frame] / samples, 2))
        for frame, n in ranked
    ]


def _meta(config: BenchConfig, argv: list[str] | None, fd_limit: int) -> dict[str, Any]:
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(argv or sys.argv),
        "config": config.view(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "loadavg_start": loadavg(),
        "fd_limit": fd_limit,
        "target": config.target or "trioproxy started by the bench",
    }


async def _open_stack(config: BenchConfig, nursery: trio.Nursery, logs: list[TextIO]) -> Stack:
    """The running proxy of ``--target``, or a mock and a proxy started in ``nursery``
    (their logs appended to ``logs``, for the caller to close)."""
    if config.target:
        return await attach_stack(
            config.target,
            mock_url=config.mock_url,
            api_key=config.api_key,
            proxy_pid=config.target_pid,
            path=config.path,
        )
    workdir = config.output / "stack"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    return await start_stack(
        nursery,
        workdir,
        accounts=config.accounts,
        proxy_options=proxy_options(config),
        logs=logs,
        path=config.path,
        keys=config.keys,
    )


async def _run_scenarios(bench: Bench, results: dict[str, Any]) -> None:
    """Each scenario in turn, the report rewritten after each; the proxy is profiled during
    the scenario ``--profile`` names."""
    config, stack = bench.config, bench.stack
    for name in config.scenarios:
        profiled = config.profile == name and stack.proxy_pid is not None
        raw = config.output / f"profile-{name}.txt"
        # the profiler lives exactly as long as its scenario
        async with trio.open_nursery() as scoped:
            if profiled:
                assert stack.proxy_pid is not None
                await scoped.start(partial(_profile, stack.proxy_pid, raw))
            results["scenarios"][name] = await SCENARIO_FUNCTIONS[name](bench)
            scoped.cancel_scope.cancel(reason="scenario finished")
        write_report(results, config.output)


async def run_bench(config: BenchConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the configured scenarios and write ``results.json``, ``summary.md`` and the plots
    into ``config.output``; returns the results."""
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in config.scenarios if s not in SCENARIO_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; known: {', '.join(SCENARIO_FUNCTIONS)}")
    if config.keys < 0 or (config.keys and config.target):
        raise ValueError("--keys: a count of 0 or more, for the proxy started by the bench")
    started = trio.current_time()
    results: dict[str, Any] = {"meta": _meta(config, argv, raise_fd_limit()), "scenarios": {}}
    logs: list[TextIO] = []
    stack: Stack | None = None
    try:
        async with trio.open_nursery() as nursery:
            stack = await _open_stack(config, nursery, logs)
            results["meta"].update(
                proxy=stack.proxy.root,
                direct=stack.direct.root if stack.direct and config.direct else None,
                proxy_pid=stack.proxy_pid,
                accounts=len(stack.accounts),
                proxy_data_dir=str(stack.data_dir) if stack.data_dir else None,
                keys=stack.keys,
                proxy_nokeys=stack.nokeys.root if stack.nokeys else None,
            )
            sampler = Sampler(stack.proxy_pid, stack.mock_pid)
            bench = Bench(config, stack, sampler, random.Random(config.seed))
            nursery.start_soon(sampler.run)
            if stack.nokeys_pid is not None:
                bench.nokeys_sampler = Sampler(stack.nokeys_pid, stack.mock_pid)
                nursery.start_soon(bench.nokeys_sampler.run)
            if config.progress:
                nursery.start_soon(progress, bench)
            await _run_scenarios(bench, results)
            if config.progress:
                sys.stderr.write("\n")
            results["process_series"] = sampler.series()
            nursery.cancel_scope.cancel(reason="bench finished")
    finally:
        if stack is not None and stack.mock is not None:
            await stack.mock.aclose()
        for log in logs:
            log.close()
    _finish(config, results, started)
    return results


def _finish(config: BenchConfig, results: dict[str, Any], started: float) -> None:
    """The profile's hottest frames, the end of the run, the plots and the final report."""
    output = config.output
    if config.profile and (output / f"profile-{config.profile}.txt").exists():
        results["profile"] = {
            "scenario": config.profile,
            "raw": f"profile-{config.profile}.txt",
            "top_self": top_frames(output / f"profile-{config.profile}.txt"),
        }
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["duration_s"] = round(trio.current_time() - started, 1)
    if config.plots:
        from trioproxy.harness.bench.plots import write_plots

        results["plots"] = write_plots(results, output)
    write_report(results, output)
