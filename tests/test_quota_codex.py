"""The real Codex CLI 0.169.0 reads the pool's usage through the proxy.

The CLI's rate-limit reader (the TUI's ``/status``, the app server's ``account/rateLimits/read``)
fetches ``{chatgpt_base_url}/wham/usage`` (``/api/codex/usage`` when chatgpt_base_url has no
``/backend-api``) with its ChatGPT credentials. ``codex app-server`` speaks JSON-RPC over stdio,
so a test can ask it without a terminal: ``initialize``, ``initialized``, then
``account/rateLimits/read``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.codex_cli import codex_binary_async, codex_env, custom_provider_config, write_codex_home
from tests.conftest import MockFactory, ProxyFactory
from tests.quota_support import accounts, eventually
from trioproxy.harness.mock_upstream import MockConfig

pytestmark = pytest.mark.codex_cli


async def read_rate_limits(home: Path, seconds: float = 60) -> dict[str, Any]:
    """Start ``codex app-server`` with ``CODEX_HOME=home`` and return the result of
    ``account/rateLimits/read``."""
    binary = await codex_binary_async()
    process = await trio.lowlevel.open_process(
        [str(binary), "app-server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=codex_env(home),
    )
    assert process.stdin is not None and process.stdout is not None
    buffer = b""

    async def send(message: dict[str, Any]) -> None:
        assert process.stdin is not None
        await process.stdin.send_all(json.dumps(message).encode() + b"\n")

    async def answer(request_id: int) -> dict[str, Any]:
        nonlocal buffer
        assert process.stdout is not None
        while True:
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                if message.get("id") == request_id:
                    return dict(message)
            data = await process.stdout.receive_some()
            if not data:
                raise AssertionError("codex app-server closed its stdout")
            buffer += data

    try:
        with trio.fail_after(seconds):
            await send(
                {
                    "id": 1,
                    "method": "initialize",
                    "params": {"clientInfo": {"name": "t", "version": "1"}},
                }
            )
            await answer(1)
            await send({"method": "initialized"})
            await send({"id": 2, "method": "account/rateLimits/read", "params": None})
            reply = await answer(2)
    finally:
        process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()
            await trio.aclose_forcefully(process.stdin)
            await trio.aclose_forcefully(process.stdout)
    assert "result" in reply, reply
    return dict(reply["result"])


@pytest.mark.parametrize("chatgpt_path", ["/backend-api", ""])
async def test_codex_cli_reads_the_pool_usage_through_the_proxy(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path, chatgpt_path: str
) -> None:
    await codex_binary_async()
    mock = await make_mock(MockConfig(accounts=2))
    await mock.control.patch_account("acct-mock-1", primary_used=200, secondary_used=1000)
    await mock.control.patch_account("acct-mock-2", primary_used=600)
    proxy = await make_proxy(mock, usage_poll_interval=3600)

    async def all_polled() -> bool:
        return all(a["poll"]["last_ok_at"] for a in (await accounts(proxy)).values())

    await eventually(all_polled)
    pool = (await proxy.client.get(proxy.root + "/backend-api/wham/usage")).json()["rate_limit"]
    home = tmp_path / "codex-home"
    config = custom_provider_config(
        f"{proxy.root}/backend-api/codex",
        websockets=False,
        chatgpt_base_url=f"{proxy.root}{chatgpt_path}",
    )
    # the CLI's own credentials are those of acct-mock-1: had it asked upstream, it would see
    # that account's 20 %, not the pool's 40 %
    write_codex_home(home, auth=await mock.control.auth_json("acct-mock-1"), config_toml=config)
    await mock.control.clear_requests()
    result = await read_rate_limits(home)
    limits = result["rateLimits"]
    assert limits["primary"] == {
        "usedPercent": 40,
        "windowDurationMins": 300,
        "resetsAt": pool["primary_window"]["reset_at"],
    }
    assert limits["secondary"] == {
        "usedPercent": 5,
        "windowDurationMins": 10080,
        "resetsAt": pool["secondary_window"]["reset_at"],
    }
    assert limits["planType"] == "plus" and limits["rateLimitReachedType"] is None
    assert await mock.control.requests(path="/backend-api/wham/usage") == []
