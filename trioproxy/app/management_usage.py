"""``GET /api/usage``: usage reports of the management API, as JSON or CSV (docs/usage.md).

The query parameters are read here; the report itself is
:func:`trioproxy.store.usage_report.usage_report`, run in the store's worker thread.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from trioproxy.protocol.errors import ProxyError
from trioproxy.sessions.context import ProxyContext
from trioproxy.store.usage_report import (
    BUCKETS,
    DEFAULT_GROUP_BY,
    parse_group_by,
    parse_time,
    report_csv,
    report_document,
)

FORMATS = ("json", "csv")
CSV_CONTENT_TYPE = "text/csv; charset=utf-8"
CSV_FILENAME = "trioproxy-usage.csv"


def _invalid(param: str, message: str) -> ProxyError:
    return ProxyError.of(400, message, "invalid_parameter", param=param)


def _filter(name: str) -> str | None:
    value = request.args.get(name)
    return value if value else None


def _time(name: str, now: float) -> float | None:
    value = _filter(name)
    if value is None:
        return None
    try:
        return parse_time(value, now=now)
    except ValueError as exc:
        raise _invalid(name, f"{name}: {exc}") from None


def _wants_csv() -> bool:
    answer_format = request.args.get("format")
    if answer_format is None:
        return request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv"
    if answer_format not in FORMATS:
        raise _invalid("format", f"unknown format {answer_format!r}; use json or csv")
    return answer_format == "csv"


def usage_routes(app: QuartTrio, ctx: ProxyContext) -> None:
    """Usage reports: ``GET /api/usage``."""

    @app.get("/api/usage")
    async def usage_report() -> Response:
        now = time.time()
        bucket = request.args.get("bucket", "hour")
        if bucket not in BUCKETS:
            raise _invalid("bucket", f"unknown bucket {bucket!r}; use hour, day or total")
        try:
            group_by = parse_group_by(request.args.get("group_by", ",".join(DEFAULT_GROUP_BY)))
        except ValueError as exc:
            raise _invalid("group_by", str(exc)) from None
        since, until = _time("since", now), _time("until", now)
        if since is not None and until is not None and since > until:
            raise _invalid("since", "since is after until")
        as_csv = _wants_csv()
        filters: dict[str, Any] = {
            "since": since,
            "until": until,
            "key_id": _filter("key"),
            "account_id": _filter("account"),
            "model": _filter("model"),
            "group_by": group_by,
            "bucket": bucket,
        }
        rows = await ctx.store.run(functools.partial(ctx.store.usage_report, **filters))
        if as_csv:
            return Response(
                report_csv(rows, group_by),
                content_type=CSV_CONTENT_TYPE,
                headers={"content-disposition": f'attachment; filename="{CSV_FILENAME}"'},
            )
        return jsonify(
            report_document(rows, bucket=bucket, group_by=group_by, since=since, until=until)
        )
