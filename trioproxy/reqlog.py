"""The request log: one record per request, written in batches off the hot path.

Handlers call ``RequestLog.emit(record)`` (synchronous, never blocks, safe in a ``finally``
that is already cancelled: a client that vanished mid-stream still gets its record). The
writer task, in the app nursery, drains the channel into the store in batches. At shutdown
the writer drains whatever is left before it returns.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from trioproxy.accounts.pool import Decision
from trioproxy.logs import get_logger
from trioproxy.store import Store

log = get_logger("trioproxy.reqlog")
FIELDS = (
    "time", "request_id", "route", "transport", "account_id", "model", "status", "error_code",
    "ttfb_ms", "duration_ms", "input_tokens", "output_tokens", "cached_tokens", "decision",
)  # fmt: skip


@attrs.define(eq=False)
class RequestLog:
    store: Store
    capacity: int = 10000
    batch: int = 200
    linger: float = 0.05  # seconds a batch waits for more records before it is written
    dropped: int = 0
    written: int = 0
    _send: trio.MemorySendChannel[dict[str, Any]] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[dict[str, Any]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](self.capacity)

    def emit(self, record: dict[str, Any]) -> None:
        """Queue one request's record (the columns of ``FIELDS``; other keys are dropped)."""
        record = {name: record.get(name) for name in FIELDS}
        try:
            self._send.send_nowait(record)
        except trio.WouldBlock:
            self.dropped += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled; then write the batch in hand and whatever is still
        queued (shielded, bounded).

        A batch taken off the channel is kept in ``rows`` until its write returns: a
        cancellation while the write waits for the store's thread slot must not drop it.
        (A write that reached the store always completes: ``Store.run`` does not abandon
        its thread, so nothing is written twice.)"""
        task_status.started()
        rows: list[dict[str, Any]] = []
        try:
            while True:
                rows = [await self._receive.receive()]
                # gather what arrives within `linger` (one store round trip and one thread
                # hop per batch instead of per request: under load that was several per
                # cent of the proxy's CPU)
                with trio.move_on_after(self.linger):
                    while len(rows) < self.batch:
                        rows.append(await self._receive.receive())
                await self._write(rows)
                rows = []
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                while True:
                    try:
                        rows.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                if rows:
                    await self._write(rows)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        """In the store's thread: routing decisions become their records (computed here,
        off the requests' path), then the rows are inserted."""
        for row in rows:
            decisions = row.get("decision")
            if isinstance(decisions, list):
                row["decision"] = [d.record() if isinstance(d, Decision) else d for d in decisions]
        self.store.insert_request_logs(rows)

    async def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            await self.store.run(self._insert, rows)
            self.written += len(rows)
        except Exception:
            log.exception("request log write failed", rows=len(rows))
