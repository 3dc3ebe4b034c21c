"""Real clients through the proxy: the Codex CLI (npm 0.169.0) and the OpenAI Python SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.codex_cli import (
    CodexResult,
    codex_binary_async,
    custom_provider_config,
    run_codex_exec,
    write_codex_home,
)
from tests.conftest import ProxyEnv, start_mock, start_proxy
from tests.helpers import sdk_stream
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER


@attrs.define
class Setup:
    proxy: ProxyEnv
    tmp: Path

    async def codex(self, prompt: str, *, websockets: bool) -> CodexResult:
        home = self.tmp / f"codex-home-{'ws' if websockets else 'http'}"
        home.mkdir(exist_ok=True)
        config = custom_provider_config(
            f"{self.proxy.root}/backend-api/codex",
            websockets=websockets,
            env_key="TRIOPROXY_API_KEY",
        )
        write_codex_home(home, auth=None, config_toml=config)
        work = self.tmp / "work"
        work.mkdir(exist_ok=True)
        assert self.proxy.api_key is not None
        return await run_codex_exec(
            home, prompt, cwd=work, timeout=90, env={"TRIOPROXY_API_KEY": self.proxy.api_key}
        )


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Setup]:
    await codex_binary_async()
    mock = await start_mock(nursery, MockConfig(accounts=2))
    proxy = await start_proxy(nursery, mock, tmp_path, api_key=True)
    # the first account is usage-limited upstream; the proxy does not know it yet
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=3600)
    yield Setup(proxy, tmp_path)
    await proxy.client.aclose()
    await mock.client.aclose()
    await mock.control.aclose()


@pytest.mark.codex_cli
@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "http"])
async def test_codex_cli_through_the_proxy_fails_over_to_the_second_account(
    setup: Setup, websockets: bool
) -> None:
    result = await setup.codex("Run it: mock:exec echo hello-from-tool", websockets=websockets)
    assert result.ok, result.describe()
    assert result.final_message == "Tool output received: hello-from-tool"
    mock = setup.proxy.mock
    records = await mock.control.model_requests()
    # acct-mock-1 refuses the first turn; a WebSocket session may learn that it is limited
    # from its handshake's rate-limit headers already, and never send it a turn
    refused = [r for r in records if r["status"] == 429]
    assert [r["account"] for r in refused] == ["acct-mock-1"] or (websockets and not refused)
    served = [r for r in records if r["status"] != 429]
    assert {r["account"] for r in served} == {"acct-mock-2"}
    assert all(r["status"] == 200 for r in served)
    # over HTTP too (the CLI sends a session-id): the HTTP bridge serves the conversation on
    # a pooled upstream WebSocket, and after the failover it stays on one upstream connection
    assert {r["transport"] for r in records} == {"ws"}
    upgrades = await mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert all(u["status"] == 101 for u in upgrades)
    assert len({r["parent"] for r in served}) == 1


async def test_openai_sdk_streams_through_v1(setup: Setup) -> None:
    import openai

    proxy = setup.proxy

    def run() -> tuple[list[str], str, Any]:
        client = openai.OpenAI(base_url=f"{proxy.root}/v1", api_key=proxy.api_key, max_retries=0)
        try:
            types, text = sdk_stream(client, "mock:say sdk streaming works")
            final = client.responses.create(model="gpt-5.5", input="mock:say unary works")
            return types, text, final
        finally:
            client.close()

    types, text, final = await trio.to_thread.run_sync(run)
    assert text == "sdk streaming works"
    assert types[-1] == "response.completed" and "response.created" in types
    assert final.output_text == "unary works"


async def test_api_key_is_required_when_one_exists(setup: Setup) -> None:
    import httpx

    proxy = setup.proxy
    async with httpx.AsyncClient() as bare:
        missing = await bare.post(proxy.codex_url, json={"model": "gpt-5.5", "input": "hi"})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        wrong = await bare.post(
            proxy.codex_url,
            json={"model": "gpt-5.5", "input": "hi"},
            headers={"authorization": "Bearer trx_nope_nope"},
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        management = await bare.get(f"{proxy.root}/api/accounts")
        assert management.status_code == 401
        assert (await bare.get(f"{proxy.root}/health/live")).status_code == 200
    ok = await proxy.client.post(proxy.v1_url, json={"model": "gpt-5.5", "input": "hi"})
    assert ok.status_code == 200 and ok.json()["output"][0]["content"][0]["text"] == DEFAULT_ANSWER
