"""Fault injection for the mock backend.

A ``Fault`` says *what* goes wrong (``kind`` and its parameters) and *when*: at which point
(``on``), for which account, after how many matching requests (``skip``), how many times
(``count``; ``None`` = until removed) and with what ``probability``. Faults are set at start
(``--fault`` flags or a scenario file) and changed at runtime through ``/__mock__/faults``.

Points (``on``):
  ``responses``  an HTTP ``POST .../codex/responses`` or a WebSocket ``response.create``
  ``upgrade``    the WebSocket handshake (the answer is an HTTP status instead of 101)
  ``usage``, ``models``, ``token``, ``compact``   the other endpoints

``segmentation`` writes the answer of the request it fires on with its ``mode`` (``event``,
``whole`` or ``split``, see ``segmentation.py``); at ``upgrade`` it sets the mode of every
turn of that WebSocket connection. Like any fault it is the only one the request gets.

``stream_error`` answers 200 and streams the answer's events up to ``after_events`` (2: after
``response.created`` and ``response.in_progress``, before any output), then sends an ``error``
event (``event=error``: ``{"type": "error", "error": {...}}``, with ``status`` only when it is
not 0) or a ``response.failed`` (``event=response.failed``) with ``code`` and ``message``, and
ends the answer. ``pretty=1`` writes that event as indented, multi-line JSON (several
``data:`` lines over SSE, one multi-line text message over a WebSocket), as some upstream
errors come. ``connection_limit`` answers a WebSocket turn with the 60-minute limit's ``error``
event (``status`` 0: without one; ``pretty`` as above) and closes the socket.

``slow`` on ``token`` rotates the tokens at once and answers ``first_event_delay`` seconds
later (``stall`` waits before the refresh takes effect). A ``stall`` at ``responses`` or
``token`` also ends when its fault is removed (``DELETE /__mock__/faults[/{id}]``): a test
can hold requests exactly until it lets them go.

The login side of the auth server (``login.py``) has the points ``usercode`` (the device
code request), ``deviceauth`` (its polls), ``authorize`` and ``token`` (refresh and code exchange), and
three kinds of its own: ``slow_down`` (a poll answers ``slow_down``), ``denied`` (a poll
answers ``access_denied``; at ``authorize``, the redirect carries ``error=access_denied``)
and ``expired_code`` (a poll answers ``expired_token``; at ``token``, the code exchange
answers ``invalid_grant``). ``slow``, ``server_error`` and ``stall`` work there too.

Spec string form (flags): ``KIND[:key=value,key=value...]``, e.g.
``usage_limit:account=acct-mock-1,count=2`` or ``stall:seconds=5,probability=0.1``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from trioproxy.harness.mock_upstream.segmentation import check_mode

# kind -> (default point, allowed parameters with defaults)
FAULT_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "usage_limit": ("responses", {"resets_in": 3600, "status": 429}),
    "token_invalidated": ("responses", {}),
    "account_deactivated": ("responses", {}),
    "server_error": ("responses", {"status": 500}),
    "overloaded": ("responses", {}),
    "close_before_created": ("responses", {"code": 1011}),
    "close_after_created": ("responses", {"code": 1011, "after_events": 2}),
    "previous_response_not_found": ("responses", {}),
    "connection_limit": ("responses", {"status": 400, "pretty": 0}),
    "response_failed": ("responses", {"code": "server_error", "message": ""}),
    "stall": ("responses", {"seconds": 30.0}),
    "slow": ("responses", {"first_event_delay": 0.0, "event_delay": 0.0, "deltas": 0}),
    "segmentation": ("responses", {"mode": "split"}),
    "stream_error": (
        "responses",
        {
            "event": "error",
            "code": "server_is_overloaded",
            "message": "",
            "status": 0,
            "after_events": 2,
            "pretty": 0,
        },
    ),
    # the login side of the auth server (login.py)
    "slow_down": ("deviceauth", {}),
    "denied": ("deviceauth", {}),
    "expired_code": ("deviceauth", {}),
}
POINTS = (
    "responses",
    "upgrade",
    "usage",
    "models",
    "token",
    "compact",
    "usercode",
    "deviceauth",
    "authorize",
)
_FLOATS = {"probability", "seconds", "first_event_delay", "event_delay", "resets_in"}
_INTS = {"count", "skip", "status", "code_int", "after_events", "deltas", "pretty"}
STREAM_ERROR_EVENTS = ("error", "response.failed")
_LOGIN_POINTS = {
    "slow_down": ("deviceauth",),
    "denied": ("deviceauth", "authorize"),
    "expired_code": ("deviceauth", "token"),
}

_ids = itertools.count(1)


class FaultSpecError(ValueError):
    """A fault spec names an unknown kind, point or parameter, or a bad value."""


@attrs.define(eq=False)
class Fault:
    kind: str
    on: str
    params: dict[str, Any]
    account: str | None = None
    transport: str | None = None  # "http", "ws" or None for both
    count: int | None = None
    skip: int = 0
    probability: float = 1.0
    id: int = attrs.field(factory=lambda: next(_ids))
    matched: int = 0
    fired: int = 0
    released: trio.Event = attrs.field(factory=trio.Event)  # set when removed by hand

    async def stall(self) -> None:
        """Wait ``seconds``, or until the fault is removed."""
        with trio.move_on_after(self.params["seconds"]):
            await self.released.wait()

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "on": self.on,
            "account": self.account,
            "transport": self.transport,
            "count": self.count,
            "skip": self.skip,
            "probability": self.probability,
            "params": self.params,
            "matched": self.matched,
            "fired": self.fired,
        }


def _coerce(key: str, value: Any) -> Any:
    try:
        if key in _FLOATS:
            return float(value)
        if key in _INTS or (key == "code" and str(value).isdigit()):
            return int(value)
    except (TypeError, ValueError):
        raise FaultSpecError(f"fault parameter {key}: bad value {value!r}") from None
    return value


def fault_from_dict(spec: Mapping[str, Any]) -> Fault:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in FAULT_KINDS:
        raise FaultSpecError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    default_on, defaults = FAULT_KINDS[kind]
    on = spec.pop("on", default_on)
    if on not in POINTS:
        raise FaultSpecError(f"unknown fault point {on!r}; known: {', '.join(POINTS)}")
    transport = spec.pop("transport", None)
    if transport not in (None, "http", "ws"):
        raise FaultSpecError(f"fault transport must be http or ws, not {transport!r}")
    common = {
        "account": spec.pop("account", None),
        "count": _coerce("count", spec.pop("count")) if spec.get("count") is not None else None,
        "skip": _coerce("skip", spec.pop("skip", 0)),
        "probability": _coerce("probability", spec.pop("probability", 1.0)),
    }
    spec.pop("count", None)
    params = dict(defaults)
    nested = spec.pop("params", {}) or {}
    for key, value in {**nested, **spec}.items():
        if key not in defaults:
            raise FaultSpecError(f"fault {kind} has no parameter {key!r}")
        params[key] = _coerce(key, value)
    if not 0.0 <= common["probability"] <= 1.0:
        raise FaultSpecError("fault probability must be between 0 and 1")
    if kind == "stream_error" and params["event"] not in STREAM_ERROR_EVENTS:
        raise FaultSpecError(f"stream_error event must be one of {', '.join(STREAM_ERROR_EVENTS)}")
    allowed = _LOGIN_POINTS.get(kind)
    if allowed is not None and on not in allowed:
        raise FaultSpecError(f"a {kind} fault applies at {' or '.join(allowed)} only")
    if kind == "segmentation":
        if on not in ("responses", "upgrade"):
            raise FaultSpecError("a segmentation fault applies at responses or upgrade only")
        try:
            check_mode(params["mode"])
        except ValueError as exc:
            raise FaultSpecError(str(exc)) from None
    return Fault(kind=kind, on=on, params=params, transport=transport, **common)


def parse_fault_spec(text: str) -> Fault:
    """Parse ``KIND[:key=value,...]``."""
    kind, _, rest = text.partition(":")
    spec: dict[str, Any] = {"kind": kind.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise FaultSpecError(f"fault parameter {part!r} is not key=value")
        spec[key.strip()] = value.strip()
    return fault_from_dict(spec)


@attrs.define(eq=False)
class FaultBook:
    """The active faults. ``take`` picks the first one that fires for a request."""

    rng: random.Random = attrs.field(factory=lambda: random.Random(0))
    faults: list[Fault] = attrs.field(factory=list)

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def remove(self, fault_id: int) -> bool:
        removed = [f for f in self.faults if f.id == fault_id]
        self.faults = [f for f in self.faults if f.id != fault_id]
        for fault in removed:
            fault.released.set()
        return bool(removed)

    def clear(self) -> None:
        for fault in self.faults:
            fault.released.set()
        self.faults.clear()

    def take(self, on: str, account: str | None, transport: str) -> Fault | None:
        for fault in self.faults:
            if fault.on != on:
                continue
            if fault.account is not None and fault.account != account:
                continue
            if fault.transport is not None and fault.transport != transport:
                continue
            fault.matched += 1
            if fault.matched <= fault.skip:
                continue
            if fault.probability < 1.0 and self.rng.random() >= fault.probability:
                continue
            fault.fired += 1
            if fault.count is not None and fault.fired >= fault.count:
                self.faults.remove(fault)
            return fault
        return None
