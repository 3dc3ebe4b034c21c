"""Helpers shared by the quota tests (test_quota_*.py, test_alerts.py, test_models_registry.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from tests.conftest import ProxyEnv


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Poll the proxy's management API until ``check`` holds (state changes by background
    tasks have no event a client could wait on)."""
    with trio.fail_after(seconds):
        while True:
            if await check():
                return
            await trio.sleep(0.02)


async def accounts(proxy: ProxyEnv) -> dict[str, dict[str, Any]]:
    listed = (await proxy.client.get(proxy.root + "/api/accounts")).json()["accounts"]
    return {a["account_id"]: a for a in listed}
