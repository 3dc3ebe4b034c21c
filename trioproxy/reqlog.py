"""The request log: one :class:`RequestRecord` per request, written in batches off the hot path.

Handlers fill in their request's record as it goes (account, routing decisions, usage,
status) and call ``RequestLog.emit(record)`` at the end: synchronous, never blocks, safe in a
``finally`` that is already cancelled (a client that vanished mid-stream still gets its
record). The writer task, in the app nursery, drains the channel into the store in batches;
turning records into rows (routing decisions into JSON-able values included) happens there,
not on the request's path. At shutdown the writer drains whatever is left before it returns.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from trioproxy.accounts.pool import Decision
from trioproxy.logs import get_logger
from trioproxy.store import Store

log = get_logger("trioproxy.reqlog")


@attrs.define(eq=False)
class RequestRecord:
    """What the log keeps of one request (or one WebSocket turn)."""

    time: float  # unix seconds at the start
    request_id: str
    route: str
    transport: str  # http, ws, bridge
    started: float  # trio time at the start (for the durations)
    account_id: str | None = None
    model: str | None = None
    status: int | None = None
    error_code: str | None = None
    ttfb_ms: float | None = None
    duration_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None  # estimated (keys/prices.py), set when it is charged
    key_id: str | None = None  # the API key (``loopback`` without keys)
    prewarm: bool = False  # a ``generate: false`` request (no output, not counted as usage)
    upstream_request_id: str | None = None
    client: str | None = None  # the client's address (the original one behind a proxy)
    decisions: list[Decision] = attrs.field(factory=list)
    last_event: str | None = None  # the last inspected event seen (terminal ones, rate limits)

    def fail(self, status: int, code: str | None) -> None:
        self.status = status
        self.error_code = code

    def note_error(self, code: str) -> None:
        """Why the request ended early, unless a reason is known already."""
        if self.error_code is None:
            self.error_code = code

    def first_event(self) -> None:
        """Upstream's first event reached the client's answer."""
        if self.ttfb_ms is None:
            self.ttfb_ms = round((trio.current_time() - self.started) * 1000, 1)

    def observe_terminal(self, event: Mapping[str, Any]) -> None:
        """A turn's terminal event: its usage, and the error it carries, if any."""
        kind = event.get("type")
        self.last_event = kind if isinstance(kind, str) else None
        response = event.get("response")
        if not isinstance(response, dict):
            response = {}
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.input_tokens = _int(usage.get("input_tokens"))
            self.output_tokens = _int(usage.get("output_tokens"))
            details = usage.get("input_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = _int(details.get("cached_tokens"))
            details = usage.get("output_tokens_details")
            if isinstance(details, dict):
                self.reasoning_tokens = _int(details.get("reasoning_tokens"))
        if kind == "response.completed":
            return
        error = response.get("error") or event.get("error") or {}
        code = None
        if isinstance(error, dict):
            code = error.get("code") or (error.get("type") if kind == "error" else None)
        self.error_code = str(code) if code else str(kind)

    def end(self) -> None:
        self.duration_ms = round((trio.current_time() - self.started) * 1000, 1)
        if self.status is None:
            self.status = 499  # the client left before any answer

    def row(self) -> dict[str, Any]:
        """The store's columns for this record (in the writer's thread)."""
        return {
            "time": self.time,
            "request_id": self.request_id,
            "route": self.route,
            "transport": self.transport,
            "account_id": self.account_id,
            "model": self.model,
            "status": self.status,
            "error_code": self.error_code,
            "ttfb_ms": self.ttfb_ms,
            "duration_ms": self.duration_ms,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_usd": self.cost_usd,
            "key_id": self.key_id,
            "decision": [d.record() for d in self.decisions] if self.decisions else None,
            "upstream_request_id": self.upstream_request_id,
            "client": self.client,
        }


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@attrs.frozen
class RequestLogStatistics:
    queued: int  # records waiting for the writer (bounded by ``capacity``)
    capacity: int
    written_total: int
    dropped_total: int  # records dropped because the queue was full


@attrs.define(eq=False)
class RequestLog:
    store: Store
    capacity: int = 10000
    batch: int = 200
    linger: float = 0.05  # seconds a batch waits for more records before it is written
    dropped: int = 0
    written: int = 0
    _send: trio.MemorySendChannel[RequestRecord] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[RequestRecord] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[RequestRecord](self.capacity)

    def statistics(self) -> RequestLogStatistics:
        return RequestLogStatistics(
            queued=self._send.statistics().current_buffer_used,
            capacity=self.capacity,
            written_total=self.written,
            dropped_total=self.dropped,
        )

    def emit(self, record: RequestRecord) -> None:
        """Queue one request's record (dropped, and counted, when the queue is full)."""
        try:
            self._send.send_nowait(record)
        except trio.WouldBlock:
            self.dropped += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled; then write the batch in hand and whatever is still
        queued (shielded, bounded).

        A batch taken off the channel is kept in ``records`` until its write returns: a
        cancellation while the write waits for the store's thread slot must not drop it.
        (A write that reached the store always completes: ``Store.run`` does not abandon
        its thread, so nothing is written twice.)"""
        task_status.started()
        records: list[RequestRecord] = []
        try:
            while True:
                records = [await self._receive.receive()]
                # gather what arrives within `linger`: one store round trip and one thread
                # hop per batch instead of per request
                with trio.move_on_after(self.linger):
                    while len(records) < self.batch:
                        records.append(await self._receive.receive())
                await self._write(records)
                records = []
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                while True:
                    try:
                        records.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                if records:
                    await self._write(records)

    async def prune(self, keep: float, every: float = 3600.0) -> None:
        """Delete records older than ``keep`` seconds, at start and every ``every`` seconds,
        until cancelled."""
        while True:
            try:
                pruned = await self.store.run(self.store.prune_request_logs, time.time() - keep)
                if pruned:
                    log.info("request log pruned", rows=pruned)
            except Exception:
                log.exception("request log prune failed")
            await trio.sleep(every)

    def _insert(self, records: list[RequestRecord]) -> None:
        self.store.insert_request_logs([record.row() for record in records])

    async def _write(self, records: list[RequestRecord]) -> None:
        try:
            await self.store.run(self._insert, records)
            self.written += len(records)
        except Exception:
            log.exception("request log write failed", rows=len(records))
