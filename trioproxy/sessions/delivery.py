"""Relaying an opened turn to its client, and reading what the proxy needs on the way.

:func:`deliver` is the one relay loop, for every transport and every client front: it
commits the sink, hands it the batches held while the turn was opened, then every batch
upstream delivers until the turn ends or upstream breaks off. Each batch passes through the
:class:`TurnObserver` first, the one place where the proxy reads a relayed turn: usage and
errors for the request log, quota events for the pool, and (for a conversation that keeps
its history) the response id and output items for re-anchoring.
"""

from __future__ import annotations

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
    capture: bool  # keep the response id and output items (for the response chain)
    response_id: str | None = None
    output: list[Any] = attrs.field(factory=list)
    size: int = 0  # bytes of the captured output events
    completed: bool = False

    def see(self, batch: Batch) -> None:
        events = batch.events
        for index, event in enumerate(events):
            kind = event.kind
            if kind in INSPECTED:
                value = event.json()
                if value is None:
                    continue
                if kind == RATE_LIMITS:
                    self.ctx.pool.learn_event(self.account_id, value)
                    continue
                self._terminal(kind, value)
                if kind == "error" and batch.raw is None:
                    # a WebSocket error event goes out as the proxy's: no upstream ids
                    events[index] = Event.from_value(
                        {**value, "error": upstream_envelope(value)["error"]}
                    )
            elif self.capture:
                self._capture(kind, event)

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
            value = event.json()
            if value is not None:
                self.output.append(value.get("item"))
                self.size += len(event.text or event.frame or "")


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

    async def forward(batch: Batch) -> None:
        observer.see(batch)
        await sink.events(batch)

    for batch in stream.held:
        await forward(batch)
    try:
        await stream.relay(forward)
    except Cut as cut:
        record.note_error(cut.reason)
        await sink.cut(cut)
        return
    if record.last_event not in TERMINAL:
        record.note_error("stream_incomplete")
    await sink.finish()
