"""The bench's options (one frozen record, filled from ``trioproxy bench`` flags) and each
scenario's defaults. A flag left unset (``None``) takes the scenario's default, so one command
line can run scenarios of different shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

SCENARIOS = ("sse", "relay", "ws", "bridge", "failover", "chaos", "soak", "idle")
# the translated fronts (Chat Completions, Anthropic Messages) against the proxy's Responses
# front: run only when named (``--scenario chat --scenario messages``), so that the default
# run (``make bench``) does not take two more minutes
FRONT_SCENARIOS = ("chat", "messages")
ALL_SCENARIOS = SCENARIOS + FRONT_SCENARIOS

# scenario -> defaults: concurrency, duration (seconds), think (seconds between turns) and
# the upstream answer shape (events per answer, bytes per event, time to first event and
# between events at the mock).
DEFAULTS: dict[str, dict[str, Any]] = {
    "sse": {"concurrency": 50, "duration": 30.0, "rounds": 3},
    # the sse turns through the translated fronts, each against the Responses front
    "chat": {"concurrency": 50, "duration": 30.0, "rounds": 3},
    "messages": {"concurrency": 50, "duration": 30.0, "rounds": 3},
    "relay": {
        "concurrency": 8,
        "duration": 15.0,
        "events": 200,
        "event_bytes": 64,
        "upstream_ttfb": 0.0,
        "upstream_gap": 0.0,
    },
    "ws": {"concurrency": 20, "duration": 20.0, "rounds": 2},
    "bridge": {"concurrency": 10, "duration": 15.0},
    # failover measures time to first byte: short answers keep its sequential turns quick
    "failover": {"concurrency": 1, "count": 40, "events": 4},
    "chaos": {"concurrency": 30, "duration": 20.0},
    # soak: a team's mixed traffic against a fast upstream, so that a long run serves many
    # turns (soak.py chooses the clients' mix; its concurrency is that mix's size)
    "soak": {
        "concurrency": 14,
        "duration": 60.0,
        "events": 8,
        "upstream_ttfb": 0.0,
        "upstream_gap": 0.0,
    },
    "idle": {"sessions": 2000, "concurrency": 64, "duration": 5.0, "events": 4},
}
# The default answer is paced like a model: the first event after 100 ms, then 40 deltas of
# 32 bytes 25 ms apart (about a second per answer). At 50 concurrent streams that is the
# everyday load of a team's proxy; `relay` is the saturation test.
COMMON: dict[str, Any] = {
    "concurrency": 10,
    "duration": 10.0,
    "count": None,
    "rounds": 1,  # alternating direct/proxy phases the duration is split into
    "think": 0.0,
    "events": 40,
    "event_bytes": 32,
    "upstream_ttfb": 0.1,
    "upstream_gap": 0.025,
}
SHAPE = ("events", "event_bytes", "upstream_ttfb", "upstream_gap")


@attrs.frozen
class BenchConfig:
    output: Path = Path("bench-results")
    scenarios: tuple[str, ...] = SCENARIOS
    # None: the scenario's default (DEFAULTS, then COMMON)
    concurrency: int | None = None
    duration: float | None = None
    count: int | None = None
    rounds: int | None = None
    think: float | None = None
    events: int | None = None
    event_bytes: int | None = None
    upstream_ttfb: float | None = None
    upstream_gap: float | None = None
    upstream_jitter: float = 0.0  # each upstream delay drawn from delay * (1 +/- jitter)
    input_bytes: int = 2048
    turns_per_session: int = 3
    sessions: int | None = None  # idle
    abandon_probability: float = 0.3  # chaos
    fault_probability: float = 0.15  # chaos: share of upstream requests that fail somehow
    turn_timeout: float = 60.0
    accounts: int = 8
    # API keys in the store of the proxy started here (each with ``stack.KEY_POLICY``); the
    # clients spread their requests over them, and the scenarios run in rounds also run
    # against a second proxy without keys, the reference of the keys' cost. 0: no keys
    keys: int = 0
    seed: int = 1
    direct: bool = True  # also run each scenario against the mock directly
    plots: bool = True
    profile: str | None = None  # scenario to record with py-spy
    progress: bool = True
    # an already running proxy instead of one started here
    target: str | None = None
    mock_url: str | None = None
    api_key: str | None = None
    target_pid: int | None = None
    path: str = "/backend-api/codex/responses"
    # options of the proxy started here, as NAME=VALUE (``trioproxy serve`` option names)
    proxy_option: tuple[str, ...] = ()

    def get(self, scenario: str, name: str) -> Any:
        """The option ``name`` for ``scenario``: the flag if given, else the defaults."""
        value = getattr(self, name, None)
        if value is not None:
            return value
        if name in DEFAULTS.get(scenario, {}):
            return DEFAULTS[scenario][name]
        return COMMON.get(name)

    def shape(self, scenario: str) -> dict[str, Any]:
        """The mock's answer shape for a scenario (``PATCH /__mock__/config``). ``relay``
        always runs without upstream delays: it measures relay throughput."""
        shape = {name: self.get(scenario, name) for name in SHAPE}
        if scenario == "relay":
            shape["upstream_ttfb"] = shape["upstream_gap"] = 0.0
            shape["events"] = self.events or DEFAULTS["relay"]["events"]
        return {
            "deltas": int(shape["events"]),
            "delta_bytes": int(shape["event_bytes"]),
            "first_event_delay": float(shape["upstream_ttfb"]),
            "event_delay": float(shape["upstream_gap"]),
            "latency_jitter": 0.0 if scenario == "relay" else float(self.upstream_jitter),
        }

    def answer_seconds(self, scenario: str) -> float:
        """How long one upstream answer of this scenario takes at the mock."""
        shape = self.shape(scenario)
        return float(shape["first_event_delay"] + shape["deltas"] * shape["event_delay"])

    def view(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["output"] = str(self.output)
        data["api_key"] = "***" if self.api_key else None
        data["scenarios"] = list(self.scenarios)
        return data
