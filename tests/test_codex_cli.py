"""The real Codex CLI (npm @openai/codex 0.169.0) against the mock backend.

The CLI is installed by the tests into a cache folder (``tests/codex_cli.py``); a machine
without npm fails these tests with a clear message instead of skipping them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from tests.codex_cli import (
    CodexResult,
    builtin_config,
    codex_binary_async,
    custom_provider_config,
    run_codex_exec,
    write_codex_home,
)
from tests.conftest import MockEnv, start_mock
from trioproxy.harness.mock_upstream import MockConfig, serve_mock
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER

pytestmark = pytest.mark.codex_cli


@attrs.define
class CodexSetup:
    mock: MockEnv
    chatgpt_port: int
    tmp: Path

    async def run(
        self, prompt: str, *, transport: str = "builtin", limit: float = 90
    ) -> CodexResult:
        home = self.tmp / "codex-home"
        home.mkdir(exist_ok=True)
        base = f"{self.mock.base_url}/codex"
        if transport == "builtin":
            config = builtin_config(base, f"http://127.0.0.1:{self.chatgpt_port}/backend-api/")
        else:
            config = custom_provider_config(base, websockets=transport == "custom-ws")
        write_codex_home(
            home, auth=await self.mock.control.auth_json("acct-mock-1"), config_toml=config
        )
        workdir = self.tmp / "work"
        workdir.mkdir(exist_ok=True)
        env = {"CODEX_REFRESH_TOKEN_URL_OVERRIDE": f"{self.mock.root}/oauth/token"}
        return await run_codex_exec(home, prompt, cwd=workdir, timeout=limit, env=env)


@pytest.fixture
async def codex(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[CodexSetup]:
    await codex_binary_async()  # install outside the timed part of each test
    env = await start_mock(nursery, MockConfig(accounts=2))
    # the first-party code path needs chatgpt_base_url on another origin: a second listener
    chatgpt_port = await nursery.start(serve_mock, env.backend, "127.0.0.1", 0)
    yield CodexSetup(env, chatgpt_port, tmp_path)
    await env.client.aclose()
    await env.control.aclose()


async def test_codex_exec_over_websocket(codex: CodexSetup) -> None:
    result = await codex.run("say hi")
    assert result.ok, result.describe()
    assert result.final_message == DEFAULT_ANSWER
    upgrades = await codex.mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert upgrades and ["openai-beta", "responses_websockets=2026-02-06"] in upgrades[0]["headers"]
    messages = await codex.mock.control.model_requests(transport="ws")
    assert [m["status"] for m in messages] == [200, 200]
    prewarm, turn = (m["body"] for m in messages)
    assert prewarm["generate"] is False
    assert turn["previous_response_id"] == messages[0]["response_id"]


async def test_codex_exec_over_http_sse(codex: CodexSetup) -> None:
    # refuse every WebSocket upgrade with 426: the CLI falls back to HTTP SSE at once
    await codex.mock.control.add_fault("server_error", on="upgrade", status=426)
    result = await codex.run("say hi")
    assert result.ok, result.describe()
    assert result.final_message == DEFAULT_ANSWER
    posts = await codex.mock.control.model_requests(transport="http")
    assert len(posts) == 1 and posts[0]["status"] == 200
    assert ["content-encoding", "zstd"] in posts[0]["headers"]
    assert "previous_response_id" not in posts[0]["body"]


@pytest.mark.parametrize("transport", ["builtin-http", "custom-http"])
async def test_codex_exec_tool_call_turn_over_http(codex: CodexSetup, transport: str) -> None:
    if transport == "builtin-http":
        await codex.mock.control.add_fault("server_error", on="upgrade", status=426)
    result = await codex.run(
        "Run it: mock:exec echo hello-from-tool",
        transport="builtin" if transport == "builtin-http" else transport,
    )
    assert result.ok, result.describe()
    assert result.final_message == "Tool output received: hello-from-tool"
    commands = result.items("command_execution")
    assert commands and "hello-from-tool" in json.dumps(commands)
    requests = await codex.mock.control.model_requests()
    outputs = [
        item
        for r in requests
        for item in (r["body"] or {}).get("input", [])
        if item.get("type") == "function_call_output"
    ]
    assert outputs and "hello-from-tool" in outputs[-1]["output"]


async def test_codex_exec_tool_call_over_websocket_is_incremental(codex: CodexSetup) -> None:
    result = await codex.run("Run it: mock:exec echo hello-from-tool")
    assert result.ok, result.describe()
    assert result.final_message == "Tool output received: hello-from-tool"
    messages = await codex.mock.control.model_requests(transport="ws")
    last = messages[-1]["body"]
    # after the tool ran, the CLI sends only the tool output, anchored on the previous response
    assert last["previous_response_id"] == messages[-2]["response_id"]
    assert [i["type"] for i in last["input"]] == ["function_call_output"]


async def test_codex_exec_custom_provider_over_websocket(codex: CodexSetup) -> None:
    result = await codex.run("mock:say custom provider works", transport="custom-ws")
    assert result.ok, result.describe()
    assert result.final_message == "custom provider works"
    assert await codex.mock.control.model_requests(transport="ws")
