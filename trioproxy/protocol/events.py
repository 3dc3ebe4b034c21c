"""Upstream events as the proxy sees them, whichever transport brought them (sans-IO).

Over HTTP a turn's events arrive as an SSE byte stream, cut anywhere by the network; over a
WebSocket, one message per event. Either way the proxy relays what came and looks inside
only the events it acts on. An :class:`Event` is one upstream event: its type, read without
parsing its JSON (:func:`peek_kind`), and its payload, parsed on demand. A :class:`Batch` is
what one read delivered: its complete events and, for SSE, the bytes as they were read, which
an SSE client gets unchanged (frames cut anywhere, comments included).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from trioproxy.protocol.sse import SSEFrameSplitter, frame_data

RATE_LIMITS = "codex.rate_limits"
#: events that end a turn
TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
METADATA = "response.metadata"
#: events whose content the proxy reads on every turn (usage, errors, quota)
INSPECTED = TERMINAL | {RATE_LIMITS}
#: events upstream sends before a turn's output: the proxy holds them (with the response
#: head) until the first other event, so that an error that comes instead of output can
#: still move the turn to another account (``sessions/links.py``)
PREAMBLE = frozenset(
    {
        RATE_LIMITS,
        METADATA,
        "response.created",
        "response.in_progress",
        "response.queued",
        "keepalive",
    }
)
#: how far into a payload a top-level ``"type"`` is looked for before parsing the JSON
_PEEK_LIMIT = 200


def peek_kind(payload: str | bytes) -> str | None:
    """The ``type`` of a JSON event, cheaply: the first ``"type":"`` near the start, else the
    parsed value's (an event that puts a nested object first is parsed)."""
    if isinstance(payload, bytes):
        at = payload.find(b'"type":"', 0, _PEEK_LIMIT)
        if at != -1:
            end = payload.find(b'"', at + 8)
            if end != -1:
                return payload[at + 8 : end].decode("utf-8", "replace")
    else:
        at = payload.find('"type":"', 0, _PEEK_LIMIT)
        if at != -1:
            end = payload.find('"', at + 8)
            if end != -1:
                return payload[at + 8 : end]
    value = _loads(payload)
    kind = value.get("type") if value is not None else None
    return kind if isinstance(kind, str) else None


def _loads(payload: str | bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _frame_kind(frame: bytes) -> str | None:
    """An SSE frame's type: its ``event:`` line when it has one (upstream's are the data's
    type), else the data's."""
    if frame.startswith(b"event:"):
        end = frame.find(b"\n")
        return frame[6:end].strip().decode("utf-8", "replace")
    at = frame.find(b"data:")
    return peek_kind(frame[at + 5 :]) if at != -1 else None


class Event:
    """One upstream event: an SSE frame (``frame``) or a WebSocket message (``text``)."""

    __slots__ = ("_value", "frame", "kind", "text")

    def __init__(
        self, kind: str | None, *, frame: bytes | None = None, text: str | None = None
    ) -> None:
        self.kind = kind
        self.frame = frame
        self.text = text
        self._value: dict[str, Any] | None = None

    @classmethod
    def from_message(cls, text: str) -> Event:
        return cls(peek_kind(text), text=text)

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> Event:
        event = cls(value.get("type"), text=json.dumps(value, ensure_ascii=False))
        event._value = value
        return event

    def json(self) -> dict[str, Any] | None:
        """The event's JSON object (parsed once), or None if it is not one."""
        if self._value is None:
            if self.text is not None:
                self._value = _loads(self.text)
            elif self.frame is not None:
                self._value = frame_data(self.frame)
        return self._value

    def payload(self) -> str | bytes:
        """The event's JSON text as upstream sent it (an SSE frame's ``data:`` lines)."""
        if self.text is not None:
            return self.text
        assert self.frame is not None
        lines = self.frame.splitlines()
        return b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))

    def as_message(self) -> str:
        """The event as one WebSocket text message (compact JSON, one line)."""
        if self.text is not None and "\n" not in self.text:
            return self.text
        value = self.json()
        return json.dumps(value, ensure_ascii=False) if value is not None else "{}"

    def as_sse(self) -> bytes:
        """The event as an SSE frame (an upstream frame goes as it came)."""
        if self.frame is not None:
            return self.frame
        return f"event: {self.kind}\ndata: {self.as_message()}\n\n".encode()


class Batch:
    """What one upstream read delivered: its complete events, and for an SSE stream the bytes
    as read (``raw``; None for a WebSocket message, which is rendered per event).

    ``kinds`` lists each event's type. An SSE batch keeps its frames and makes :class:`Event`
    objects only when asked (``events``): relaying a stream to an SSE client needs only the
    types, and this runs for every read of every stream."""

    __slots__ = ("_events", "_frames", "kinds", "raw")

    def __init__(
        self,
        events: list[Event] | None = None,
        raw: bytes | None = None,
        frames: list[bytes] | None = None,
        kinds: list[str | None] | None = None,
    ) -> None:
        self._events = events
        self._frames = frames
        self.raw = raw
        self.kinds: list[str | None] = (
            [e.kind for e in events] if events is not None else kinds or []
        )

    @classmethod
    def of(cls, event: Event) -> Batch:
        return cls([event])

    @property
    def events(self) -> list[Event]:
        if self._events is None:
            frames = self._frames or []
            self._events = [Event(k, frame=f) for k, f in zip(self.kinds, frames, strict=True)]
            self._frames = None
        return self._events


@attrs.define(eq=False)
class SSEEvents:
    """Turns an SSE byte stream into batches of events, read by read."""

    splitter: SSEFrameSplitter = attrs.field(factory=SSEFrameSplitter)

    def feed(self, data: bytes) -> Batch:
        frames: list[bytes] = []
        kinds: list[str | None] = []
        for frame in self.splitter.feed(data):
            kind = _frame_kind(frame)
            if kind is not None:  # (comments and keep-alives are relayed, not events)
                frames.append(frame)
                kinds.append(kind)
        return Batch(raw=data, frames=frames, kinds=kinds)
