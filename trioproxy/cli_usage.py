"""``trioproxy usage report``: usage by time, key, account and model, read from the store
(no running server needed; docs/usage.md). Options are resolved like the other offline
commands' (flags > ``TRIOPROXY_*`` environment > ``--config`` TOML > defaults).

Exit codes: 0 done (an empty report too); 1 the store could not be opened; 2 a usage error.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from trioproxy.cli_admin import _table, open_store
from trioproxy.cli_options import settings_options
from trioproxy.store.usage_report import (
    BUCKETS,
    DEFAULT_GROUP_BY,
    GROUP_FIELDS,
    TIME_FORMS,
    parse_group_by,
    parse_time,
    report_csv,
    report_document,
)

#: table heading of each grouped field
_GROUP_HEADINGS = {"key_id": "KEY", "account_id": "ACCOUNT", "model": "MODEL"}
_COUNT_COLUMNS = (
    ("REQUESTS", "requests"),
    ("INPUT", "input_tokens"),
    ("CACHED", "cached_tokens"),
    ("OUTPUT", "output_tokens"),
    ("REASONING", "reasoning_tokens"),
    ("TOKENS", "tokens"),
)


@click.group()
def usage() -> None:
    """Report what the proxy's clients used: requests, tokens and estimated cost."""


def _time_option(value: str | None, param: str, now: float) -> float | None:
    if value is None:
        return None
    try:
        return parse_time(value, now=now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=param) from None


def _start_cell(start: int | None, bucket: str) -> str:
    if start is None:
        return "total"
    moment = datetime.fromtimestamp(start, UTC)
    return moment.strftime("%Y-%m-%d" if bucket == "day" else "%Y-%m-%d %H:00")


@usage.command("report")
@click.option(
    "--key", "key_id", help="Only this API key (its id; `loopback` for clients without one)."
)
@click.option("--account", "account_id", help="Only this account id.")
@click.option("--model", help="Only this model.")
@click.option("--since", help=f"From this time on; {TIME_FORMS}.")
@click.option("--until", help="Before this time (same forms as --since).")
@click.option(
    "--bucket",
    type=click.Choice(BUCKETS),
    default="day",
    show_default=True,
    help="Sum by hour, by day (UTC) or over the whole range.",
)
@click.option(
    "--group-by",
    default=",".join(DEFAULT_GROUP_BY),
    show_default=True,
    help=f"Comma list of {', '.join(GROUP_FIELDS)} (empty: no grouping).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (as GET /api/usage does).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (as GET /api/usage does).")
@settings_options
def report(
    key_id: str | None,
    account_id: str | None,
    model: str | None,
    since: str | None,
    until: str | None,
    bucket: str,
    group_by: str,
    as_json: bool,
    as_csv: bool,
    config_file: Path | None,
    **overrides: Any,
) -> None:
    """Show usage summed by day (or hour, or over the whole range) per key, account and
    model: requests, input tokens (cached ones included), output tokens (reasoning ones
    included), their sum and the estimated cost in USD. Times are UTC.

    \b
    Examples:
      trioproxy usage report --since 7d
      trioproxy usage report --since 2024-05-01 --until 2024-06-01 --bucket total --group-by key
      trioproxy usage report --since 24h --bucket hour --csv > usage.csv
    """
    if as_json and as_csv:
        raise click.UsageError("--json and --csv cannot be used together")
    now = time.time()
    start, end = _time_option(since, "--since", now), _time_option(until, "--until", now)
    if start is not None and end is not None and start > end:
        raise click.UsageError("--since is after --until")
    try:
        groups = parse_group_by(group_by)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--group-by") from None
    with open_store(config_file, overrides) as store:
        rows = store.usage_report(
            since=start,
            until=end,
            key_id=key_id,
            account_id=account_id,
            model=model,
            group_by=groups,
            bucket=bucket,
        )
    if as_json:
        document = report_document(rows, bucket=bucket, group_by=groups, since=start, until=end)
        click.echo(json.dumps(document, indent=2))
        return
    if as_csv:
        click.echo(report_csv(rows, groups), nl=False)
        return
    if not rows:
        click.echo("no usage recorded for this time range and these filters")
        return
    fields = [GROUP_FIELDS[name] for name in groups]
    headers = [
        "START",
        *(_GROUP_HEADINGS[field] for field in fields),
        *(heading for heading, _ in _COUNT_COLUMNS),
        "COST USD",
    ]
    table = [
        [
            _start_cell(row["start"], bucket),
            *(row[field] or "-" for field in fields),
            *(str(row[name]) for _, name in _COUNT_COLUMNS),
            f"{row['cost_usd']:.4f}",
        ]
        for row in rows
    ]
    click.echo(_table(headers, table))
