from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import httpx
import pytest
import trio

from tests.helpers import WS_BETA
from trioproxy.harness.mock_upstream import MockBackend, MockConfig, serve_mock
from trioproxy.harness.mock_upstream.client import MockControl


@attrs.define(eq=False)
class MockEnv:
    backend: MockBackend
    port: int
    control: MockControl
    client: httpx.AsyncClient

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/backend-api"

    @property
    def responses_url(self) -> str:
        return f"{self.base_url}/codex/responses"

    def account_ids(self) -> list[str]:
        return list(self.backend.accounts)

    def auth(self, account_id: str = "acct-mock-1") -> dict[str, str]:
        account = self.backend.accounts[account_id]
        token = account.current_access_token(self.backend.clock.now())
        return {"authorization": f"Bearer {token}", "chatgpt-account-id": account_id}

    def ws_headers(self, account_id: str = "acct-mock-1") -> dict[str, str]:
        return {**self.auth(account_id), "openai-beta": WS_BETA}


async def start_mock(nursery: trio.Nursery, config: MockConfig) -> MockEnv:
    backend = MockBackend(config)
    port = await nursery.start(serve_mock, backend, "127.0.0.1", 0)
    control = MockControl(f"http://127.0.0.1:{port}")
    client = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
    return MockEnv(backend, port, control, client)


@pytest.fixture
async def mock(nursery: trio.Nursery) -> AsyncIterator[MockEnv]:
    env = await start_mock(nursery, MockConfig(accounts=3))
    yield env
    await env.client.aclose()
    await env.control.aclose()
