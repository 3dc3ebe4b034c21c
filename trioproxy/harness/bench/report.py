"""The report: ``results.json`` (everything measured), ``summary.md`` (the tables a person
reads) and the performance targets checked against the run's own direct baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets (``limit``), each with the measured value (None: not run)."""
    s = results.get("scenarios", {})
    rows: list[dict[str, Any]] = []

    def row(name: str, measured: Any, limit: str, met: bool | None) -> None:
        rows.append({"target": name, "measured": measured, "limit": limit, "met": met})

    p50 = _get(s, "sse", "derived", "ttfb_ms_p50_overhead")
    p99 = _get(s, "sse", "derived", "ttfb_ms_p99_overhead")
    conc = _get(s, "sse", "runs", "proxy", "notes", "concurrency")
    row(
        f"TTFB overhead p50 at {conc} concurrent SSE streams (ms, proxy - direct)",
        p50,
        "<= +2 ms",
        None if p50 is None else p50 <= 2.0,
    )
    row(
        f"TTFB overhead p99 at {conc} concurrent SSE streams (ms, proxy - direct)",
        p99,
        "<= +10 ms",
        None if p99 is None else p99 <= 10.0,
    )
    per_core = _get(s, "relay", "derived", "events_per_proxy_core_vs_direct")
    row(
        "relay events/s per proxy core / direct events/s",
        per_core,
        ">= 0.5",
        None if per_core is None else per_core >= 0.5,
    )
    kib = _get(s, "idle", "derived", "proxy_rss_per_session_kib")
    opened = _get(s, "idle", "derived", "sessions_open")
    row(
        f"RSS per open WebSocket session with its upstream socket ({opened} open, KiB)",
        kib,
        "<= 100 KiB at 2000 sessions",
        None if kib is None else (kib <= 100.0 and (opened or 0) >= 2000),
    )
    added = _get(s, "failover", "derived", "failover_ttfb_added_p50_ms")
    added99 = _get(s, "failover", "derived", "failover_ttfb_added_p99_ms")
    row(
        "TTFB added by failover after a 429, p50 (ms)",
        added,
        "<= 50 ms",
        None if added is None else added <= 50.0,
    )
    row(
        "TTFB added by failover after a 429, p99 (ms)",
        added99,
        "<= 50 ms",
        None if added99 is None else added99 <= 50.0,
    )
    zero = _get(s, "chaos", "derived", "gauges_zero")
    row("after chaos: every admission gauge at zero", zero, "true", zero)
    fds = _get(s, "chaos", "derived", "fds_at_baseline")
    excess = _get(s, "chaos", "derived", "fds_excess_without_pool")
    row(
        "after chaos: descriptors at baseline (excess, pooled upstream connections aside)",
        excess,
        "<= 0",
        fds,
    )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_fmt(item) for item in value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _pp(lat: dict[str, Any], p: str) -> str:
    return _fmt(lat.get(p)) if lat.get("count") else "-"


RUNS_HEADER = (
    "| scenario | target | conc. | turns | turns/s | events/s | TTFB p50 | TTFB p99 | turn p50 "
    "| turn p99 | errors | 429 overload | proxy cores | mock cores | bench cores "
    "| proxy RSS max MiB | load | steal % |"
)


def render_markdown(results: dict[str, Any]) -> str:
    """``summary.md``: the run, the targets, one row per run, then each scenario's details."""
    lines = _header(results.get("meta", {}))
    lines += _targets(results.get("targets", []))
    lines += _runs_table(results.get("scenarios", {}))
    lines += _keys_table(results.get("scenarios", {}))
    lines += _fronts_table(results.get("scenarios", {}))
    for name, scenario in results.get("scenarios", {}).items():
        lines += _scenario_section(name, scenario)
    plots = results.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _header(meta: dict[str, Any]) -> list[str]:
    return [
        "# trioproxy bench",
        "",
        f"- started: {meta.get('started')}, duration {_fmt(meta.get('duration_s'))} s",
        f"- machine: {meta.get('cpu_count')} CPUs; load average at start `{meta.get('loadavg_start')}`, "
        f"at end `{meta.get('loadavg_end')}` (other work on the machine shows here; compare "
        "proxy with direct inside one run, not runs with each other)",
        f"- target: {meta.get('target')}; direct baseline: {meta.get('direct')}",
        f"- command: `{meta.get('command')}`",
        "",
    ]


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "not run"}[row["met"]]
        lines.append(f"| {row['target']} | {_fmt(row['measured'])} | {row['limit']} | {met} |")
    return lines


def _runs_table(scenarios: dict[str, Any]) -> list[str]:
    lines = ["", "## Runs", "", RUNS_HEADER, "|---" * 18 + "|"]
    for name, scenario in scenarios.items():
        for target, run in scenario.get("runs", {}).items():
            if "skipped" in run:
                lines.append(f"| {name} | {target} | skipped: {run['skipped']} |" + " |" * 14)
            else:
                lines.append("| " + " | ".join(_run_cells(name, target, run)) + " |")
    lines += [
        "",
        "Times in milliseconds. `load` is the highest one-minute load average sampled; "
        "`steal %` the share of the machine's CPU time its hypervisor gave to others "
        "during the run (a virtual machine's hidden load).",
        "",
    ]
    return lines


def _run_cells(name: str, target: str, run: dict[str, Any]) -> list[str]:
    proc = run.get("process", {})
    return [
        name,
        target,
        _fmt(run.get("notes", {}).get("concurrency")),
        _fmt(run.get("turns")),
        _fmt(run.get("turns_per_s")),
        _fmt(run.get("events_per_s")),
        _pp(run.get("ttfb_ms", {}), "p50"),
        _pp(run.get("ttfb_ms", {}), "p99"),
        _pp(run.get("turn_latency_ms", {}), "p50"),
        _pp(run.get("turn_latency_ms", {}), "p99"),
        _fmt(run.get("error_count")),
        _fmt(run.get("overload_rejections")),
        _fmt(proc.get("cores")) if target != "direct" else "-",
        _fmt(proc.get("mock_cores")),
        _fmt(proc.get("bench_cores")),
        _fmt(proc.get("rss_max_mib")) if target != "direct" else "-",
        _fmt(proc.get("loadavg_max")),
        _fmt(proc.get("steal_pct")),
    ]


KEYS_FIGURES = (
    ("turns_per_s", "turns/s"),
    ("ttfb_ms_p50", "TTFB p50 ms"),
    ("ttfb_ms_p99", "TTFB p99 ms"),
    ("cpu_ms_per_turn", "proxy CPU ms per turn"),
)


def _keys_table(scenarios: dict[str, Any]) -> list[str]:
    """The proxy with API keys against the same proxy without (``--keys N``): per scenario
    and figure, both values and the ratio with keys / without."""
    rows = []
    keys = 0
    for name, scenario in scenarios.items():
        derived = scenario.get("derived", {})
        if "keys" not in derived:
            continue
        for figure, label in KEYS_FIGURES:
            rows.append(
                f"| {name} | {label} | {_fmt(derived.get(f'{figure}_nokeys'))} "
                f"| {_fmt(derived.get(f'{figure}_keys'))} "
                f"| {_fmt(derived.get(f'{figure}_keys_ratio'))} |"
            )
        keys = derived["keys"]
    if not rows:
        return []
    return [
        "## Key accounting",
        "",
        f"The proxy with {keys} API keys (each request authenticated, checked against its "
        "key's policy and budgets and charged to them) against the same proxy without keys, "
        "in alternating rounds of the same run.",
        "",
        f"| scenario | figure | keys=0 | keys={keys} | ratio keys={keys} / keys=0 |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


FRONT_FIGURES = (
    ("turns_per_s", "turns/s"),
    ("ttfb_ms_p50", "TTFB p50 ms"),
    ("ttfb_ms_p99", "TTFB p99 ms"),
    ("cpu_ms_per_turn", "proxy CPU ms per turn"),
    ("turn_latency_ms_p50", "turn p50 ms"),
    ("first_frame_ms_p50", "first frame p50 ms"),
)


def _fronts_table(scenarios: dict[str, Any]) -> list[str]:
    """The translated fronts (``chat``, ``messages``) against the proxy's Responses front:
    per scenario and figure, both values and the ratio front / Responses."""
    rows = []
    for name, scenario in scenarios.items():
        derived = scenario.get("derived", {})
        front = derived.get("front")
        if not front:
            continue
        for figure, label in FRONT_FIGURES:
            rows.append(
                f"| {name} | {label} | {_fmt(derived.get(f'{figure}_responses'))} "
                f"| {_fmt(derived.get(f'{figure}_{front}'))} "
                f"| {_fmt(derived.get(f'{figure}_ratio'))} |"
            )
    if not rows:
        return []
    return [
        "## Fronts",
        "",
        "The same streamed turns through the proxy's translated fronts (Chat Completions, "
        "Anthropic Messages) against its Responses front, in alternating rounds of the same "
        "run. TTFB is to the first content delta on both.",
        "",
        "| scenario | figure | Responses front | this front | ratio front / Responses |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def _shape_line(shape: dict[str, Any]) -> str:
    return (
        f"Upstream shape: {shape['deltas']} deltas x {shape['delta_bytes']} B, first event "
        f"after {shape['first_event_delay'] * 1000:g} ms, {shape['event_delay'] * 1000:g} ms between events"
        + (
            f", each delay within +/-{shape['latency_jitter'] * 100:g} %."
            if shape.get("latency_jitter")
            else "."
        )
    )


def _scenario_section(name: str, scenario: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    if scenario.get("shape"):
        lines += [_shape_line(scenario["shape"]), ""]
    if scenario.get("note"):
        lines += [scenario["note"], ""]
    derived = scenario.get("derived", {})
    if derived:
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in derived.items()]
        lines.append("")
    for target, run in scenario.get("runs", {}).items():
        lines += _run_notes(target, run)
    return lines


def _run_notes(target: str, run: dict[str, Any]) -> list[str]:
    """Errors, gauges, latency by turn kind and idle figures of one run."""
    lines: list[str] = []
    errors = run.get("errors")
    if errors:
        listed = ", ".join(f"`{k}` {v}" for k, v in errors.items())
        lines += [f"Errors ({target}): {listed}", ""]
    gauges = run.get("gauges")
    if gauges and gauges.get("available"):
        lines += [
            f"Admission gauges after the {target} run: "
            + ("all zero" if gauges.get("zero") else "**not zero**")
            + f" (waited {gauges.get('waited_s')} s)",
            "",
        ]
    extra = run.get("extra_ms", {})
    if extra:
        parts = [
            f"{k} p50 {_pp(v, 'p50')} / p99 {_pp(v, 'p99')} (n={v.get('count')})"
            for k, v in extra.items()
        ]
        lines += [f"By kind ({target}): " + "; ".join(parts), ""]
    idle = run.get("idle")
    if idle:
        lines += [
            f"Idle sessions ({target}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in idle.items()),
            "",
        ]
    return lines


def write_report(results: dict[str, Any], output: Path) -> None:
    results["targets"] = evaluate_targets(results)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (output / "summary.md").write_text(render_markdown(results))
