"""The model registry: per-plan lists from upstream, a fallback, and the plan filter that
never refuses a model the registry does not know for sure."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import post_responses, request_body
from tests.quota_support import eventually
from trioproxy.accounts.registry import FALLBACK_MODELS
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.models import models_for_plan


async def served_by(proxy: ProxyEnv, model: str) -> str:
    await proxy.mock.control.clear_requests()
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body(model=model))
    assert response.status_code == 200, response.text
    records = await proxy.mock.control.model_requests()
    assert len(records) == 1
    return str(records[0]["account"])


async def test_models_are_served_from_the_registry(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock)
    for _ in range(3):
        response = await proxy.client.get(proxy.root + "/backend-api/codex/models")
        assert response.status_code == 200
        assert response.json() == {"models": models_for_plan("plus")}
        assert response.headers["x-models-etag"] == '"mock-models-1"'
    v1 = (await proxy.client.get(proxy.root + "/v1/models")).json()
    assert [m["id"] for m in v1["data"]] == ["gpt-5.5", "gpt-5.5-mini", "gpt-6-astra"]
    # one fetch for the plan, not one per client request
    assert len(await mock.control.requests(path="/backend-api/codex/models")) == 1
    registry = (await proxy.client.get(proxy.root + "/api/models")).json()
    assert registry["source"] == "upstream" and list(registry["plans"]) == ["plus"]


async def test_the_fallback_list_while_upstream_cannot_list_models(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    await mock.control.add_fault("server_error", on="models")
    proxy = await make_proxy(mock)
    response = await proxy.client.get(proxy.root + "/backend-api/codex/models")
    assert response.status_code == 200
    assert response.json() == {"models": list(FALLBACK_MODELS)}
    registry = (await proxy.client.get(proxy.root + "/api/models")).json()
    assert registry["source"] == "fallback" and registry["errors"] == {"plus": "status 500"}


async def test_the_registry_refreshes_by_itself(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    await make_proxy(mock, models_refresh_interval=0.2)

    async def refreshed_twice() -> bool:
        return len(await mock.control.requests(path="/backend-api/codex/models")) >= 2

    await eventually(refreshed_twice)


async def test_a_partial_registry_never_refuses_a_model_and_a_refresh_resets_the_filter(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1, plan="free"))  # acct-mock-1: free
    await mock.control.add_account(plan="plus")  # acct-mock-2: plus, serves gpt-6-astra
    await mock.control.add_fault("server_error", on="models", account="acct-mock-2")
    proxy = await make_proxy(mock, routing_strategy="fill_first")

    async def refresh() -> dict[str, Any]:
        response = await proxy.client.post(proxy.root + "/api/models/refresh")
        assert response.status_code == 200
        return dict(response.json())

    partial = await refresh()
    assert list(partial["plans"]) == ["free"] and "plus" in partial["errors"]
    assert "gpt-6-astra" not in partial["plans"]["free"]["models"]
    # the registry holds no authoritative entry naming gpt-6-astra: no filter, no local refusal
    assert await served_by(proxy, "gpt-6-astra") == "acct-mock-1"
    assert await served_by(proxy, "a-model-nobody-listed") == "acct-mock-1"
    # the plus list arrives: the filter cached from the partial registry is dropped
    await mock.control.clear_faults()
    full = await refresh()
    assert sorted(full["plans"]) == ["free", "plus"] and full["version"] > partial["version"]
    assert await served_by(proxy, "gpt-6-astra") == "acct-mock-2"
    assert await served_by(proxy, "gpt-5.5") == "acct-mock-1"  # every plan serves it

    async def logged_with_filter() -> bool:  # the decision record shows the filter it used
        rows = (await proxy.client.get(proxy.root + "/api/requests")).json()["requests"]
        return ["plus"] in [d["model_filter"] for r in rows if r["decision"] for d in r["decision"]]

    await eventually(logged_with_filter)


async def test_the_openai_and_anthropic_sdks_list_and_retrieve_models(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    import anthropic
    import openai

    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, api_key=True, model_aliases="fast=gpt-5.5-mini:low")

    def run() -> tuple[list[Any], list[Any], Any, Any, Any, Any]:
        a = anthropic.Anthropic(base_url=proxy.root, api_key=proxy.api_key, max_retries=0)
        o = openai.OpenAI(base_url=f"{proxy.root}/v1", api_key=proxy.api_key, max_retries=0)
        try:
            listed_a, listed_o = list(a.models.list()), list(o.models.list())
            one_a, one_o = a.models.retrieve("gpt-5.5"), o.models.retrieve("fast")
            with pytest.raises(anthropic.NotFoundError) as missing_a:
                a.models.retrieve("claude-nope")
            with pytest.raises(openai.NotFoundError) as missing_o:
                o.models.retrieve("gpt-nope")
            return listed_a, listed_o, one_a, one_o, missing_a.value, missing_o.value
        finally:
            a.close()
            o.close()

    listed_a, listed_o, one_a, one_o, missing_a, missing_o = await trio.to_thread.run_sync(run)
    ids = ["gpt-5.5", "gpt-5.5-mini", "gpt-6-astra", "fast"]
    assert [m.id for m in listed_o] == ids and [m.id for m in listed_a] == ids
    assert all(m.type == "model" and m.display_name and m.created_at for m in listed_a)
    assert all(m.object == "model" and m.owned_by for m in listed_o)
    assert one_a.id == "gpt-5.5" and one_a.type == "model"
    assert one_o.id == "fast" and one_o.owned_by == "trioproxy"
    assert missing_o.status_code == 404 and missing_a.status_code == 404
    assert missing_o.code == "model_not_found"
