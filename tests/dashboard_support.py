"""What the dashboard tests share: a proxy whose store has an admin before it starts (so no
first admin is made), signing in over HTTP, and reading a page's CSRF token."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import MockEnv, ProxyEnv, start_proxy
from trioproxy.config import load_settings
from trioproxy.dashboard.passwords import hash_password
from trioproxy.store import Store
from trioproxy.store import admins as admin_store

ADMIN = "ops"
PASSWORD = "correct horse battery staple"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def add_admin(data_dir: Path, name: str = ADMIN, password: str = PASSWORD) -> None:
    """An admin in the store of ``data_dir`` (as ``trioproxy admin create`` makes one)."""
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir)})
    with Store.open(
        settings.resolved_database_url, data_dir=settings.data_dir, secret_key=""
    ) as store:
        assert admin_store.create_admin(store, name, hash_password(password)) is not None


DashboardFactory = Callable[..., Awaitable[ProxyEnv]]


@pytest.fixture
async def make_dashboard(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[DashboardFactory]:
    """Start proxies (``start_proxy``) with the admin :data:`ADMIN` in their store; their
    clients are closed at teardown."""
    made: list[ProxyEnv] = []

    async def factory(mock: MockEnv, **options: Any) -> ProxyEnv:
        where = tmp_path / f"dashboard-{len(made)}"
        add_admin(where / "proxy-data")
        env = await start_proxy(nursery, mock, where, **options)
        made.append(env)
        return env

    yield factory
    for env in made:
        await env.client.aclose()


def browser_client(proxy: ProxyEnv) -> httpx.AsyncClient:
    """A client like a browser's: no API key, cookies kept, redirects not followed."""
    return httpx.AsyncClient(base_url=proxy.root, timeout=30.0, follow_redirects=False)


async def sign_in(
    client: httpx.AsyncClient, name: str = ADMIN, password: str = PASSWORD
) -> httpx.Response:
    return await client.post(
        "/dashboard/login", data={"name": name, "password": password, "next": "/dashboard/pool"}
    )


async def csrf_token(client: httpx.AsyncClient) -> str:
    """The session's CSRF token, as a page carries it."""
    page = await client.get("/dashboard/keys")
    assert page.status_code == 200, page.text
    found = _CSRF.search(page.text)
    assert found is not None
    return found.group(1)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    """Wait until ``check()`` is true; fail after ``seconds``."""
    with trio.fail_after(seconds):
        for _ in range(1_000_000):
            if await check():
                return
            await trio.sleep(0.05)
