"""Keep-alive while upstream is silent before its first event, checked with real clients.

Finding (Codex CLI 0.169.0): its stream idle timer starts when response headers arrive and is
reset by SSE events, not by SSE comments. So the proxy holds the response headers until
upstream's first event, and only after ``keepalive_interval`` of silence commits the
response and sends ``{"type": "keepalive"}`` events, which clients ignore.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from tests.codex_cli import (
    CodexResult,
    codex_binary_async,
    custom_provider_config,
    run_codex_exec,
    write_codex_home,
)
from tests.conftest import MockEnv, ProxyEnv, start_mock, start_proxy
from tests.helpers import sdk_stream
from trioproxy.harness.mock_upstream import MockConfig


@attrs.define
class Env:
    mock: MockEnv
    proxy: ProxyEnv
    tmp: Path

    async def codex(self, prompt: str, idle_ms: int) -> CodexResult:
        await codex_binary_async()
        home = self.tmp / "home"
        home.mkdir(exist_ok=True)
        config = custom_provider_config(
            f"{self.proxy.root}/backend-api/codex",
            websockets=False,
            stream_idle_timeout_ms=idle_ms,
            stream_max_retries=0,
            request_max_retries=0,
        )
        write_codex_home(
            home,
            auth=None,
            config_toml=config.replace(
                "requires_openai_auth = true", "requires_openai_auth = false"
            ),
        )
        return await run_codex_exec(
            home, prompt, cwd=self.tmp, timeout=60, env={"OPENAI_API_KEY": "unused"}
        )


async def make_env(nursery: trio.Nursery, tmp_path: Path, keepalive_interval: float) -> Env:
    mock = await start_mock(nursery, MockConfig(accounts=1))
    proxy = await start_proxy(nursery, mock, tmp_path, keepalive_interval=keepalive_interval)
    return Env(mock, proxy, tmp_path)


@pytest.fixture
async def keepalive_env(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Env]:
    env = await make_env(nursery, tmp_path, 1.0)
    yield env
    await env.proxy.client.aclose()
    await env.mock.client.aclose()
    await env.mock.control.aclose()


@pytest.mark.codex_cli
async def test_codex_cli_survives_a_silence_longer_than_its_idle_timeout(
    keepalive_env: Env,
) -> None:
    # upstream answers 200 at once, then says nothing for 6 s; the CLI gives up after 3 s idle
    await keepalive_env.mock.control.add_fault("slow", first_event_delay=6.0, count=1)
    result = await keepalive_env.codex("mock:say still here", idle_ms=3000)
    assert result.ok, result.describe()
    assert result.final_message == "still here"


async def test_openai_sdk_ignores_keepalive_events(keepalive_env: Env) -> None:
    import openai

    await keepalive_env.mock.control.add_fault("slow", first_event_delay=2.5, count=1)
    proxy = keepalive_env.proxy

    def run() -> tuple[list[str], str]:
        client = openai.OpenAI(base_url=f"{proxy.root}/v1", api_key="unused", max_retries=0)
        try:
            return sdk_stream(client, "mock:say patient")
        finally:
            client.close()

    types, text = await trio.to_thread.run_sync(run)
    assert text == "patient"
    assert types.count("keepalive") >= 2 and types[-1] == "response.completed"


async def test_raw_stream_carries_keepalive_events_before_the_first_upstream_event(
    keepalive_env: Env,
) -> None:
    await keepalive_env.mock.control.add_fault("slow", first_event_delay=2.5, count=1)
    proxy = keepalive_env.proxy
    body = {
        "model": "gpt-5.5",
        "stream": True,
        "input": [{"type": "message", "role": "user", "content": "hi"}],
    }
    response = await proxy.client.post(proxy.codex_url, json=body)
    frames = response.text.split("\n\n")
    assert frames[0] == 'event: keepalive\ndata: {"type":"keepalive"}' and frames[1] == frames[0]
    assert "response.completed" in response.text


async def test_keepalives_stop_at_the_first_event(keepalive_env: Env) -> None:
    """Once upstream's first event is in, only upstream's bytes reach the client: silences
    between later events longer than the interval get no keep-alive (a frame of ours between
    two of upstream's chunks could split one of its frames)."""
    await keepalive_env.mock.control.add_fault(
        "slow", first_event_delay=0.05, event_delay=1.4, deltas=2, count=1
    )
    proxy = keepalive_env.proxy
    body = {"model": "gpt-5.5", "stream": True, "input": "hi"}
    response = await proxy.client.post(proxy.codex_url, json=body)
    assert response.status_code == 200
    assert "keepalive" not in response.text
    assert "response.output_text.delta" in response.text
    assert "response.completed" in response.text


async def test_a_client_leaving_during_the_silence_ends_its_request(keepalive_env: Env) -> None:
    """The request's watcher sends the keep-alives and also notices the client leaving
    between two of them: the upstream request ends and the lane slot is given back at once,
    not when upstream finally answers."""
    await keepalive_env.mock.control.add_fault("slow", first_event_delay=20.0, count=1)
    proxy = keepalive_env.proxy
    mock = keepalive_env.mock
    body = {"model": "gpt-5.5", "stream": True, "input": "hi"}
    client = httpx.AsyncClient(timeout=10.0)
    async with client.stream("POST", proxy.codex_url, json=body) as response:
        seen = b""
        async for chunk in response.aiter_raw():
            seen += chunk
            if seen.count(b"event: keepalive") >= 2:
                break
    await client.aclose()  # the client is gone before upstream said anything

    with trio.fail_after(5):  # far less than the 20 s upstream silence
        while True:
            stats = (await proxy.client.get(f"{proxy.root}/api/admission")).json()
            if stats["lanes"]["proxy_http"]["in_use"] == 0 and mock.backend.stats.in_flight == 0:
                break
            await trio.sleep(0.02)
    assert not stats["accounts"]  # no account slot held either
