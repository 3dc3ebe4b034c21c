"""Usage reports: the ``usage_hourly`` rows summed by hour, day or over the whole range, per
key, account and model (``GET /api/usage`` and ``trioproxy usage report``, docs/usage.md).

:func:`usage_report` is the query (SQLAlchemy Core; SQLite and PostgreSQL). The rest is the
input and output both fronts share, so they read and write reports the same way: times
(:func:`parse_time`), the ``group_by`` list (:func:`parse_group_by`), a report as JSON (:func:`report_document`) and
as CSV (:func:`report_csv`).
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from trioproxy.store import schema

BUCKETS = ("hour", "day", "total")
#: what a report can be grouped by -> the column (and result field) it groups on
GROUP_FIELDS = {"key": "key_id", "account": "account_id", "model": "model"}
DEFAULT_GROUP_BY = ("key", "account", "model")
#: the summed fields of each row: the stored counts, then ``tokens`` (input + output)
SUM_FIELDS = (*schema.USAGE_COUNTS, "tokens")
#: cost sums are rounded to a millionth of a dollar (the price table is an estimate anyway)
COST_DIGITS = 6

_HOUR = 3600
_DAY = 86400
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_AGE_UNITS = {"s": 1, "m": 60, "h": _HOUR, "d": _DAY, "w": 7 * _DAY}
TIME_FORMS = "unix seconds, an ISO-8601 date or date and time (UTC unless it has an offset), or an age such as 30m, 24h or 7d"


def parse_time(text: str, *, now: float | None = None) -> float:
    """A point in time as unix seconds, from unix seconds (``1714521600``), an ISO-8601 date
    or date and time (``2024-05-01``, ``2024-05-01T12:00``, ``2024-05-01T12:00+02:00``; UTC
    when there is no offset) or an age (``30m``, ``24h``, ``7d``, also ``s`` and ``w``:
    that long before ``now``). Anything else is a ValueError naming the accepted forms."""
    value = text.strip()
    if _NUMBER.fullmatch(value):
        return float(value)
    age = _AGE.fullmatch(value.lower())
    if age:
        now = time.time() if now is None else now
        return now - float(age.group(1)) * _AGE_UNITS[age.group(2)]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a time; use {TIME_FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_group_by(text: str) -> tuple[str, ...]:
    """A comma list of ``key``, ``account`` and ``model`` (any subset, empty for none), in
    the canonical order; an unknown name is a ValueError."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(GROUP_FIELDS))
    if unknown:
        raise ValueError(
            f"cannot group by {', '.join(unknown)}; use a comma list of {', '.join(GROUP_FIELDS)}"
        )
    return tuple(name for name in GROUP_FIELDS if name in names)


def usage_report(
    conn: sa.Connection,
    *,
    since: float | None = None,
    until: float | None = None,
    key_id: str | None = None,
    account_id: str | None = None,
    model: str | None = None,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
    bucket: str = "hour",
) -> list[dict[str, Any]]:
    """Usage summed per ``bucket`` (``hour``, ``day`` of UTC or ``total``) and per the
    ``group_by`` fields (a subset of ``key``, ``account``, ``model``).

    Rows count when their hour starts at or after the start of the hour that holds
    ``since`` and before ``until``; ``key_id``, ``account_id`` and ``model`` keep only rows
    equal to them. Each result has ``start`` (the bucket's unix time; None for ``total``),
    the grouped fields (``key_id``, ``account_id``, ``model``), the sums of
    :data:`schema.USAGE_COUNTS` (cost rounded to :data:`COST_DIGITS` decimals) and
    ``tokens`` (input + output). Ordered by ``start``, then the grouped fields. An unknown
    bucket or group is a ValueError."""
    if bucket not in BUCKETS:
        raise ValueError(f"unknown bucket {bucket!r}; use one of {', '.join(BUCKETS)}")
    unknown = sorted(set(group_by) - set(GROUP_FIELDS))
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}")
    u = schema.usage_hourly
    start: sa.ColumnElement[Any] | None = None
    if bucket == "hour":
        start = u.c.hour
    elif bucket == "day":
        # integer arithmetic (SQLite may lack floor(), PostgreSQL has no % on doubles) with
        # the day as a literal: PostgreSQL would not see two bound parameters in SELECT and
        # GROUP BY as one expression
        hour = sa.cast(u.c.hour, sa.BigInteger)
        start = hour - hour % sa.literal_column(str(_DAY), sa.BigInteger)
    groups: list[sa.ColumnElement[Any]] = [] if start is None else [start]
    groups += [u.c[GROUP_FIELDS[name]] for name in GROUP_FIELDS if name in group_by]
    sums = [sa.func.sum(u.c[name]).label(name) for name in schema.USAGE_COUNTS]
    columns = [
        *([] if start is None else [start.label("start")]),
        *(column.label(column.name) for column in groups[start is not None :]),
        *sums,
    ]
    query = sa.select(*columns)
    if since is not None:
        query = query.where(u.c.hour >= since - since % _HOUR)
    if until is not None:
        query = query.where(u.c.hour < until)
    for column, wanted in (("key_id", key_id), ("account_id", account_id), ("model", model)):
        if wanted is not None:
            query = query.where(u.c[column] == wanted)
    if groups:
        query = query.group_by(*groups).order_by(*groups)
    rows = conn.execute(query).all()
    return [_result(row._mapping) for row in rows if row._mapping["requests"] is not None]


def _result(row: sa.RowMapping) -> dict[str, Any]:
    """One result row with plain Python numbers (PostgreSQL sums bigints as Decimal)."""
    result: dict[str, Any] = {"start": None if row.get("start") is None else int(row["start"])}
    result.update((field, row[field]) for field in GROUP_FIELDS.values() if field in row)
    result.update((name, int(row[name])) for name in schema.USAGE_COUNTS if name != "cost_usd")
    result["cost_usd"] = round(float(row["cost_usd"]), COST_DIGITS)
    result["tokens"] = result["input_tokens"] + result["output_tokens"]
    return result


def report_totals(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sums of :data:`SUM_FIELDS` over a report's rows."""
    totals: dict[str, Any] = dict.fromkeys(SUM_FIELDS, 0)
    totals["cost_usd"] = 0.0
    for row in rows:
        for name in SUM_FIELDS:
            totals[name] += row[name]
    totals["cost_usd"] = round(totals["cost_usd"], COST_DIGITS)
    return totals


def report_document(
    rows: list[dict[str, Any]],
    *,
    bucket: str,
    group_by: Sequence[str],
    since: float | None,
    until: float | None,
) -> dict[str, Any]:
    """A report as JSON: what was asked (``since`` and ``until`` as unix seconds, or None),
    the rows and their totals."""
    return {
        "bucket": bucket,
        "group_by": list(group_by),
        "since": _seconds(since),
        "until": _seconds(until),
        "rows": rows,
        "totals": report_totals(rows),
    }


def _seconds(moment: float | None) -> float | int | None:
    """Whole seconds as an int (``1714521600``, not ``1714521600.0``)."""
    return int(moment) if moment is not None and moment == int(moment) else moment


def csv_columns(group_by: Sequence[str]) -> list[str]:
    """The CSV header: ``start``, the grouped fields, then :data:`SUM_FIELDS`."""
    return [
        "start",
        *(GROUP_FIELDS[name] for name in GROUP_FIELDS if name in group_by),
        *SUM_FIELDS,
    ]


def iso_time(moment: float) -> str:
    """Unix seconds as ISO-8601 UTC: ``2024-05-01T13:00:00Z``."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_csv(rows: Iterable[Mapping[str, Any]], group_by: Sequence[str]) -> str:
    """A report as CSV (header line first, CRLF line ends): ``start`` as ISO-8601 UTC
    (empty for ``total``), the grouped fields, the sums."""
    out = io.StringIO()
    writer = csv.writer(out)
    columns = csv_columns(group_by)
    writer.writerow(columns)
    for row in rows:
        start = row["start"]
        writer.writerow(
            ["" if start is None else iso_time(start), *(row[name] for name in columns[1:])]
        )
    return out.getvalue()
