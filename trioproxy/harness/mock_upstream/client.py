"""A client for the mock's control API (``/__mock__/``), for tests and the bench."""

from __future__ import annotations

from typing import Any

import attrs
import httpx


@attrs.define(eq=False)
class MockControl:
    """``async with MockControl(base_url) as mock: await mock.add_fault(kind=...)``."""

    base_url: str
    client: httpx.AsyncClient = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.client = httpx.AsyncClient(
            base_url=self.base_url.rstrip("/"), timeout=httpx.Timeout(30.0)
        )

    async def __aenter__(self) -> MockControl:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.client.request(method, f"/__mock__/{path}", **kwargs)
        response.raise_for_status()
        return response.json()

    async def stats(self) -> dict[str, int]:
        return dict(await self._call("GET", "stats"))

    async def requests(self, *, frames: bool = False, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        params["frames"] = "1" if frames else "0"
        return list((await self._call("GET", "requests", params=params))["requests"])

    async def model_requests(self, **filters: Any) -> list[dict[str, Any]]:
        """Every model request that reached the mock: HTTP POSTs and WebSocket messages."""
        records = await self.requests(path="/backend-api/codex/responses", **filters)
        return [r for r in records if r["method"] in ("POST", "WS")]

    async def clear_requests(self) -> None:
        await self._call("DELETE", "requests")

    async def accounts(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "accounts"))["accounts"])

    async def account(self, account_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"accounts/{account_id}"))

    async def add_account(self, **spec: Any) -> dict[str, Any]:
        return dict(await self._call("POST", "accounts", json=spec))

    async def patch_account(self, account_id: str, **changes: Any) -> dict[str, Any]:
        return dict(await self._call("PATCH", f"accounts/{account_id}", json=changes))

    async def auth_json(self, account_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"accounts/{account_id}/auth.json"))

    async def add_fault(self, kind: str, **spec: Any) -> dict[str, Any]:
        result = await self._call("POST", "faults", json={"kind": kind, **spec})
        return dict(result["faults"][0])

    async def faults(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "faults"))["faults"])

    async def clear_faults(self) -> None:
        await self._call("DELETE", "faults")

    async def script(self, *answers: dict[str, Any]) -> None:
        await self._call("POST", "script", json=list(answers))

    async def advance_clock(self, seconds: float) -> float:
        """Move the mock's unix time forward (quota resets, token expiry)."""
        return float((await self._call("POST", "clock", json={"advance": seconds}))["now"])

    async def configure(self, **shape: Any) -> dict[str, Any]:
        """Change the shape of later answers (``deltas``, ``delta_bytes``,
        ``first_event_delay``, ``event_delay``, ``latency_jitter``, ``rate_limit_events``,
        ``segmentation``, ``ws_ping_interval``, ``ws_ping_timeout``)."""
        return dict(await self._call("PATCH", "config", json=shape))

    async def logins(self) -> dict[str, Any]:
        """Device codes and authorize requests waiting for the mock user."""
        return dict(await self._call("GET", "logins"))

    async def approve_login(self, account_id: str, **which: str) -> dict[str, Any]:
        """Sign the pending login named by ``user_code=`` or ``state=`` in as ``account_id``
        (an authorize request answers ``redirect_url``)."""
        return dict(
            await self._call("POST", "logins/approve", json={"account_id": account_id, **which})
        )

    async def deny_login(self, **which: str) -> dict[str, Any]:
        return dict(await self._call("POST", "logins/deny", json=which))

    async def close_websockets(self, code: int = 1011, reason: str | None = None) -> int:
        """Close every open WebSocket connection of the mock; how many."""
        spec: dict[str, Any] = {"code": code}
        if reason is not None:
            spec["reason"] = reason
        return int((await self._call("POST", "websockets/close", json=spec))["closed"])

    async def reset(self) -> None:
        await self._call("POST", "reset")
