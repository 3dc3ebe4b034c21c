"""Admission lanes in the running proxy: overload answers, isolation, gauges back to zero."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.codex_cli import (
    codex_binary_async,
    custom_provider_config,
    run_codex_exec,
    write_codex_home,
)
from tests.conftest import MockFactory, ProxyFactory
from tests.helpers import (
    open_ws,
    post_responses,
    rejected_upgrade,
    request_body,
    wait_until,
)
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.upstream.ws import open_upstream_websocket

BETA = {"openai-beta": "responses_websockets=2026-02-06"}


async def test_full_lanes_answer_proxy_overloaded_and_the_management_api_stays_reachable(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(
        mock, lane_proxy_http_limit=1, lane_proxy_websocket_limit=1, overload_retry_after=3
    )
    await mock.control.add_fault("slow", first_event_delay=1.0, count=1)
    async with trio.open_nursery() as nursery, open_ws(proxy.codex_url, BETA):
        # the WebSocket lane is now full (one session), the HTTP lane gets one slow request
        nursery.start_soon(post_responses, proxy.client, proxy.codex_url, {}, request_body())
        await wait_until(lambda: mock.backend.stats.in_flight == 2)  # the upgrade + the slow POST
        async with httpx.AsyncClient() as other:
            response = await other.post(proxy.codex_url, json=request_body())
            assert response.status_code == 429
            assert response.headers["retry-after"] == "3"
            assert response.headers["x-trioproxy-overload"] == "proxy_http"
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("server_overloaded", "proxy_overloaded")
            assert "proxy_http" in error["message"] and "1" in error["message"]
            denied = await rejected_upgrade(other, proxy.codex_url, BETA)
            assert (
                denied.status_code == 429
                and denied.headers["x-trioproxy-overload"] == "proxy_websocket"
            )
            admission = (await other.get(f"{proxy.root}/api/admission")).json()
            lanes = admission["lanes"]
            assert lanes["proxy_http"]["in_use"] == 1 and lanes["proxy_websocket"]["in_use"] == 1
            assert (
                lanes["proxy_http"]["rejected_total"] == 1
                and lanes["proxy_websocket"]["rejected_total"] == 1
            )
            assert (await other.get(f"{proxy.root}/api/accounts")).status_code == 200
    # everything left: every proxy gauge is back to zero
    with trio.fail_after(10):
        while True:
            lanes = (await proxy.client.get(f"{proxy.root}/api/admission")).json()["lanes"]
            if lanes["proxy_http"]["in_use"] == 0 and lanes["proxy_websocket"]["in_use"] == 0:
                break
            await trio.sleep(0.05)
    metrics = (await proxy.client.get(f"{proxy.root}/metrics")).text
    assert 'trioproxy_lane_in_use{lane="proxy_http"} 0.0' in metrics
    assert 'trioproxy_lane_rejected_total{lane="proxy_websocket"} 1.0' in metrics


async def test_gauges_return_to_zero_after_sessions_and_abandoned_requests(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock)
    await mock.control.add_fault("slow", event_delay=0.05, probability=0.5)

    async def leaving_http(seconds: float) -> None:
        async with httpx.AsyncClient() as client:
            with trio.move_on_after(seconds):
                await client.post(proxy.codex_url, json=request_body())

    async def leaving_ws(seconds: float) -> None:
        # the project's own wsproto client: trio-websocket leaks its socket when cancelled
        # during the handshake, which this storm does on purpose
        url = proxy.codex_url.replace("http://", "ws://")
        with trio.move_on_after(seconds):
            async with open_upstream_websocket(url, list(BETA.items())) as ws:
                message = json.dumps({"type": "response.create", **request_body()})
                await ws.send_text(message)
                while json.loads(await ws.receive())["type"] != "response.completed":
                    pass
                await ws.send_text(message)
                await trio.sleep(10)

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(leaving_http if i % 2 else leaving_ws, 0.02 * (i % 15))

    async def zero() -> bool:
        stats = (await proxy.client.get(f"{proxy.root}/api/admission")).json()
        lanes = [lane for name, lane in stats["lanes"].items() if name != "dashboard"]
        return (
            all(lane["in_use"] == 0 and lane["waiting"] == 0 for lane in lanes)
            and not stats["accounts"]
        )

    with trio.fail_after(20):
        while True:
            if await zero():
                break
            await trio.sleep(0.05)
    await wait_until(
        lambda: mock.backend.stats.in_flight == 0 and mock.backend.stats.ws_open == 0, seconds=20
    )


@pytest.mark.codex_cli
@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
async def test_codex_cli_retries_a_full_lane_after_retry_after(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path, websockets: bool
) -> None:
    await codex_binary_async()
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(
        mock, lane_proxy_http_limit=1, lane_proxy_websocket_limit=1, overload_retry_after=1
    )
    home = tmp_path / "home"
    home.mkdir()
    write_codex_home(
        home,
        auth=None,
        config_toml=custom_provider_config(
            f"{proxy.root}/backend-api/codex", websockets=websockets
        ).replace("requires_openai_auth = true", "requires_openai_auth = false"),
    )
    lane = "proxy_websocket" if websockets else "proxy_http"
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        # another client holds the only slot of the lane for ~3 s
        if websockets:

            async def hold() -> None:
                async with open_upstream_websocket(
                    proxy.codex_url.replace("http://", "ws://"), list(BETA.items())
                ):
                    await trio.sleep(3)

            nursery.start_soon(hold)
        else:
            await mock.control.add_fault("slow", first_event_delay=3.0, count=1)
            nursery.start_soon(post_responses, proxy.client, proxy.codex_url, {}, request_body())

        async def lane_taken() -> bool:
            return bool(
                (await proxy.client.get(f"{proxy.root}/api/admission")).json()["lanes"][lane][
                    "in_use"
                ]
            )

        with trio.fail_after(5):
            while True:
                if await lane_taken():
                    break
                await trio.sleep(0.02)
        result["codex"] = await run_codex_exec(
            home,
            "mock:say waited my turn",
            cwd=tmp_path,
            timeout=90,
            env={"OPENAI_API_KEY": "unused"},
        )
    codex = result["codex"]
    assert codex.ok, codex.describe()
    assert codex.final_message == "waited my turn"
    stats = (await proxy.client.get(f"{proxy.root}/api/admission")).json()["lanes"][lane]
    assert stats["rejected_total"] >= 1  # the CLI was refused at least once, then came back
