"""Session continuity with the real Codex CLI (docs/continuity.md, rows W1-W4).

The CLI runs a tool-call turn over WebSocket through the proxy: a prewarm, the turn (which
asks for ``exec_command``), then the tool output sent incrementally with
``previous_response_id``. A fault hits that third request upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.codex_cli import (
    CodexResult,
    codex_binary_async,
    custom_provider_config,
    run_codex_exec,
    write_codex_home,
)
from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from trioproxy.harness.mock_upstream import MockConfig

pytestmark = pytest.mark.codex_cli
PROMPT = "Run it: mock:exec echo hello-from-tool"
ANSWER = "Tool output received: hello-from-tool"


@attrs.define
class Env:
    mock: MockEnv
    proxy: ProxyEnv
    tmp: Path

    async def codex(self) -> CodexResult:
        home = self.tmp / "codex-home"
        home.mkdir(exist_ok=True)
        config = custom_provider_config(
            f"{self.proxy.root}/backend-api/codex", websockets=True, env_key="TRIOPROXY_API_KEY"
        )
        write_codex_home(home, auth=None, config_toml=config)
        assert self.proxy.api_key is not None
        return await run_codex_exec(
            home, PROMPT, cwd=self.tmp, timeout=90, env={"TRIOPROXY_API_KEY": self.proxy.api_key}
        )

    async def stats(self) -> dict[str, Any]:
        counters: dict[str, Any] = (
            await self.proxy.client.get(f"{self.proxy.root}/api/stats")
        ).json()["counters"]
        return counters

    async def upstream_messages(self) -> list[dict[str, Any]]:
        return await self.mock.control.model_requests(transport="ws")


async def make_env(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path, **options: Any
) -> Env:
    await codex_binary_async()
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, api_key=True, routing_strategy="fill_first", **options)
    return Env(mock, proxy, tmp_path)


@pytest.fixture
async def env(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> AsyncIterator[Env]:
    yield await make_env(make_mock, make_proxy, tmp_path)


async def test_w1_account_limited_mid_session_turn_completes_elsewhere_without_a_resend(
    env: Env,
) -> None:
    await env.mock.control.add_fault(
        "usage_limit", account="acct-mock-1", transport="ws", skip=2, count=1
    )
    result = await env.codex()
    assert result.ok, result.describe()
    assert result.final_message == ANSWER
    messages = await env.upstream_messages()
    assert [(m["account"], m["status"]) for m in messages] == [
        ("acct-mock-1", 200),
        ("acct-mock-1", 200),
        ("acct-mock-1", 429),
        ("acct-mock-2", 200),
    ]
    moved = messages[-1]["body"]
    assert "previous_response_id" not in moved
    assert moved["input"][-1]["type"] == "function_call_output"
    assert not any(
        i.get("type") == "reasoning" for i in moved["input"]
    )  # other account's reasoning left out
    stats = await env.stats()
    assert stats["websocket_sessions"] == 1 and stats["reanchored"] == 1  # the CLI never resent


async def test_w2_upstream_forgets_the_anchor_between_turns(env: Env) -> None:
    await env.mock.control.add_fault("previous_response_not_found", transport="ws", skip=2, count=1)
    result = await env.codex()
    assert result.ok, result.describe()
    assert result.final_message == ANSWER
    messages = await env.upstream_messages()
    assert [m["status"] for m in messages] == [200, 200, 400, 200]
    assert messages[3]["parent"] == messages[2]["parent"]  # re-anchored on the same connection
    assert {m["account"] for m in messages} == {"acct-mock-1"}
    assert any(
        i.get("type") == "reasoning" for i in messages[3]["body"]["input"]
    )  # same account: kept
    stats = await env.stats()
    assert stats["websocket_sessions"] == 1 and stats["reanchored"] == 1


async def test_w3_close_1011_before_created_on_a_hard_session_stays_on_its_account(
    env: Env,
) -> None:
    await env.mock.control.add_fault("close_before_created", transport="ws", skip=2, count=1)
    result = await env.codex()
    assert result.ok, result.describe()
    assert result.final_message == ANSWER
    upgrades = await env.mock.control.requests(method="GET", path="/backend-api/codex/responses")
    assert [(u["account"], u["close_code"]) for u in upgrades][:1] == [("acct-mock-1", 1011)]
    assert {u["account"] for u in upgrades} == {"acct-mock-1"}  # the retry stayed on the owner
    messages = await env.upstream_messages()
    assert messages[-1]["status"] == 200 and messages[-1]["account"] == "acct-mock-1"
    assert (await env.stats())["websocket_sessions"] == 1


async def test_w4_when_the_chain_is_unknown_the_cli_is_told_and_recovers(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    env = await make_env(make_mock, make_proxy, tmp_path, reanchor_max_bytes=1)  # remembers nothing
    await env.mock.control.add_fault(
        "usage_limit", account="acct-mock-1", transport="ws", skip=2, count=1
    )
    result = await env.codex()
    assert result.ok, result.describe()
    assert result.final_message == ANSWER
    stats = await env.stats()
    assert stats.get("reanchored", 0) == 0
    assert stats["websocket_sessions"] == 2  # the CLI reconnected and resent the full history
    last = (await env.upstream_messages())[-1]
    assert last["account"] == "acct-mock-2" and "previous_response_id" not in last["body"]


async def test_idle_socket_closed_between_turns_and_the_cli_reconnects(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    env = await make_env(make_mock, make_proxy, tmp_path, ws_idle_timeout=0.3)
    home = tmp_path / "codex-home"
    home.mkdir()
    config = custom_provider_config(
        f"{env.proxy.root}/backend-api/codex", websockets=True, env_key="TRIOPROXY_API_KEY"
    )
    write_codex_home(home, auth=None, config_toml=config)
    assert env.proxy.api_key is not None
    # the tool sleeps 0.8 s (within the call's 1 s yield): the socket idles past 0.3 s meanwhile
    result = await run_codex_exec(
        home,
        "Run it: mock:exec sleep 0.8 && echo slept",
        cwd=tmp_path,
        timeout=90,
        env={"TRIOPROXY_API_KEY": env.proxy.api_key},
    )
    assert result.ok, result.describe()
    assert result.final_message == "Tool output received: slept"
    stats = await env.stats()
    assert stats["websocket_idle_closed"] >= 1 and stats["websocket_sessions"] >= 2
