"""Usage reports: the aggregation over ``usage_hourly`` (SQLite), ``GET /api/usage`` on a real
proxy over loopback (JSON, CSV, bad parameters) and ``trioproxy usage report``."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import MockEnv, ProxyEnv, ProxyFactory
from trioproxy.cli import main
from trioproxy.store import Store
from trioproxy.store.schema import USAGE_COUNTS
from trioproxy.store.usage_report import (
    parse_group_by,
    parse_time,
    report_csv,
    report_totals,
)

DAY1 = datetime(2024, 5, 1, tzinfo=UTC).timestamp()  # 1714521600
DAY2 = DAY1 + 86400
HOUR = 3600


def usage(hour: float, key: str, account: str, model: str, **counts: float) -> dict[str, Any]:
    return {
        "hour": hour,
        "key_id": key,
        "account_id": account,
        "model": model,
        **dict.fromkeys(USAGE_COUNTS, 0),
        **counts,
    }


#: two hours late on 2024-05-01 and two early on 2024-05-02 (UTC)
SEED = [
    usage(
        DAY1 + 22 * HOUR,
        "k1",
        "acct-a",
        "gpt-5",
        requests=2,
        input_tokens=100,
        cached_tokens=40,
        output_tokens=10,
        reasoning_tokens=4,
        cost_usd=0.01,
    ),
    usage(
        DAY1 + 22 * HOUR,
        "k1",
        "acct-b",
        "gpt-5",
        requests=1,
        errors=1,
        input_tokens=50,
        output_tokens=5,
        cost_usd=0.002,
    ),
    usage(
        DAY1 + 23 * HOUR,
        "k2",
        "acct-a",
        "gpt-5-mini",
        requests=3,
        input_tokens=300,
        cached_tokens=100,
        output_tokens=30,
        reasoning_tokens=10,
        cost_usd=0.0035,
    ),
    usage(
        DAY2,
        "k1",
        "acct-a",
        "gpt-5",
        requests=4,
        input_tokens=400,
        cached_tokens=200,
        output_tokens=40,
        reasoning_tokens=20,
        cost_usd=0.02,
    ),
    usage(DAY2 + HOUR, "loopback", "", "", requests=1, errors=1),
]


def counts(
    requests: int,
    errors: int,
    input_tokens: int,
    cached_tokens: int,
    output_tokens: int,
    reasoning_tokens: int,
    cost_usd: float,
) -> dict[str, Any]:
    return {
        "requests": requests,
        "errors": errors,
        "input_tokens": input_tokens,
        "cached_tokens": cached_tokens,
        "output_tokens": output_tokens,
        "reasoning_tokens": reasoning_tokens,
        "cost_usd": cost_usd,
        "tokens": input_tokens + output_tokens,
    }


def open_store(data_dir: Path) -> Store:
    return Store.open(f"sqlite:///{data_dir / 'trioproxy.db'}", data_dir=data_dir)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    with open_store(data_dir) as store:
        store.flush_usage(SEED, {}, replica="t")
        yield store


# -- the aggregation -----------------------------------------------------------------------
def test_hour_bucket_grouped_by_everything_is_the_rows_in_order(store: Store) -> None:
    rows = store.usage_report(bucket="hour", group_by=("key", "account", "model"))
    assert rows == [
        {
            "start": int(s["hour"]),
            "key_id": s["key_id"],
            "account_id": s["account_id"],
            "model": s["model"],
            **counts(*(s[name] for name in USAGE_COUNTS)),
        }
        for s in SEED
    ]
    assert rows[0]["start"] == 1714600800 and rows[0]["tokens"] == 110


def test_flushing_the_same_hour_again_adds_up(store: Store) -> None:
    store.flush_usage(SEED[:1], {}, replica="t")
    rows = store.usage_report(
        bucket="hour", group_by=("account",), key_id="k1", until=DAY1 + 23 * HOUR
    )
    assert rows == [
        {"start": 1714600800, "account_id": "acct-a", **counts(4, 0, 200, 80, 20, 8, 0.02)},
        {"start": 1714600800, "account_id": "acct-b", **counts(1, 1, 50, 0, 5, 0, 0.002)},
    ]


def test_day_bucket_splits_at_utc_midnight(store: Store) -> None:
    rows = store.usage_report(bucket="day", group_by=("key",))
    assert rows == [
        {"start": 1714521600, "key_id": "k1", **counts(3, 1, 150, 40, 15, 4, 0.012)},
        {"start": 1714521600, "key_id": "k2", **counts(3, 0, 300, 100, 30, 10, 0.0035)},
        {"start": 1714608000, "key_id": "k1", **counts(4, 0, 400, 200, 40, 20, 0.02)},
        {"start": 1714608000, "key_id": "loopback", **counts(1, 1, 0, 0, 0, 0, 0.0)},
    ]


def test_day_bucket_grouped_by_nothing(store: Store) -> None:
    assert store.usage_report(bucket="day", group_by=()) == [
        {"start": 1714521600, **counts(6, 1, 450, 140, 45, 14, 0.0155)},
        {"start": 1714608000, **counts(5, 1, 400, 200, 40, 20, 0.02)},
    ]


def test_total_bucket(store: Store) -> None:
    assert store.usage_report(bucket="total", group_by=()) == [
        {"start": None, **counts(11, 2, 850, 340, 85, 34, 0.0355)}
    ]
    assert store.usage_report(bucket="total", group_by=("model",)) == [
        {"start": None, "model": "", **counts(1, 1, 0, 0, 0, 0, 0.0)},
        {"start": None, "model": "gpt-5", **counts(7, 1, 550, 240, 55, 24, 0.032)},
        {"start": None, "model": "gpt-5-mini", **counts(3, 0, 300, 100, 30, 10, 0.0035)},
    ]
    assert store.usage_report(bucket="total", group_by=("account",)) == [
        {"start": None, "account_id": "", **counts(1, 1, 0, 0, 0, 0, 0.0)},
        {"start": None, "account_id": "acct-a", **counts(9, 0, 800, 340, 80, 34, 0.0335)},
        {"start": None, "account_id": "acct-b", **counts(1, 1, 50, 0, 5, 0, 0.002)},
    ]


def test_group_order_is_fixed_whatever_order_it_is_asked_in(store: Store) -> None:
    rows = store.usage_report(bucket="total", group_by=("model", "key"))
    assert [(r["key_id"], r["model"]) for r in rows] == [
        ("k1", "gpt-5"),
        ("k2", "gpt-5-mini"),
        ("loopback", ""),
    ]
    assert list(rows[0]) == ["start", "key_id", "model", *USAGE_COUNTS, "tokens"]


def test_filters(store: Store) -> None:
    def total(**filters: Any) -> dict[str, Any] | None:
        rows = store.usage_report(bucket="total", group_by=(), **filters)
        return rows[0] if rows else None

    assert total(key_id="k1") == {"start": None, **counts(7, 1, 550, 240, 55, 24, 0.032)}
    assert total(account_id="acct-a", model="gpt-5") == {
        "start": None,
        **counts(6, 0, 500, 240, 50, 24, 0.03),
    }
    assert total(account_id="") == {"start": None, **counts(1, 1, 0, 0, 0, 0, 0.0)}
    assert total(key_id="k1", model="gpt-5-mini") is None
    # since counts the whole hour that holds it; until is exclusive
    assert total(since=DAY1 + 22 * HOUR + 1800, until=DAY1 + 23 * HOUR) == {
        "start": None,
        **counts(3, 1, 150, 40, 15, 4, 0.012),
    }
    assert total(since=DAY1 + 22 * HOUR + 1, until=DAY2)["requests"] == 6  # type: ignore[index]
    assert total(since=DAY2 + 1)["requests"] == 5  # type: ignore[index]
    assert total(since=DAY2 + HOUR)["requests"] == 1  # type: ignore[index]
    assert total(until=DAY2 + 1)["requests"] == 10  # type: ignore[index]
    assert total(since=DAY2 + 2 * HOUR) is None


def test_an_empty_range_is_no_rows_in_every_shape(store: Store) -> None:
    for bucket in ("hour", "day", "total"):
        for group_by in ((), ("key",), ("key", "account", "model")):
            assert (
                store.usage_report(since=DAY1, until=DAY1, bucket=bucket, group_by=group_by) == []
            )


def test_unknown_bucket_or_group_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown bucket 'week'"):
        store.usage_report(bucket="week", group_by=())
    with pytest.raises(ValueError, match="cannot group by replica"):
        store.usage_report(bucket="day", group_by=("key", "replica"))


def test_totals_and_csv_of_a_report(store: Store) -> None:
    rows = store.usage_report(bucket="day", group_by=("key", "model"))
    assert report_totals(rows) == counts(11, 2, 850, 340, 85, 34, 0.0355)
    assert report_totals([]) == counts(0, 0, 0, 0, 0, 0, 0.0)
    assert report_csv(rows, ("key", "model")).splitlines() == [
        "start,key_id,model,requests,errors,input_tokens,cached_tokens,output_tokens,"
        "reasoning_tokens,cost_usd,tokens",
        "2024-05-01T00:00:00Z,k1,gpt-5,3,1,150,40,15,4,0.012,165",
        "2024-05-01T00:00:00Z,k2,gpt-5-mini,3,0,300,100,30,10,0.0035,330",
        "2024-05-02T00:00:00Z,k1,gpt-5,4,0,400,200,40,20,0.02,440",
        "2024-05-02T00:00:00Z,loopback,,1,1,0,0,0,0,0.0,0",
    ]
    total = store.usage_report(bucket="total", group_by=())
    assert report_csv(total, ()).splitlines()[1] == ",11,2,850,340,85,34,0.0355,935"


# -- input parsing -------------------------------------------------------------------------
def test_parse_time_forms() -> None:
    now = 1_714_600_000.0
    assert parse_time("1714521600", now=now) == 1714521600
    assert parse_time("1714521600.5", now=now) == 1714521600.5
    assert parse_time("2024-05-01", now=now) == DAY1
    assert parse_time("2024-05-01T13:00", now=now) == DAY1 + 13 * HOUR
    assert parse_time("2024-05-01 13:00:00", now=now) == DAY1 + 13 * HOUR
    assert parse_time("2024-05-01T13:00:00Z", now=now) == DAY1 + 13 * HOUR
    assert parse_time("2024-05-01T13:00:00+02:00", now=now) == DAY1 + 11 * HOUR
    assert parse_time("30m", now=now) == now - 1800
    assert parse_time("24h", now=now) == now - 86400
    assert parse_time("7d", now=now) == now - 7 * 86400
    assert parse_time(" 2W ", now=now) == now - 14 * 86400
    for bad in ("", "yesterday", "7y", "-5", "2024-13-01", "1e9"):
        with pytest.raises(ValueError, match="is not a time"):
            parse_time(bad, now=now)


def test_parse_group_by() -> None:
    assert parse_group_by("model, key") == ("key", "model")
    assert parse_group_by("key,account,model") == ("key", "account", "model")
    assert parse_group_by("") == ()
    with pytest.raises(ValueError, match="cannot group by hour, user"):
        parse_group_by("key,user,hour")


# -- GET /api/usage ------------------------------------------------------------------------
async def usage_proxy(mock: MockEnv, make_proxy: ProxyFactory, **options: Any) -> ProxyEnv:
    proxy = await make_proxy(mock, accounts=[], **options)
    settings = proxy.settings
    with Store.open(
        settings.resolved_database_url, data_dir=settings.data_dir, secret_key=settings.secret_key
    ) as store:
        store.flush_usage(SEED, {}, replica="t")
    return proxy


#: the seeded days only (the proxy may record usage of its own at the current hour)
RANGE = {"since": "2024-05-01", "until": "2024-05-03"}


async def test_api_json_report(mock: MockEnv, make_proxy: ProxyFactory) -> None:
    proxy = await usage_proxy(mock, make_proxy)
    answer = await proxy.client.get(
        f"{proxy.root}/api/usage", params={**RANGE, "bucket": "day", "group_by": "key"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {
        "bucket": "day",
        "group_by": ["key"],
        "since": 1714521600,
        "until": 1714694400,
        "rows": [
            {"start": 1714521600, "key_id": "k1", **counts(3, 1, 150, 40, 15, 4, 0.012)},
            {"start": 1714521600, "key_id": "k2", **counts(3, 0, 300, 100, 30, 10, 0.0035)},
            {"start": 1714608000, "key_id": "k1", **counts(4, 0, 400, 200, 40, 20, 0.02)},
            {"start": 1714608000, "key_id": "loopback", **counts(1, 1, 0, 0, 0, 0, 0.0)},
        ],
        "totals": counts(11, 2, 850, 340, 85, 34, 0.0355),
    }

    # the defaults: hourly, grouped by key, account and model
    answer = await proxy.client.get(f"{proxy.root}/api/usage", params=RANGE)
    body = answer.json()
    assert (body["bucket"], body["group_by"]) == ("hour", ["key", "account", "model"])
    assert [(r["start"], r["key_id"], r["account_id"], r["model"]) for r in body["rows"]] == [
        (int(s["hour"]), s["key_id"], s["account_id"], s["model"]) for s in SEED
    ]

    # filters, unix seconds and an offset
    answer = await proxy.client.get(
        f"{proxy.root}/api/usage",
        params={
            "key": "k1",
            "model": "gpt-5",
            "since": "2024-05-02T01:00:00+02:00",  # 2024-05-01T23:00Z
            "until": str(int(DAY2 + HOUR)),
            "bucket": "total",
            "group_by": "account",
        },
    )
    assert answer.json() == {
        "bucket": "total",
        "group_by": ["account"],
        "since": 1714604400,
        "until": 1714611600,
        "rows": [{"start": None, "account_id": "acct-a", **counts(4, 0, 400, 200, 40, 20, 0.02)}],
        "totals": counts(4, 0, 400, 200, 40, 20, 0.02),
    }

    answer = await proxy.client.get(
        f"{proxy.root}/api/usage", params={"since": "2020-01-01", "until": "2020-01-02"}
    )
    assert answer.json()["rows"] == []
    assert answer.json()["totals"] == counts(0, 0, 0, 0, 0, 0, 0.0)


async def test_api_csv_report(mock: MockEnv, make_proxy: ProxyFactory) -> None:
    proxy = await usage_proxy(mock, make_proxy)
    expected = (
        "start,account_id,requests,errors,input_tokens,cached_tokens,output_tokens,"
        "reasoning_tokens,cost_usd,tokens\r\n"
        "2024-05-01T00:00:00Z,acct-a,5,0,400,140,40,14,0.0135,440\r\n"
        "2024-05-01T00:00:00Z,acct-b,1,1,50,0,5,0,0.002,55\r\n"
        "2024-05-02T00:00:00Z,,1,1,0,0,0,0,0.0,0\r\n"
        "2024-05-02T00:00:00Z,acct-a,4,0,400,200,40,20,0.02,440\r\n"
    )
    params = {**RANGE, "bucket": "day", "group_by": "account"}
    by_format = await proxy.client.get(
        f"{proxy.root}/api/usage", params={**params, "format": "csv"}
    )
    by_accept = await proxy.client.get(
        f"{proxy.root}/api/usage", params=params, headers={"accept": "text/csv"}
    )
    for answer in (by_format, by_accept):
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "text/csv; charset=utf-8"
        assert answer.headers["content-disposition"] == 'attachment; filename="trioproxy-usage.csv"'
        assert answer.text == expected
    rows = list(csv.DictReader(io.StringIO(by_format.text)))
    assert sum(int(row["tokens"]) for row in rows) == 935

    # format=json wins over the Accept header
    answer = await proxy.client.get(
        f"{proxy.root}/api/usage",
        params={**params, "format": "json"},
        headers={"accept": "text/csv"},
    )
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["totals"]["requests"] == 11


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        ({"bucket": "week"}, "bucket", "unknown bucket 'week'; use hour, day or total"),
        ({"group_by": "key,replica"}, "group_by", "cannot group by replica"),
        ({"since": "yesterday"}, "since", "since: 'yesterday' is not a time"),
        ({"until": "2024-02-30"}, "until", "until: '2024-02-30' is not a time"),
        ({"since": "2024-05-02", "until": "2024-05-01"}, "since", "since is after until"),
        ({"format": "xml"}, "format", "unknown format 'xml'; use json or csv"),
    ],
)
async def test_api_bad_parameters_are_400(
    mock: MockEnv, make_proxy: ProxyFactory, params: dict[str, str], param: str, message: str
) -> None:
    proxy = await make_proxy(mock, accounts=[])
    answer = await proxy.client.get(f"{proxy.root}/api/usage", params=params)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_parameter",
        param,
    )
    assert error["message"].startswith(message), error["message"]


async def test_api_needs_the_clients_key(mock: MockEnv, make_proxy: ProxyFactory) -> None:
    proxy = await usage_proxy(mock, make_proxy, api_key=True)
    answer = await proxy.client.get(f"{proxy.root}/api/usage", params=RANGE)
    assert answer.status_code == 200 and answer.json()["totals"]["requests"] == 11
    refused = await proxy.client.get(
        f"{proxy.root}/api/usage", params=RANGE, headers={"authorization": ""}
    )
    assert refused.status_code == 401, refused.text


# -- trioproxy usage report ------------------------------------------------------------------
def run_cli(data_dir: Path, *args: str) -> Any:
    return CliRunner().invoke(
        main, ["usage", "report", *args, "--data-dir", str(data_dir)], catch_exceptions=False
    )


@pytest.fixture(autouse=True)
def no_trioproxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TRIOPROXY_"):
            monkeypatch.delenv(name)


def test_cli_table_by_day(store: Store, data_dir: Path) -> None:
    result = run_cli(data_dir, "--since", "2024-05-01", "--until", "2024-05-03")
    assert result.exit_code == 0, result.output
    assert result.output == (
        "START       KEY       ACCOUNT  MODEL       REQUESTS  INPUT  CACHED  OUTPUT  REASONING  TOKENS  COST USD\n"
        "2024-05-01  k1        acct-a   gpt-5       2         100    40      10      4          110     0.0100\n"
        "2024-05-01  k1        acct-b   gpt-5       1         50     0       5       0          55      0.0020\n"
        "2024-05-01  k2        acct-a   gpt-5-mini  3         300    100     30      10         330     0.0035\n"
        "2024-05-02  k1        acct-a   gpt-5       4         400    200     40      20         440     0.0200\n"
        "2024-05-02  loopback  -        -           1         0      0       0       0          0       0.0000\n"
    )


def test_cli_table_by_hour_and_total(store: Store, data_dir: Path) -> None:
    result = run_cli(
        data_dir, "--bucket", "hour", "--group-by", "model", "--until", "2024-05-02", "--key", "k1"
    )
    assert result.exit_code == 0, result.output
    assert result.output == (
        "START             MODEL  REQUESTS  INPUT  CACHED  OUTPUT  REASONING  TOKENS  COST USD\n"
        "2024-05-01 22:00  gpt-5  3         150    40      15      4          165     0.0120\n"
    )
    result = run_cli(data_dir, "--bucket", "total", "--group-by", "")
    assert result.exit_code == 0, result.output
    assert result.output == (
        "START  REQUESTS  INPUT  CACHED  OUTPUT  REASONING  TOKENS  COST USD\n"
        "total  11        850    340     85      34         935     0.0355\n"
    )


def test_cli_json_and_csv(store: Store, data_dir: Path) -> None:
    result = run_cli(data_dir, "--bucket", "total", "--group-by", "key", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "bucket": "total",
        "group_by": ["key"],
        "since": None,
        "until": None,
        "rows": [
            {"start": None, "key_id": "k1", **counts(7, 1, 550, 240, 55, 24, 0.032)},
            {"start": None, "key_id": "k2", **counts(3, 0, 300, 100, 30, 10, 0.0035)},
            {"start": None, "key_id": "loopback", **counts(1, 1, 0, 0, 0, 0, 0.0)},
        ],
        "totals": counts(11, 2, 850, 340, 85, 34, 0.0355),
    }
    result = run_cli(data_dir, "--group-by", "key", "--csv", "--since", "1714608000")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.decode() == (
        "start,key_id,requests,errors,input_tokens,cached_tokens,output_tokens,"
        "reasoning_tokens,cost_usd,tokens\r\n"
        "2024-05-02T00:00:00Z,k1,4,0,400,200,40,20,0.02,440\r\n"
        "2024-05-02T00:00:00Z,loopback,1,1,0,0,0,0,0.0,0\r\n"
    )


def test_cli_relative_since_and_an_empty_report(data_dir: Path) -> None:
    now = time.time()
    this_hour = now - now % HOUR
    with open_store(data_dir) as store:
        store.flush_usage(
            [
                usage(this_hour, "k1", "acct-a", "gpt-5", requests=2, input_tokens=7),
                usage(this_hour - 10 * 86400, "k1", "acct-a", "gpt-5", requests=5),
            ],
            {},
            replica="t",
        )
    result = run_cli(data_dir, "--since", "7d", "--bucket", "total", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["totals"] == counts(2, 0, 7, 0, 0, 0, 0.0)
    result = run_cli(data_dir, "--since", "30d", "--bucket", "total", "--json")
    assert json.loads(result.output)["totals"]["requests"] == 7
    result = run_cli(data_dir, "--model", "gpt-4")
    assert result.exit_code == 0, result.output
    assert result.output == "no usage recorded for this time range and these filters\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "Invalid value for --since: 'yesterday' is not a time"),
        (["--until", "soon"], "Invalid value for --until: 'soon' is not a time"),
        (["--since", "2024-05-02", "--until", "2024-05-01"], "--since is after --until"),
        (["--group-by", "key,hour"], "Invalid value for --group-by: cannot group by hour"),
        (["--bucket", "week"], "Invalid value for '--bucket'"),
        (["--json", "--csv"], "--json and --csv cannot be used together"),
    ],
)
def test_cli_usage_errors(data_dir: Path, args: list[str], message: str) -> None:
    result = run_cli(data_dir, *args)
    assert result.exit_code == 2
    assert message in result.output
