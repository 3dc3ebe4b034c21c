"""Reading the request log with filters (``GET /api/requests``).

:class:`RequestFilter` is what a reader may ask for; :func:`parse_status` reads the
``status`` filter's text; :func:`query_requests` is the query (SQLAlchemy Core, SQLite and
PostgreSQL), newest first. Paging goes backwards by row id: ``before_id`` is the smallest
``id`` of the page already read.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import sqlalchemy as sa

from trioproxy.store import schema

#: what ``status`` takes, for messages
STATUS_FORMS = "a status code (429), a class (2xx, 4xx, 5xx), ok (below 400) or error (400 and up)"
_CLASS = re.compile(r"([1-5])xx")
MAX_LIMIT = 1000


@attrs.frozen(kw_only=True)
class StatusFilter:
    """Statuses from ``low`` to ``high``, both included."""

    low: int
    high: int


def parse_status(text: str) -> StatusFilter:
    """``429``, ``4xx``, ``ok`` or ``error`` as a range of statuses; anything else is a
    ValueError naming the accepted forms."""
    value = text.strip().lower()
    if value.isdigit() and 100 <= int(value) <= 599:
        return StatusFilter(low=int(value), high=int(value))
    match = _CLASS.fullmatch(value)
    if match:
        base = int(match.group(1)) * 100
        return StatusFilter(low=base, high=base + 99)
    if value == "ok":
        return StatusFilter(low=100, high=399)
    if value == "error":
        return StatusFilter(low=400, high=599)
    raise ValueError(f"{text!r} is not a status filter; use {STATUS_FORMS}")


@attrs.frozen(kw_only=True)
class RequestFilter:
    """Which request records to read; a field left None does not filter."""

    status: StatusFilter | None = None
    key_id: str | None = None
    account_id: str | None = None
    model: str | None = None
    route: str | None = None
    since: float | None = None  # records at or after (unix seconds)
    until: float | None = None  # records before
    before_id: int | None = None  # records older than this row (paging)
    limit: int = 100


def query_requests(conn: sa.Connection, which: RequestFilter) -> list[dict[str, Any]]:
    """The newest ``which.limit`` records that match, newest first, ``decision`` parsed."""
    t = schema.request_log
    query = sa.select(t)
    if which.status is not None:
        query = query.where(t.c.status.between(which.status.low, which.status.high))
    for column, value in (
        (t.c.key_id, which.key_id),
        (t.c.account_id, which.account_id),
        (t.c.model, which.model),
        (t.c.route, which.route),
    ):
        if value is not None:
            query = query.where(column == value)
    if which.since is not None:
        query = query.where(t.c.time >= which.since)
    if which.until is not None:
        query = query.where(t.c.time < which.until)
    if which.before_id is not None:
        query = query.where(t.c.id < which.before_id)
    limit = max(1, min(MAX_LIMIT, which.limit))
    rows = conn.execute(query.order_by(t.c.id.desc()).limit(limit)).all()
    return [schema.request_log_record(row._mapping) for row in rows]
