"""Shutdown, the request log, logs and the management API of a running proxy."""

from __future__ import annotations

import json
import signal
import sys
from functools import partial
from pathlib import Path

import httpx
import trio

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import final_text, parse_sse, post_responses, request_body, wait_until
from tests.test_cli import LogReader
from trioproxy.accounts.authfile import parse_auth_json
from trioproxy.config import Settings, load_settings
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.server import serve_proxy
from trioproxy.store import Store


def direct_settings(mock: MockEnv, data: Path, **options: object) -> Settings:
    """Settings of a proxy in front of ``mock`` that a test starts itself."""
    return load_settings(
        environ={},
        overrides={
            "port": 0,
            "data_dir": str(data),
            "upstream_base_url": mock.base_url,
            "auth_base_url": mock.root,
            "usage_poll_interval": 0.0,  # no background usage polls (tests/test_quota_*.py)
            **options,
        },
    )


async def seed_accounts(settings: Settings, mock: MockEnv, *account_ids: str) -> None:
    """Import the mock's accounts into the store before the proxy starts."""
    with Store.open(settings.resolved_database_url, data_dir=settings.data_dir) as store:
        for account_id in account_ids:
            auth = await mock.control.auth_json(account_id)
            store.upsert_account(parse_auth_json(auth, now=mock.backend.clock.now()))


async def test_shutdown_lets_a_turn_in_flight_finish_and_keeps_its_record(
    make_mock: MockFactory, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    settings = direct_settings(mock, tmp_path / "data", drain_timeout=10.0)
    await seed_accounts(settings, mock, "acct-mock-1")
    await mock.control.add_fault("slow", event_delay=0.2, count=1)  # a turn of ~3 s
    shutdown = trio.Event()
    result: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_proxy, settings, shutdown_event=shutdown))

        async def client() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.post(
                    f"http://127.0.0.1:{port}/backend-api/codex/responses",
                    json=request_body("mock:say finished"),
                )
                result["status"] = response.status_code
                result["text"] = final_text(parse_sse(response.text))

        nursery.start_soon(client)
        await wait_until(lambda: mock.backend.stats.in_flight == 1)
        shutdown.set()  # what SIGTERM does
    assert result == {"status": 200, "text": "finished"}
    with Store.open(settings.resolved_database_url, data_dir=settings.data_dir) as store:
        rows = store.recent_requests(10)
    assert len(rows) == 1 and rows[0]["status"] == 200 and rows[0]["output_tokens"]


async def test_a_vanished_client_still_gets_its_record(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    await mock.control.add_fault("slow", event_delay=0.2, count=1)
    async with httpx.AsyncClient() as leaving:
        with trio.move_on_after(0.8):
            async with leaving.stream("POST", proxy.codex_url, json=request_body()) as response:
                async for _ in response.aiter_bytes():
                    pass
    await wait_until(lambda: mock.backend.stats.in_flight == 0)
    rows: list[dict[str, object]] = []

    async def recorded() -> bool:
        rows[:] = (await proxy.client.get(f"{proxy.root}/api/requests")).json()["requests"]
        return bool(rows)

    with trio.fail_after(10):
        while True:
            if await recorded():
                break
            await trio.sleep(0.05)
    assert rows[0]["error_code"] == "client_disconnected"
    assert rows[0]["account_id"] == "acct-mock-1" and rows[0]["ttfb_ms"] is not None


async def test_accounts_can_be_removed_and_bad_imports_are_refused(proxy: ProxyEnv) -> None:
    root = proxy.root
    removed = await proxy.client.delete(f"{root}/api/accounts/acct-mock-1")
    assert removed.status_code == 200
    assert {
        a["account_id"] for a in (await proxy.client.get(f"{root}/api/accounts")).json()["accounts"]
    } == {"acct-mock-2", "acct-mock-3"}
    missing = await proxy.client.delete(f"{root}/api/accounts/acct-nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_account"
    for bad in ({"OPENAI_API_KEY": "sk-x"}, {"tokens": {"access_token": "not-a-jwt"}}, ["x"]):
        response = await proxy.client.post(f"{root}/api/accounts", json=bad)
        assert (
            response.status_code == 400 and response.json()["error"]["code"] == "invalid_auth_json"
        )
        assert "sk-x" not in response.text and "not-a-jwt" not in response.text
    not_json = await proxy.client.post(
        f"{root}/api/accounts", content=b"{", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400
    await proxy.mock.control.clear_requests()
    await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert (await proxy.mock.control.model_requests())[-1]["account"] != "acct-mock-1"


async def test_logs_carry_request_context_and_never_tokens(
    make_mock: MockFactory, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    data = tmp_path / "data"
    secrets_seen = []
    with Store.open(
        load_settings(environ={}, overrides={"data_dir": str(data)}).resolved_database_url,
        data_dir=data,
    ) as store:
        for account in ("acct-mock-1", "acct-mock-2"):
            auth = await mock.control.auth_json(account)
            secrets_seen += [auth["tokens"]["access_token"], auth["tokens"]["refresh_token"]]
            store.upsert_account(parse_auth_json(auth, now=mock.backend.clock.now()))
        _, key = store.create_api_key("logs")
    # the first account's token is dead and its refresh is refused: the proxy logs both
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True, refresh_mode="invalidated")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioproxy.cli", "serve", "--port", "0", "--data-dir", str(data), "--log-format", "json", "--log-level", "debug",
         "--upstream-base-url", mock.base_url, "--auth-base-url", mock.root, "--routing-strategy", "fill_first",
         "--usage-poll-interval", "0"],
        stderr=-1,
    )  # fmt: skip
    try:
        log = LogReader(process)
        url = (await log.expect("serving"))["url"]
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {key}"}) as client:
            response = await client.post(f"{url}/backend-api/codex/responses", json=request_body())
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            # and one turn through the HTTP bridge (a bridge session outlives its request)
            bridged = await client.post(
                f"{url}/backend-api/codex/responses",
                json=request_body(),
                headers={"session-id": "conversation-1"},
            )
            assert bridged.status_code == 200
        # the refresh belongs to the proxy, not to the request that started it
        warning = await log.expect("account needs re-authentication")
        assert warning["account"] == "acct-mock-1" and "request_id" not in warning
        # the request's own lines carry its context
        refused = await log.expect("upstream refused")
        assert refused["request_id"] == request_id
        assert refused["route"] == "/backend-api/codex/responses"
        assert refused["account"] == "acct-mock-1" and refused["kind"] == "unauthorized"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await process.wait()
        assert process.stderr is not None
        rest = b""
        while chunk := await process.stderr.receive_some(65536):
            rest += chunk
        unread = b"\n".join([*log.lines, log.buffer + rest])
        everything = "\n".join(log.seen) + "\n" + unread.decode(errors="replace")
        for secret in [*secrets_seen, key]:
            assert secret not in everything
        lines = [json.loads(line) for line in everything.splitlines() if line.startswith("{")]
        # the bridge session, started by the bridged request, logs as itself
        closed = [line for line in lines if line.get("event") == "bridge session closed"]
        assert closed and all("request_id" not in line for line in closed)
        assert all(line.get("bridge_session") for line in closed)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def test_drain_sequence(make_mock: MockFactory, tmp_path: Path) -> None:
    from trioproxy.upstream.ws import UpstreamClosed, open_upstream_websocket

    mock = await make_mock(MockConfig(accounts=1))
    settings = direct_settings(mock, tmp_path / "data", drain_grace=0.5, drain_timeout=10.0)
    await seed_accounts(settings, mock, "acct-mock-1")
    await mock.control.add_fault("slow", event_delay=0.1, count=2)  # two turns of ~1.5 s
    shutdown = trio.Event()
    seen: dict[str, object] = {}
    busy_turn_started = trio.Event()
    beta = [("openai-beta", "responses_websockets=2026-02-06")]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_proxy, settings, shutdown_event=shutdown))
        base = f"http://127.0.0.1:{port}"
        ws_url = f"ws://127.0.0.1:{port}/backend-api/codex/responses"

        async def idle_session() -> None:
            async with open_upstream_websocket(ws_url, beta) as ws:
                try:
                    await ws.receive()
                except UpstreamClosed as closed:
                    seen["idle_close"] = (closed.code, trio.current_time() - started)

        async def busy_session() -> None:
            async with open_upstream_websocket(ws_url, beta) as ws:
                await ws.send_text(
                    json.dumps({"type": "response.create", **request_body("mock:say busy done")})
                )
                types = []
                try:
                    while True:
                        types.append(json.loads(await ws.receive())["type"])
                        busy_turn_started.set()
                except UpstreamClosed as closed:
                    seen["busy_close"] = closed.code
                seen["busy_types"] = types

        async def http_stream() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.post(
                    f"{base}/backend-api/codex/responses", json=request_body("mock:say http done")
                )
                seen["http"] = (response.status_code, final_text(parse_sse(response.text)))

        nursery.start_soon(idle_session)
        nursery.start_soon(busy_session)
        nursery.start_soon(http_stream)
        await wait_until(lambda: mock.backend.stats.in_flight >= 3)  # two upgrades and the POST
        await busy_turn_started.wait()  # the busy session's turn is in flight, not just its socket
        started = trio.current_time()
        shutdown.set()
        await trio.sleep(0.1)
        async with httpx.AsyncClient() as http:
            # inside the grace: not ready, yet what still comes is served
            ready = await http.get(f"{base}/health/ready")
            fresh = await http.post(
                f"{base}/backend-api/codex/responses", json=request_body("mock:say late")
            )
            seen["ready"] = ready.status_code
            seen["fresh"] = (fresh.status_code, final_text(parse_sse(fresh.text)))
            await trio.sleep(0.6)  # past the grace: the drain proper
            try:
                late = await http.post(f"{base}/backend-api/codex/responses", json=request_body())
                seen["after"] = (late.status_code, late.json()["error"]["code"])
            except httpx.TransportError:
                seen["after"] = "listener closed"
    assert seen["ready"] == 503
    assert seen["fresh"] == (200, "late")
    # a request on a connection still open gets 503 draining; a new connection finds the
    # listener closed
    assert seen["after"] in ((503, "draining"), "listener closed")
    idle_close = seen["idle_close"]
    assert isinstance(idle_close, tuple)
    # the idle session closed when the grace ended
    assert idle_close[0] == 1001 and 0.5 <= idle_close[1] < 5
    assert seen["busy_close"] == 1001
    assert seen["busy_types"][-1] == "response.completed"  # type: ignore[index]
    assert seen["http"] == (200, "http done")
    with Store.open(settings.resolved_database_url, data_dir=settings.data_dir) as store:
        rows = store.recent_requests(20)
    statuses = sorted(r["status"] for r in rows)
    # the turns (the one served in the grace too) and any refusal are all logged
    assert statuses.count(200) == 3
    assert (503 in statuses) == (seen["after"] != "listener closed")
