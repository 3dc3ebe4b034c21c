"""The request log read with filters: ``store/request_query.py`` on a real SQLite store, and
``GET /api/requests`` with its query parameters against a real proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import MockEnv, ProxyFactory
from trioproxy.store import Store
from trioproxy.store.request_query import RequestFilter, StatusFilter, parse_status

ROWS: list[dict[str, Any]] = [
    {"time": 1000.0, "request_id": "r1", "route": "/v1/responses", "status": 200,
     "key_id": "k1", "account_id": "a1", "model": "gpt-5.5"},
    {"time": 2000.0, "request_id": "r2", "route": "/backend-api/codex/responses",
     "status": 429, "key_id": "k2", "account_id": "a2", "model": "gpt-5.4",
     "error_code": "usage_limit_reached"},
    {"time": 3000.0, "request_id": "r3", "route": "/v1/responses", "status": 502,
     "key_id": "k1", "account_id": None, "model": "gpt-5.5"},
    {"time": 4000.0, "request_id": "r4", "route": "/v1/responses", "status": 200,
     "key_id": "loopback", "account_id": "a1", "model": "gpt-5.4"},
]  # fmt: skip


def test_status_filters() -> None:
    assert parse_status("429") == StatusFilter(low=429, high=429)
    assert parse_status("4xx") == StatusFilter(low=400, high=499)
    assert parse_status(" OK ") == StatusFilter(low=100, high=399)
    assert parse_status("error") == StatusFilter(low=400, high=599)
    for wrong in ("", "42", "6xx", "bad", "700"):
        with pytest.raises(ValueError, match="status filter"):
            parse_status(wrong)


def test_each_filter_and_paging_back(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path) as store:
        store.insert_request_logs(ROWS)

        def ids(**which: Any) -> list[str]:
            return [r["request_id"] for r in store.query_requests(RequestFilter(**which))]

        assert ids() == ["r4", "r3", "r2", "r1"]
        assert ids(status=parse_status("error")) == ["r3", "r2"]
        assert ids(status=parse_status("200")) == ["r4", "r1"]
        assert ids(key_id="k1") == ["r3", "r1"]
        assert ids(account_id="a1", model="gpt-5.4") == ["r4"]
        assert ids(route="/v1/responses", status=parse_status("ok")) == ["r4", "r1"]
        assert ids(since=2000.0, until=4000.0) == ["r3", "r2"]
        first_page = store.query_requests(RequestFilter(limit=2))
        assert [r["request_id"] for r in first_page] == ["r4", "r3"]
        assert ids(before_id=first_page[-1]["id"], limit=2) == ["r2", "r1"]


async def test_the_api_filters_the_log(mock: MockEnv, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(mock)
    for model in ("gpt-5.5", "gpt-5.4", "gpt-5.5"):
        answer = await proxy.client.post(proxy.v1_url, json={"model": model, "input": "hi"})
        assert answer.status_code == 200
    refused = await proxy.client.post(
        proxy.v1_url, content=b"{", headers={"content-type": "application/json"}
    )
    assert refused.status_code == 400

    async def ids(**params: Any) -> list[int]:
        answer = await proxy.client.get(f"{proxy.root}/api/requests", params=params)
        assert answer.status_code == 200, answer.text
        return [r["status"] for r in answer.json()["requests"]]

    with trio.fail_after(10):  # the log is written in batches
        for _ in range(1000):
            if len(await ids()) == 4:
                break
            await trio.sleep(0.05)
    assert await ids(status="error") == [400]
    assert await ids(status="ok", model="gpt-5.5") == [200, 200]
    assert await ids(key="loopback", route="/v1/responses", since="1h") == [400, 200, 200, 200]
    assert await ids(account="no-such-account") == []
    assert await ids(limit=1) == [400]
    for name, value in (("status", "7xx"), ("since", "yesterday"), ("before", "x"), ("limit", "x")):
        answer = await proxy.client.get(f"{proxy.root}/api/requests", params={name: value})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == name
