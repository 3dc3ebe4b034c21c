"""The real Codex CLI with a budgeted trioproxy key: it records the key's budget as its rate
limits (what ``/status`` shows), and a spent budget ends its turn as a usage limit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.codex_cli import (
    codex_binary_async,
    custom_provider_config,
    run_codex_exec,
    write_codex_home,
)
from tests.conftest import MockEnv, ProxyEnv, start_proxy
from tests.test_keys_enforcement import add_key

pytestmark = pytest.mark.codex_cli


@pytest.fixture
async def keyed(nursery: trio.Nursery, mock: MockEnv, tmp_path: Path) -> AsyncIterator[ProxyEnv]:
    await codex_binary_async()  # install outside the timed part
    env = await start_proxy(nursery, mock, tmp_path, api_key=True, usage_flush_interval=0.1)
    yield env
    await env.client.aclose()


def rate_limits_recorded(home: Path) -> list[dict[str, Any]]:
    """The rate-limit snapshots the CLI wrote into its session files (``token_count``)."""
    snapshots = []
    for path in sorted((home / "sessions").rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            item = json.loads(line)
            payload = item.get("payload") or {}
            if payload.get("type") == "token_count" and payload.get("rate_limits"):
                snapshots.append(payload["rate_limits"])
    return snapshots


@pytest.mark.parametrize("websockets", [True, False], ids=["ws", "http"])
async def test_the_codex_cli_sees_its_key_budget_and_its_usage_limit(
    keyed: ProxyEnv, tmp_path: Path, websockets: bool
) -> None:
    secret = await add_key(keyed, "cli", {"budgets": [{"window": "5h", "requests": 2}]})
    home = tmp_path / "codex-home"
    config = custom_provider_config(
        f"{keyed.root}/backend-api/codex",
        websockets=websockets,
        env_key="TRIOPROXY_API_KEY",
        request_max_retries=0,
        stream_max_retries=0,
    )
    write_codex_home(home, auth=None, config_toml=config)
    work = tmp_path / "work"
    work.mkdir()
    env = {"TRIOPROXY_API_KEY": secret}
    first = await run_codex_exec(home, "mock:say one", cwd=work, env=env)
    assert first.ok, first.describe()
    second = await run_codex_exec(home, "mock:say two", cwd=work, env=env)
    assert second.ok, second.describe()
    snapshots = rate_limits_recorded(home)
    assert snapshots, "the CLI recorded no rate limits"
    primary = snapshots[-1]["primary"]
    # read at the start of the second turn: one of the key's two requests used
    assert primary["used_percent"] == 50.0 and primary["window_minutes"] == 300
    assert snapshots[-1].get("secondary") is None
    third = await run_codex_exec(home, "mock:say three", cwd=work, env=env)
    assert not third.ok
    said = (third.stdout + third.stderr).lower()
    assert "usage limit" in said, third.describe()
