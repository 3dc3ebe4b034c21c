"""Durable response chains (docs/continuity.md): two replicas on one real PostgreSQL, in front
of the mock backend. A turn served by replica A is re-anchored by replica B from the
database, over WebSocket and over HTTP; the bounds, the TTL, SQLite and a failing database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import (
    final_text,
    open_ws,
    parse_sse,
    post_responses,
    request_body,
    response_id,
    user_message,
    ws_turn,
)
from tests.pg_support import PgServer
from tests.test_replicas import SECRET, replicas
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.store import Store
from trioproxy.store.chains import chain_rows

BETA = {"openai-beta": "responses_websockets=2026-02-06"}


def output_items(events: list[dict[str, Any]]) -> list[Any]:
    return [e["item"] for e in events if e.get("type") == "response.output_item.done"]


async def stored(url: str, data_dir: Path, secret: str = SECRET) -> list[dict[str, Any]]:
    """The durable chains in the database at ``url`` (conversation, bytes, nodes)."""

    def read() -> list[dict[str, Any]]:
        with Store.open(url, data_dir=data_dir, secret_key=secret) as store:
            return chain_rows(store)

    return await trio.to_thread.run_sync(read)


async def wait_stored(
    url: str, tmp_path: Path, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Poll the database until ``done`` holds for its chains (the writer works off the
    turn's path: there is no event to wait on)."""
    with trio.fail_after(10):
        while True:
            rows = await stored(url, tmp_path)
            if done(rows):
                return rows
            await trio.sleep(0.02)


async def two_replicas(
    make_mock: MockFactory, make_proxy: ProxyFactory, url: str, **options: Any
) -> tuple[MockEnv, ProxyEnv, ProxyEnv]:
    mock = await make_mock(MockConfig(accounts=1))
    a, b = await replicas(make_proxy, mock, url, 2, **options)
    return mock, a, b


async def counters(proxy: ProxyEnv) -> dict[str, int]:
    stats: dict[str, int] = (await proxy.client.get(f"{proxy.root}/api/stats")).json()["counters"]
    return stats


async def test_a_websocket_turn_served_by_a_is_rebuilt_by_b_from_the_database(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.database()
    mock, a, b = await two_replicas(make_mock, make_proxy, url)
    async with open_ws(a.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("first"))
    anchor = response_id(first)
    await wait_stored(url, tmp_path, lambda rows: sum(r["nodes"] for r in rows) == 1)
    async with open_ws(b.codex_url, BETA) as ws:
        second = await ws_turn(ws, request_body("second", previous_response_id=anchor))
        assert final_text(second) == DEFAULT_ANSWER
        # the next turn anchors on B's own response, which its socket holds
        third = await ws_turn(ws, request_body("third", previous_response_id=response_id(second)))
        assert final_text(third) == DEFAULT_ANSWER
    messages = await mock.control.model_requests(transport="ws")
    rebuilt = messages[1]["body"]
    assert "previous_response_id" not in rebuilt
    # exactly what A's own chain would send: turn 1's input and output (same account:
    # its reasoning kept), then the new input
    assert rebuilt["input"] == [
        user_message("first"),
        *output_items(first),
        user_message("second"),
    ]
    assert messages[2]["body"]["previous_response_id"] == response_id(second)
    assert (await counters(b))["durable_chain_recalled"] == 1
    # B's turns extend the conversation A started: one stored conversation, three turns
    rows = await wait_stored(url, tmp_path, lambda rows: sum(r["nodes"] for r in rows) == 3)
    assert len(rows) == 1


async def test_an_http_bridge_turn_served_by_a_is_rebuilt_by_b_from_the_database(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.database()
    mock, a, b = await two_replicas(make_mock, make_proxy, url)
    session = {"session-id": "thread-7"}
    response, first = await post_responses(a.client, a.codex_url, session, request_body("first"))
    assert response.status_code == 200
    await wait_stored(url, tmp_path, lambda rows: sum(r["nodes"] for r in rows) == 1)
    body = request_body("second", previous_response_id=response_id(first))
    response, second = await post_responses(b.client, b.codex_url, session, body)
    assert response.status_code == 200 and final_text(second) == DEFAULT_ANSWER
    rebuilt = (await mock.control.model_requests())[-1]
    assert rebuilt["transport"] == "ws" and "previous_response_id" not in rebuilt["body"]
    assert rebuilt["body"]["input"] == [
        user_message("first"),
        *output_items(first),
        user_message("second"),
    ]


async def test_a_plain_http_turn_is_rebuilt_from_the_database_too(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    # no session key on B: a plain HTTP turn; upstream refuses the anchor over HTTP, and
    # the turn is rebuilt from the chain A wrote
    url = pg_server.database()
    mock, a, b = await two_replicas(make_mock, make_proxy, url)
    async with open_ws(a.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("first"))
    await wait_stored(url, tmp_path, lambda rows: sum(r["nodes"] for r in rows) == 1)
    body = request_body("second", previous_response_id=response_id(first))
    response, second = await post_responses(b.client, b.codex_url, {}, body)
    assert response.status_code == 200 and final_text(second) == DEFAULT_ANSWER
    sent = (await mock.control.model_requests(transport="http"))[-1]["body"]
    assert "previous_response_id" not in sent
    assert sent["input"] == [user_message("first"), *output_items(first), user_message("second")]


async def test_past_its_bound_a_stored_chain_drops_its_oldest_turns(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.database()
    # room for one of the mock's turns (each is charged 500 to 1000 bytes), not two
    mock, a, b = await two_replicas(make_mock, make_proxy, url, durable_chain_max_bytes=1000)
    async with open_ws(a.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("first"))
        second = await ws_turn(ws, request_body("again", previous_response_id=response_id(first)))
    rows = await wait_stored(url, tmp_path, lambda rows: bool(rows) and rows[0]["nodes"] == 1)
    assert 500 < rows[0]["bytes"] <= 1000
    async with open_ws(b.codex_url, BETA) as ws:
        # the newest turn is stored, but its chain reaches the dropped first turn: the
        # client is asked to resend, as without durable chains
        refused = await ws_turn(ws, request_body("third", previous_response_id=response_id(second)))
        assert refused[-1]["type"] == "error"
        assert refused[-1]["error"]["code"] == "previous_response_not_found"
        # and the session goes on with a full resend
        resent = await ws_turn(ws, request_body("third"))
        assert final_text(resent) == DEFAULT_ANSWER
    assert len(await mock.control.model_requests(transport="ws")) == 3


async def test_a_stored_chain_expires_after_its_idle_ttl(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.database()
    _mock, a, b = await two_replicas(make_mock, make_proxy, url, durable_chain_ttl=0.3)
    async with open_ws(a.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("first"))
    await wait_stored(url, tmp_path, lambda rows: bool(rows))
    await wait_stored(url, tmp_path, lambda rows: not rows)  # the pruner deleted it
    async with open_ws(b.codex_url, BETA) as ws:
        refused = await ws_turn(ws, request_body("second", previous_response_id=response_id(first)))
    assert refused[-1]["error"]["code"] == "previous_response_not_found"
    assert (await counters(b))["durable_chain_missed"] == 1


async def test_with_sqlite_or_a_ttl_of_0_nothing_is_written(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    url = pg_server.database()
    on_sqlite = await make_proxy(mock)
    on_pg_off = await make_proxy(mock, database_url=url, secret_key=SECRET, durable_chain_ttl=0)
    for proxy in (on_sqlite, on_pg_off):
        async with open_ws(proxy.codex_url, BETA) as ws:
            first = await ws_turn(ws, request_body("first"))
            await ws_turn(ws, request_body("again", previous_response_id=response_id(first)))
        async with open_ws(proxy.codex_url, BETA) as ws:
            refused = await ws_turn(
                ws, request_body("again", previous_response_id=response_id(first))
            )
        assert refused[-1]["error"]["code"] == "previous_response_not_found"
        assert "durable_chain_missed" not in await counters(proxy)  # never looked up
    settings = on_sqlite.settings
    assert await stored(settings.resolved_database_url, settings.data_dir, "") == []
    assert await stored(url, tmp_path) == []


async def test_a_failing_database_makes_the_turn_fall_back_to_a_resend(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.database()
    _mock, a, b = await two_replicas(make_mock, make_proxy, url)
    session = {"session-id": "thread-9"}
    async with open_ws(a.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("first"))
    await wait_stored(url, tmp_path, lambda rows: bool(rows))
    pg_server.execute("DROP TABLE durable_chain_nodes", database=url.rsplit("/", 1)[1])
    anchored = request_body("second", previous_response_id=response_id(first))
    async with open_ws(b.codex_url, BETA) as ws:
        refused = await ws_turn(ws, anchored)
        assert refused[-1]["error"]["code"] == "previous_response_not_found"
        resent = await ws_turn(ws, request_body("second"))
        assert final_text(resent) == DEFAULT_ANSWER
    response = await b.client.post(b.codex_url, headers=session, json=anchored)
    assert response.status_code == 502
    assert parse_sse(response.text) == [] and response.json()["error"]["code"] == (
        "stream_incomplete"
    )
    assert (await counters(b))["durable_chain_missed"] == 2


async def test_a_database_too_slow_to_answer_makes_the_turn_fall_back_not_hang(
    make_mock: MockFactory, make_proxy: ProxyFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    import psycopg

    url = pg_server.database()
    _mock, a, b = await two_replicas(make_mock, make_proxy, url)
    async with open_ws(a.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("first"))
    await wait_stored(url, tmp_path, lambda rows: bool(rows))
    # another session holds the table locked: the lookup waits until its deadline
    locker: psycopg.Connection[Any] = await trio.to_thread.run_sync(lambda: psycopg.connect(url))
    try:
        await trio.to_thread.run_sync(
            locker.execute, "LOCK TABLE durable_chain_nodes IN ACCESS EXCLUSIVE MODE"
        )
        async with open_ws(b.codex_url, BETA) as ws:
            refused = await ws_turn(
                ws, request_body("second", previous_response_id=response_id(first))
            )
        assert refused[-1]["error"]["code"] == "previous_response_not_found"
    finally:
        await trio.to_thread.run_sync(locker.close)
    assert (await counters(b))["durable_chain_missed"] == 1
