"""Model aliases (``model_aliases``): an operator's model names work on every front, through a
live proxy on loopback in front of the mock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import MockFactory, ProxyFactory
from tests.helpers import WS_BETA, post_responses, request_body
from trioproxy.config import ConfigError, load_settings
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.upstream.ws import open_upstream_websocket

ALIASES = "fast=gpt-5.5-mini:low,deep=gpt-5.5"


async def test_an_alias_goes_upstream_as_its_model_and_effort_on_every_front(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, model_aliases=ALIASES)
    user = [{"role": "user", "content": "hi"}]
    # the Responses routes, the codex one forwarding bodies as they come otherwise
    response, _ = await post_responses(
        proxy.client, proxy.codex_url, {}, request_body(model="fast")
    )
    assert response.status_code == 200
    unary = await proxy.client.post(
        proxy.v1_url,
        json={"model": "deep", "input": "hi", "reasoning": {"effort": "high"}},
    )
    assert unary.status_code == 200
    chat = await proxy.client.post(
        f"{proxy.root}/v1/chat/completions", json={"model": "fast", "messages": user}
    )
    assert chat.status_code == 200 and chat.json()["model"] == "fast"
    messages = await proxy.client.post(
        f"{proxy.root}/v1/messages", json={"model": "fast", "max_tokens": 64, "messages": user}
    )
    assert messages.status_code == 200 and messages.json()["model"] == "fast"
    url = proxy.codex_url.replace("http://", "ws://", 1)
    async with open_upstream_websocket(url, [("openai-beta", WS_BETA)]) as ws:
        await ws.send_text(json.dumps({"type": "response.create", **request_body(model="fast")}))
        while json.loads(await ws.receive())["type"] != "response.completed":
            pass
    sent: list[dict[str, Any]] = [r["body"] for r in await mock.control.model_requests()]
    assert [b["model"] for b in sent] == ["gpt-5.5-mini", "gpt-5.5", *["gpt-5.5-mini"] * 3]
    efforts = [(b.get("reasoning") or {}).get("effort") for b in sent]
    # an alias with an effort sets it; one without keeps the client's
    assert efforts == ["low", "high", "low", "low", "low"]
    listed = {m["id"] for m in (await proxy.client.get(f"{proxy.root}/v1/models")).json()["data"]}
    assert {"fast", "deep"} <= listed


@pytest.mark.parametrize(
    "text", ["fast", "fast=", "fast=gpt-5.5:LOW", "x=x", "a b=gpt-5.5", "fast=gpt 5"]
)
def test_a_malformed_alias_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ConfigError, match="model_aliases"):
        load_settings(environ={}, overrides={"model_aliases": text})
