"""Durable response chains in the store (tables ``durable_chains``, ``durable_chain_nodes``).

A conversation's remembered turns (``protocol/chain.py``: each turn's packed input and output
blobs, its parent response id and the account that produced it) are written here so that a
replica that did not serve a conversation's last turn can rebuild its next one. The
functions take a :class:`Store` and do blocking database I/O like its methods; async code
calls them through ``store.run(fn, store, ...)`` (``sessions/durable.py``).

Bounds: a conversation keeps at most ``max_bytes`` (what its turns are charged, oldest turns
deleted first) when its turns are written; the pruner deletes the conversations idle for
longer than the TTL and then, while the total is over its bound, the least recently
written ones. A conversation idle for longer than the TTL is never read, pruned or not.

Times are unix seconds (replicas compare them with each other).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import sqlalchemy as sa

from trioproxy.store import schema
from trioproxy.store.store import Store

#: links followed from an anchor back to its conversation's first turn, at most
MAX_DEPTH = 100_000


@attrs.frozen
class StoredNode:
    """One remembered turn as stored (the fields of ``protocol.chain.Node``)."""

    conversation: str
    response_id: str
    parent: str | None
    account: str
    input: bytes
    output: bytes
    size: int
    created_at: float


def write_nodes(store: Store, nodes: Sequence[StoredNode], now: float, max_bytes: int) -> None:
    """Write ``nodes`` (a node already stored is kept as it is), mark their conversations
    written at ``now`` and delete each one's oldest turns past ``max_bytes``; one
    transaction."""
    n, c = schema.durable_chain_nodes, schema.durable_chains
    conversations = sorted({node.conversation for node in nodes})
    with store._write() as conn:
        conn.execute(
            _insert(conn, n).on_conflict_do_nothing(index_elements=["response_id"]),
            [attrs.asdict(node) for node in nodes],
        )
        for conversation in conversations:
            sizes = conn.execute(
                sa.select(n.c.response_id, n.c.size)
                .where(n.c.conversation == conversation)
                .order_by(n.c.created_at.desc(), n.c.response_id.desc())
            ).all()
            kept, dropped = 0, list[str]()
            for response_id, size in sizes:
                if dropped or kept + size > max_bytes:
                    dropped.append(response_id)
                else:
                    kept += size
            if dropped:
                conn.execute(n.delete().where(n.c.response_id.in_(dropped)))
            upsert = _insert(conn, c).values(conversation=conversation, bytes=kept, updated_at=now)
            conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=["conversation"], set_={"bytes": kept, "updated_at": now}
                )
            )


def load_chain(
    store: Store, anchor: str, since: float, statement_timeout: float
) -> list[StoredNode] | None:
    """The stored turns from ``anchor`` back towards its conversation's first turn, oldest
    first, each of a conversation written at or after ``since`` (a turn deleted or of an
    older conversation leaves a gap the caller sees as a missing parent); None when the
    anchor itself is not there. On PostgreSQL no statement runs longer than
    ``statement_timeout`` seconds."""
    n, c = schema.durable_chain_nodes, schema.durable_chains
    walk = (
        sa.select(*n.c, sa.literal(0).label("depth"))
        .where(n.c.response_id == anchor)
        .cte("walk", recursive=True)
    )
    walk = walk.union_all(
        sa.select(*n.c, (walk.c.depth + 1).label("depth")).where(
            n.c.response_id == walk.c.parent, walk.c.depth < MAX_DEPTH
        )
    )
    columns = [walk.c[column.name] for column in n.c]
    query = (
        sa.select(*columns)
        .join(c, c.c.conversation == walk.c.conversation)
        .where(c.c.updated_at >= since)
        .order_by(walk.c.depth.desc())
    )
    with store._read() as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            milliseconds = max(1, int(statement_timeout * 1000))
            conn.execute(sa.text(f"SET LOCAL statement_timeout = {milliseconds}"))
        rows = conn.execute(query).all()
    if not rows or rows[-1].response_id != anchor:
        return None
    return [StoredNode(**row._asdict()) for row in rows]


def prune_chains(store: Store, before: float, total_max_bytes: int) -> tuple[int, int]:
    """Delete the conversations last written before ``before``, then the least recently
    written ones while all together are over ``total_max_bytes``. Returns how many were
    deleted for each reason."""
    c = schema.durable_chains
    with store._write() as conn:
        expired = conn.execute(sa.select(c.c.conversation).where(c.c.updated_at < before))
        stale = [row[0] for row in expired]
        _delete(conn, stale)
        total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(c.c.bytes), 0))).scalar_one()
        evicted: list[str] = []
        if total > total_max_bytes:
            rows = conn.execute(sa.select(c.c.conversation, c.c.bytes).order_by(c.c.updated_at))
            for conversation, size in rows:
                if total <= total_max_bytes:
                    break
                evicted.append(conversation)
                total -= size
            _delete(conn, evicted)
    return len(stale), len(evicted)


def chain_rows(store: Store) -> list[dict[str, Any]]:
    """Every stored conversation with its node count (for tests and inspection)."""
    n, c = schema.durable_chain_nodes, schema.durable_chains
    count = (
        sa.select(sa.func.count())
        .where(n.c.conversation == c.c.conversation)
        .scalar_subquery()
        .label("nodes")
    )
    with store._read() as conn:
        rows = conn.execute(sa.select(c, count).order_by(c.c.updated_at)).all()
    return [dict(row._mapping) for row in rows]


def _delete(conn: sa.Connection, conversations: list[str]) -> None:
    n, c = schema.durable_chain_nodes, schema.durable_chains
    for start in range(0, len(conversations), 500):
        some = conversations[start : start + 500]
        conn.execute(n.delete().where(n.c.conversation.in_(some)))
        conn.execute(c.delete().where(c.c.conversation.in_(some)))


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    """``INSERT`` with ``ON CONFLICT`` for this connection's dialect (SQLite, PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)
