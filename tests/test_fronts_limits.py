"""Key budgets and abandoned streams on the Chat Completions and Messages fronts, through a live
proxy on loopback in front of the mock: the same rules as the Responses routes, in each API's
shape."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import MockFactory, ProxyFactory
from tests.quota_support import eventually
from tests.test_abandonment_storm import admission, idle_admission, mock_idle
from tests.test_keys_enforcement import add_key, auth
from trioproxy.harness.mock_upstream import MockConfig

FRONTS = ["chat", "messages"]


def request(front: str, text: str = "hi", *, stream: bool = False) -> tuple[str, dict[str, Any]]:
    messages = [{"role": "user", "content": text}]
    if front == "chat":
        return "/v1/chat/completions", {"model": "gpt-5.5", "messages": messages, "stream": stream}
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": messages}
    return "/v1/messages", {**body, "stream": stream}


@pytest.mark.parametrize("front", FRONTS)
async def test_a_spent_key_budget_is_refused_in_the_fronts_shape(
    make_mock: MockFactory, make_proxy: ProxyFactory, front: str
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, api_key=True)
    secret = await add_key(proxy, "one-a-day", {"budgets": [{"window": "daily", "requests": 1}]})
    path, body = request(front)
    first = await proxy.client.post(proxy.root + path, json=body, headers=auth(secret))
    assert first.status_code == 200
    refused = await proxy.client.post(proxy.root + path, json=body, headers=auth(secret))
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    error = refused.json()["error"]
    if front == "chat":
        assert error["code"] == "key_budget_exceeded"
    else:
        assert refused.json()["type"] == "error" and error["type"] == "rate_limit_error"
    assert len(await mock.control.model_requests()) == 1  # the refusal went nowhere


@pytest.mark.parametrize("front", FRONTS)
async def test_a_client_that_leaves_mid_stream_leaves_nothing_behind(
    make_mock: MockFactory, make_proxy: ProxyFactory, front: str
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    await mock.control.add_fault("slow", event_delay=0.2, deltas=20, count=3)
    path, body = request(front, "mock:say " + "word " * 40, stream=True)
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(3):
            async with http.stream("POST", proxy.root + path, json=body) as response:
                assert response.status_code == 200
                received = 0
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
                    if received > 300:  # some of the answer is in: leave
                        break
    # every lane and account slot back at zero, upstream's streams closed

    async def released() -> bool:
        return idle_admission(await admission(proxy.client, proxy)) and mock_idle(mock)

    await eventually(released)
    # the abandoned turns are in the request log as client disconnects

    async def logged() -> bool:
        answer = await proxy.client.get(f"{proxy.root}/api/requests")
        rows = [r for r in answer.json()["requests"] if r["route"] == path]
        return len(rows) == 3 and all(r["error_code"] == "client_disconnected" for r in rows)

    await eventually(logged)
