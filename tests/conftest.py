from __future__ import annotations

import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.helpers import WS_BETA
from tests.pg_support import PgServer, start_pg_server
from trioproxy.config import Settings
from trioproxy.harness.mock_upstream import MockBackend, MockConfig, serve_mock
from trioproxy.harness.mock_upstream.client import MockControl

# tests with a thousand clients hold two descriptors per client in this one process
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard == resource.RLIM_INFINITY or _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL server for the whole test session (``database()`` gives each test
    an empty database of its own)."""
    server = start_pg_server()
    try:
        yield server
    finally:
        server.stop()


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


@attrs.define(eq=False)
class ProxyEnv:
    mock: MockEnv
    port: int
    client: httpx.AsyncClient
    settings: Settings
    api_key: str | None = None

    @property
    def root(self) -> str:
        scheme = "https" if self.settings.certfile else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def codex_url(self) -> str:
        return f"{self.root}/backend-api/codex/responses"

    @property
    def v1_url(self) -> str:
        return f"{self.root}/v1/responses"


async def start_proxy(
    nursery: trio.Nursery,
    mock: MockEnv,
    tmp_path: Path,
    *,
    accounts: list[str] | None = None,
    api_key: bool = False,
    verify: ssl.SSLContext | bool = True,
    **options: object,
) -> ProxyEnv:
    """A real proxy on loopback in front of ``mock``, with the mock's accounts imported
    through the management API (and, with ``api_key``, one API key required). A proxy
    serving https (``certfile``) is reached by a client that trusts ``verify``."""
    from trioproxy.config import load_settings
    from trioproxy.server import serve_proxy
    from trioproxy.store import Store

    settings = load_settings(
        environ={},
        overrides={
            "host": "127.0.0.1",
            "port": 0,
            "data_dir": str(tmp_path / "proxy-data"),
            "upstream_base_url": mock.base_url,
            "auth_base_url": mock.root,
            # background usage polls off unless a test asks for them (tests/test_quota_*.py):
            # other tests count upstream requests and token refreshes exactly
            "usage_poll_interval": 0.0,
            **options,
        },
    )
    key = None
    if api_key:
        with Store.open(
            settings.resolved_database_url,
            data_dir=settings.data_dir,
            secret_key=settings.secret_key,
        ) as store:
            _, key = store.create_api_key("tests")
    port = await nursery.start(serve_proxy, settings)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0), headers=headers, verify=verify)
    env = ProxyEnv(mock, port, client, settings, key)
    for account_id in accounts if accounts is not None else mock.account_ids():
        auth = await mock.control.auth_json(account_id)
        response = await client.post(f"{env.root}/api/accounts", json=auth)
        assert response.status_code in (200, 201), response.text
    return env


@pytest.fixture
async def proxy(nursery: trio.Nursery, mock: MockEnv, tmp_path: Path) -> AsyncIterator[ProxyEnv]:
    env = await start_proxy(nursery, mock, tmp_path)
    yield env
    await env.client.aclose()


#: the HTTP servers the proxy can run on (``--server``); tests/test_servers.py runs its
#: proxy-level checks against each
SERVERS = ("trioproxy", "hypercorn")


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """The name of the HTTP server a test's proxy runs on, one test per server."""
    return str(request.param)


@pytest.fixture
async def proxy_on_server(
    nursery: trio.Nursery, mock: MockEnv, tmp_path: Path, server: str
) -> AsyncIterator[ProxyEnv]:
    """``proxy``, served by the server of the ``server`` parameter."""
    env = await start_proxy(nursery, mock, tmp_path, server=server)
    yield env
    await env.client.aclose()


MockFactory = Callable[..., Awaitable[MockEnv]]
ProxyFactory = Callable[..., Awaitable[ProxyEnv]]


@pytest.fixture
async def make_mock(nursery: trio.Nursery) -> AsyncIterator[MockFactory]:
    """Start mocks with a given MockConfig; their clients are closed at teardown."""
    made: list[MockEnv] = []

    async def factory(config: MockConfig | None = None) -> MockEnv:
        env = await start_mock(nursery, config or MockConfig(accounts=3))
        made.append(env)
        return env

    yield factory
    for env in made:
        await env.client.aclose()
        await env.control.aclose()


@pytest.fixture
async def make_proxy(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start proxies in front of a mock with given options; closed at teardown."""
    made: list[ProxyEnv] = []

    async def factory(mock: MockEnv, **options: Any) -> ProxyEnv:
        env = await start_proxy(nursery, mock, tmp_path / f"proxy-{len(made)}", **options)
        made.append(env)
        return env

    yield factory
    for env in made:
        await env.client.aclose()
