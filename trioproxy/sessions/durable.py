"""Durable response chains: each conversation's chain also kept in PostgreSQL, so that any
replica can re-anchor a turn whose previous response another replica served.

With ``database_url`` on PostgreSQL and ``durable_chain_ttl > 0`` (:meth:`DurableChains.build`
gives None otherwise, and nothing is written or read), a conversation kept on an upstream
WebSocket hands every turn it remembers (``Conversation.remember``) to :meth:`save`:
synchronous, never blocks; past ``capacity`` queued turns the turn is dropped, counted and
logged. The writer (:meth:`run`, a task of the app nursery) writes what is queued every
``interval`` seconds in one transaction (``store/chains.py``: the turn's packed blobs as the
chain keeps them, the conversation's oldest turns deleted past ``durable_chain_max_bytes``).
At shutdown it writes what is still queued (shielded, bounded). The pruner (:meth:`prune`,
the same owner) deletes the conversations idle for longer than ``durable_chain_ttl``, then
the least recently written ones while all together are over
``durable_chain_total_max_bytes``.

:meth:`lookup` is the read on a miss (``Conversation.recall``): the turns from an anchor back
to its conversation's start, read through ``Store.run`` under a deadline (the read is
abandoned at it, and on PostgreSQL the statement is cancelled by ``statement_timeout``).
A failed or late read answers None, as an unknown anchor does: the turn goes on as it would
without durable chains.
"""

from __future__ import annotations

import time

import attrs
import structlog
import trio

from trioproxy.config import Settings
from trioproxy.logs import get_logger
from trioproxy.protocol.chain import Node
from trioproxy.store import Store
from trioproxy.store import chains as stored

log = get_logger("trioproxy.durable")

#: seconds a lookup on a miss may take before the turn goes on without it
LOOKUP_TIMEOUT = 2.0
#: seconds between two runs of the pruner, at most
PRUNE_EVERY = 60.0
#: seconds the writes left at shutdown may take
SHUTDOWN_WRITE_TIMEOUT = 10.0


@attrs.frozen
class Recalled:
    """What a lookup found: the stored conversation and its turns, oldest first."""

    conversation: str
    nodes: list[tuple[str, Node]]


@attrs.frozen
class DurableChainStatistics:
    queued: int  # turns waiting for the writer (bounded by ``capacity``)
    capacity: int
    written_total: int
    dropped_total: int  # turns dropped because the queue was full
    write_failures_total: int  # batches the store refused
    lookups_total: int
    found_total: int
    lookup_failures_total: int  # reads that failed or ran out of time


@attrs.define(eq=False)
class DurableChains:
    """The durable chains' writer, pruner and reader (see the module docstring)."""

    store: Store
    ttl: float
    max_bytes: int
    total_max_bytes: int
    capacity: int = 10000
    interval: float = 0.05  # seconds between two writes
    batch: int = 500
    lookup_timeout: float = LOOKUP_TIMEOUT
    written: int = 0
    dropped: int = 0
    write_failures: int = 0
    lookups: int = 0
    found: int = 0
    lookup_failures: int = 0
    _send: trio.MemorySendChannel[stored.StoredNode] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[stored.StoredNode] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[stored.StoredNode](self.capacity)

    @classmethod
    def build(cls, settings: Settings, store: Store) -> DurableChains | None:
        """The durable chains for these settings, or None when they are off (SQLite, or a
        TTL of 0)."""
        if settings.durable_chain_ttl <= 0 or store.statistics().dialect != "postgresql":
            return None
        return cls(
            store,
            settings.durable_chain_ttl,
            settings.durable_chain_max_bytes,
            settings.durable_chain_total_max_bytes,
        )

    def statistics(self) -> DurableChainStatistics:
        return DurableChainStatistics(
            queued=self._send.statistics().current_buffer_used,
            capacity=self.capacity,
            written_total=self.written,
            dropped_total=self.dropped,
            write_failures_total=self.write_failures,
            lookups_total=self.lookups,
            found_total=self.found,
            lookup_failures_total=self.lookup_failures,
        )

    def save(self, conversation: str, response_id: str, node: Node) -> None:
        """Queue one remembered turn (dropped, counted and logged when the queue is full)."""
        row = stored.StoredNode(
            conversation,
            response_id,
            node.parent,
            node.account,
            node.input,
            node.output,
            node.size,
            time.time(),
        )
        try:
            self._send.send_nowait(row)
        except trio.WouldBlock:
            self.dropped += 1
            log.warning("durable chain queue full, turn not written", dropped=self.dropped)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write what is queued every ``interval`` until cancelled; then write what is
        left (shielded, bounded). A batch taken off the queue is kept in ``rows`` until
        its write returns, as the request log's writer does."""
        structlog.contextvars.clear_contextvars()
        task_status.started()
        rows: list[stored.StoredNode] = []
        try:
            while True:
                rows = [await self._receive.receive()]
                await trio.sleep(self.interval)  # gather what the next turns bring
                self._take(rows)
                await self._write(rows)
                rows = []
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_WRITE_TIMEOUT):
                self._take(rows, limit=self.capacity + len(rows))
                if rows:
                    await self._write(rows)

    async def prune(self) -> None:
        """Delete expired conversations and keep the total bound, at start and then every
        ``min(PRUNE_EVERY, ttl / 2)`` seconds, until cancelled."""
        structlog.contextvars.clear_contextvars()
        every = min(PRUNE_EVERY, self.ttl / 2)
        while True:
            try:
                expired, evicted = await self.store.run(
                    stored.prune_chains, self.store, time.time() - self.ttl, self.total_max_bytes
                )
                if expired or evicted:
                    log.info("durable chains pruned", expired=expired, evicted=evicted)
            except Exception:
                log.exception("durable chain prune failed")
            await trio.sleep(every)

    async def lookup(self, anchor: str) -> Recalled | None:
        """The stored turns from ``anchor`` back to its conversation's start (None: not
        stored, expired, or the store failed or ran out of time)."""
        self.lookups += 1
        since = time.time() - self.ttl
        rows: list[stored.StoredNode] | None = None
        with trio.move_on_after(self.lookup_timeout) as deadline:
            try:
                rows = await self.store.run(
                    stored.load_chain,
                    self.store,
                    anchor,
                    since,
                    self.lookup_timeout,
                    abandon_on_cancel=True,
                )
            except Exception as exc:
                self.lookup_failures += 1
                log.warning("durable chain lookup failed", error=type(exc).__name__)
                return None
        if deadline.cancelled_caught:
            self.lookup_failures += 1
            log.warning("durable chain lookup timed out", timeout=self.lookup_timeout)
            return None
        if not rows:
            return None
        self.found += 1
        nodes = [
            (row.response_id, Node(row.parent, row.account, row.input, row.output, row.size))
            for row in rows
        ]
        return Recalled(rows[-1].conversation, nodes)

    def _take(self, rows: list[stored.StoredNode], limit: int | None = None) -> None:
        limit = self.batch if limit is None else limit
        while len(rows) < limit:
            try:
                rows.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break

    async def _write(self, rows: list[stored.StoredNode]) -> None:
        try:
            await self.store.run(stored.write_nodes, self.store, rows, time.time(), self.max_bytes)
            self.written += len(rows)
        except Exception:
            self.write_failures += 1
            log.exception("durable chain write failed", turns=len(rows))
