"""Relaying an opened turn to its client, and reading what the proxy needs on the way.

:func:`deliver` is the one relay loop, for every transport and every client front: it
commits the sink, hands it the batches held while the turn was opened, then every batch
upstream delivers until the turn ends or upstream breaks off. Each batch passes through the
:class:`TurnObserver` first, the one place where the proxy reads a relayed turn: usage and
errors for the request log, quota events for the pool, and (for a conversation that keeps
its history) the response id and output items for re-anchoring.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from trioproxy.protocol.errors import upstream_envelope
from trioproxy.protocol.events import INSPECTED, RATE_LIMITS, TERMINAL, Batch, Event
from trioproxy.protocol.failures import Kind, classify_event
from trioproxy.reqlog import RequestRecord
from trioproxy.sessions.context import ProxyContext
from trioproxy.sessions.links import TurnStream
from trioproxy.sessions.sinks import Cut, Sink


@attrs.define(eq=False)
class TurnObserver:
    """Reads one turn's events as they are relayed (see the module docstring)."""

    ctx: ProxyContext
    account_id: str
    record: RequestRecord
    capture: bool  # keep the response id and output events (for the response chain)
    response_id: str | None = None
    output: list[str | bytes] = attrs.field(factory=list)  # output_item.done events, as sent
    completed: bool = False

    @staticmethod
    def rewrite(batch: Batch) -> None:
        """Make a batch fit to go out: an ``error`` event of a WebSocket upstream goes out as
        the proxy's, with no upstream ids in it (an SSE stream is relayed byte for byte)."""
        if batch.raw is None and "error" in batch.kinds:
            events = batch.events
            for index, event in enumerate(events):
                value = event.json() if event.kind == "error" else None
                if value is not None:
                    error = upstream_envelope(value)["error"]
                    events[index] = Event.from_value({**value, "error": error})

    def output_items(self) -> list[Any]:
        """The turn's output items (parsed from the captured events)."""
        items = []
        for payload in self.output:
            value = json.loads(payload)
            items.append(value.get("item") if isinstance(value, dict) else None)
        return items

    def see(self, batch: Batch) -> None:
        """Learn from a batch: quota events, usage and errors of the terminal event, and the
        chain's capture. (This runs for every read of every stream: most batches hold one
        event the proxy does not look into.)"""
        capture = self.capture
        for index, kind in enumerate(batch.kinds):
            if kind in INSPECTED or capture:
                self._look(batch, index, kind)

    def _look(self, batch: Batch, index: int, kind: str | None) -> None:
        if kind not in INSPECTED:
            self._capture(kind, batch.events[index])
            return
        value = batch.events[index].json()
        if value is None:
            return
        if kind == RATE_LIMITS:
            self.ctx.pool.learn_event(self.account_id, value)
        else:
            self._terminal(kind, value)

    def relay(self, batch: Batch) -> None:
        """A batch relayed as it arrives: fit to go out, and learned from (``see``'s loop,
        inline: this runs for every read of every stream)."""
        if batch.raw is None:
            self.rewrite(batch)
        capture = self.capture
        for index, kind in enumerate(batch.kinds):
            if kind in INSPECTED or capture:
                self._look(batch, index, kind)

    def _terminal(self, kind: str, value: dict[str, Any]) -> None:
        self.record.observe_terminal(value)
        self.completed = kind == "response.completed"
        if self.capture and self.response_id is None:
            self.response_id = _response_id(value)
        if kind in ("response.failed", "error"):
            failure = classify_event(value)
            if failure is not None and failure.kind is Kind.USAGE_LIMIT:
                self.ctx.pool.mark_exhausted(self.account_id, failure.resets_at)

    def _capture(self, kind: str | None, event: Event) -> None:
        if kind == "response.created" and self.response_id is None:
            value = event.json()
            self.response_id = _response_id(value) if value is not None else None
        elif kind == "response.output_item.done":
            self.output.append(event.payload())  # parsed only if the turn is re-anchored


def _response_id(value: dict[str, Any]) -> str | None:
    response = value.get("response")
    rid = response.get("id") if isinstance(response, dict) else None
    return rid if isinstance(rid, str) else None


async def deliver(
    stream: TurnStream, sink: Sink, observer: TurnObserver, record: RequestRecord
) -> None:
    """Relay an opened turn to ``sink`` (see the module docstring)."""
    await sink.commit(stream.headers)
    record.status = 200
    record.first_event()

    # what came before the commit goes out first (the client's first byte waits for nothing
    # else); then it is learned from, even if the client left while it went out
    for batch in stream.held:
        observer.rewrite(batch)
        try:
            await sink.events(batch)
        finally:
            observer.see(batch)
    try:
        await stream.relay(observer.relay, sink.events)
    except Cut as cut:
        record.note_error(cut.reason)
        await sink.cut(cut)
        return
    if record.last_event not in TERMINAL:
        record.note_error("stream_incomplete")
    await sink.finish()
