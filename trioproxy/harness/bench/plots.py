"""PNG plots of a bench run (matplotlib, headless): TTFB and turn-latency CDFs proxy against
direct, throughput over time, and the proxy's RSS and descriptors over the whole run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

COLORS = {
    "proxy": "tab:blue",
    "direct": "tab:gray",
    "proxy_nokeys": "tab:green",
    "responses": "tab:gray",
    "chat": "tab:blue",
    "messages": "tab:blue",
}


def _runs_with(results: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, scenario in results.get("scenarios", {}).items():
        runs = scenario.get("runs", {})
        if any(run.get("cdf", {}).get(key) for run in runs.values()):
            out.append((name, runs))
    return out


def latency_cdf(results: dict[str, Any], path: Path) -> bool:
    panels = [
        (name, runs, key)
        for key in ("ttfb_ms", "turn_latency_ms")
        for name, runs in _runs_with(results, key)
        if name not in ("idle", "failover")
    ]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.55, wspace=0.3)
    for ax, (name, runs, key) in zip(axes.flat, panels, strict=False):
        for target, run in runs.items():
            points = run.get("cdf", {}).get(key) or []
            if points:
                xs = [max(p[0], 0.001) for p in points]
                ys = [p[1] for p in points]
                ax.plot(xs, ys, label=target, color=COLORS.get(target), drawstyle="steps-post")
        lows = [p[0] for run in runs.values() for p in run.get("cdf", {}).get(key) or []]
        if lows and max(lows) > 20 * max(min(lows), 0.001):
            ax.set_xscale("log")  # a wide range (stalls, failures): log, major ticks only
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{name}: {'TTFB' if key == 'ttfb_ms' else 'turn latency'}")
        ax.set_xlabel("ms")
        ax.set_ylabel("percentile")
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def throughput(results: dict[str, Any], path: Path) -> bool:
    panels = [
        (name, scenario["runs"])
        for name, scenario in results.get("scenarios", {}).items()
        if any(run.get("timeseries", {}).get("second") for run in scenario.get("runs", {}).values())
        and name != "idle"
    ]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.5, wspace=0.3)
    for ax, (name, runs) in zip(axes.flat, panels, strict=False):
        for target, run in runs.items():
            series = run.get("timeseries", {})
            if series.get("second"):
                ax.plot(
                    series["second"],
                    series["events"],
                    label=f"{target} events/s",
                    color=COLORS.get(target),
                )
        ax.set_title(f"{name}: events/s (counted at turn end)")
        ax.set_xlabel("s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def process(results: dict[str, Any], path: Path) -> bool:
    series = results.get("process_series") or {}
    if not series.get("t"):
        return False
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.plot(series["t"], series["rss_mib"], color="tab:blue", label="proxy RSS (MiB)")
    ax.set_xlabel("s since start")
    ax.set_ylabel("RSS MiB")
    ax2 = ax.twinx()
    ax2.plot(series["t"], series["fds"], color="tab:orange", alpha=0.7, label="proxy fds")
    ax2.set_ylabel("open descriptors")
    previous = None
    for t, phase in zip(series["t"], series["phase"], strict=False):
        if phase != previous and phase not in ("between", "idle"):
            ax.axvline(t, color="gray", alpha=0.3)
            ax.text(
                t,
                0.98,
                phase,
                rotation=90,
                va="top",
                fontsize=7,
                transform=ax.get_xaxis_transform(),
            )
        previous = phase
    ax.set_title("proxy process over the run")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def memory(results: dict[str, Any], path: Path) -> bool:
    """The soak: the proxy's RSS and the conversation memory it holds, over the run."""
    series = results.get("process_series") or {}
    gauges = results.get("scenarios", {}).get("soak", {}).get("gauge_series") or {}
    if not series.get("t") or not gauges.get("t"):
        return False
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.plot(series["t"], series["rss_mib"], color="tab:blue", label="proxy RSS (MiB)")
    ax.plot(gauges["t"], gauges["conversation_mib"], color="tab:green", label="conversations (MiB)")
    ax.plot(
        gauges["t"],
        gauges["conversation_budget_mib"],
        color="tab:green",
        linestyle="--",
        alpha=0.6,
        label="conversation budget (MiB)",
    )
    ax.set_xlabel("s since start")
    ax.set_ylabel("MiB")
    ax2 = ax.twinx()
    ax2.plot(
        gauges["t"], gauges["bridge_sessions"], color="tab:gray", alpha=0.6, label="bridge sessions"
    )
    ax2.set_ylabel("bridge sessions")
    ax.set_title("soak: memory over the run")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def write_plots(results: dict[str, Any], output: Path) -> list[str]:
    made = []
    for name, draw in (
        ("latency_cdf.png", latency_cdf),
        ("throughput.png", throughput),
        ("process.png", process),
        ("memory.png", memory),
    ):
        if draw(results, output / name):
            made.append(name)
    return made
