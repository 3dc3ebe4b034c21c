"""A device login through the management API, then the real Codex CLI (npm @openai/codex,
installed by ``tests/codex_cli.py``; like every Codex CLI test, a machine without npm fails
instead of skipping) completes a turn through the proxy on the account it added.

The proxy starts with no accounts at all, so the turn can only be served by the one the
login stored; the mock records which account each upstream request came in on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.codex_cli import (
    codex_binary_async,
    custom_provider_config,
    run_codex_exec,
    write_codex_home,
)
from tests.conftest import MockFactory, ProxyFactory
from tests.test_login_api import start, wait_final
from trioproxy.harness.mock_upstream import MockConfig

pytestmark = pytest.mark.codex_cli


@pytest.mark.parametrize("websockets", [True, False], ids=["ws", "http"])
async def test_codex_cli_turn_on_the_account_a_device_login_added(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path, websockets: bool
) -> None:
    await codex_binary_async()  # install outside the timed part
    mock = await make_mock(MockConfig(accounts=3, device_interval=0))
    proxy = await make_proxy(mock, accounts=[], api_key=True)
    assert (await proxy.client.get(f"{proxy.root}/api/accounts")).json()["accounts"] == []

    login = await start(proxy, "device")
    await mock.control.approve_login("acct-mock-2", user_code=login["user_code"])
    done = await wait_final(proxy, login["id"])
    assert (done["status"], done["account_id"], done["created"]) == (
        "succeeded",
        "acct-mock-2",
        True,
    )

    home = tmp_path / "codex-home"
    config = custom_provider_config(
        f"{proxy.root}/backend-api/codex", websockets=websockets, env_key="TRIOPROXY_API_KEY"
    )
    write_codex_home(home, auth=None, config_toml=config)
    assert proxy.api_key is not None
    await mock.control.clear_requests()
    result = await run_codex_exec(
        home,
        "mock:say signed in through the proxy",
        cwd=tmp_path,
        timeout=90,
        env={"TRIOPROXY_API_KEY": proxy.api_key},
    )
    assert result.ok, result.describe()
    assert result.final_message == "signed in through the proxy"
    served = await mock.control.model_requests()  # over upstream HTTP or WebSocket (bridge)
    assert served and {(r["account"], r["status"]) for r in served} == {("acct-mock-2", 200)}
    assert (await mock.control.account("acct-mock-2"))["requests"] >= 1
