"""``POST /v1/messages`` through a live proxy on loopback in front of the mock, driven by the
Anthropic Python SDK (``messages.create``, ``messages.stream``) and by raw HTTP for errors."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.quota_support import eventually
from trioproxy.harness.mock_upstream import MockConfig

EXEC_TOOL = {
    "name": "exec_command",
    "description": "Run a shell command.",
    "input_schema": {
        "type": "object",
        "properties": {"cmd": {"type": "string"}},
        "required": ["cmd"],
    },
}


def sdk(proxy: ProxyEnv) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=proxy.root, api_key=proxy.api_key, max_retries=0)


async def keyed_proxy(make_mock: MockFactory, make_proxy: ProxyFactory, **options: Any) -> ProxyEnv:
    mock = await make_mock(MockConfig(accounts=2))
    return await make_proxy(mock, api_key=True, **options)


async def test_the_anthropic_sdk_creates_and_streams_with_a_tool_use_round_trip(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await keyed_proxy(make_mock, make_proxy)

    def run() -> tuple[Any, Any, Any, list[str], Any]:
        client = sdk(proxy)
        try:
            plain = client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=1024,
                system="Be brief.",
                messages=[{"role": "user", "content": "mock:say hello from messages"}],
            )
            messages: list[dict[str, Any]] = [
                {"role": "user", "content": "mock:exec echo from-the-tool"}
            ]
            called = client.messages.create(
                model="claude-sonnet-4-5", max_tokens=1024, messages=messages, tools=[EXEC_TOOL]
            )
            use = next(b for b in called.content if b.type == "tool_use")
            messages += [
                {"role": "assistant", "content": [b.model_dump() for b in called.content]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": use.id, "content": "from-the-tool"}
                    ],
                },
            ]
            with client.messages.stream(
                model="claude-sonnet-4-5", max_tokens=1024, messages=messages, tools=[EXEC_TOOL]
            ) as stream:
                kinds = [event.type for event in stream]
                final = stream.get_final_message()
            counted = client.messages.count_tokens(
                model="claude-sonnet-4-5", messages=messages, tools=[EXEC_TOOL]
            )
            return plain, called, final, kinds, counted
        finally:
            client.close()

    plain, called, final, kinds, counted = await trio.to_thread.run_sync(run)
    assert plain.type == "message" and plain.role == "assistant"
    assert plain.model == "claude-sonnet-4-5"
    assert [b.text for b in plain.content if b.type == "text"] == ["hello from messages"]
    assert plain.stop_reason == "end_turn" and plain.usage.output_tokens > 0
    assert called.stop_reason == "tool_use"
    use = next(b for b in called.content if b.type == "tool_use")
    assert use.name == "exec_command" and "echo from-the-tool" in use.input["cmd"]
    assert [b.text for b in final.content if b.type == "text"] == [
        "Tool output received: from-the-tool"
    ]
    assert kinds[0] == "message_start" and "content_block_delta" in kinds
    assert kinds[-1] == "message_stop"
    assert counted.input_tokens > 0
    sent = [r["body"] for r in await proxy.mock.control.model_requests()]
    assert sent[0]["instructions"] == "Be brief." and sent[0]["stream"] is True
    outputs = [i for i in sent[2]["input"] if i.get("type") == "function_call_output"]
    assert outputs and outputs[0]["call_id"] == use.id
    assert len(sent) == 3  # count_tokens went nowhere


async def test_thinking_display_omitted_through_the_sdk(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    """``thinking.display: "omitted"``: upstream is asked for no summary, and the thinking
    block comes with its signature only, which goes back upstream as the reasoning."""
    proxy = await keyed_proxy(make_mock, make_proxy)
    thinking = {"type": "enabled", "budget_tokens": 2048, "display": "omitted"}

    def run() -> tuple[Any, Any]:
        client = sdk(proxy)
        try:
            messages: list[dict[str, Any]] = [{"role": "user", "content": "mock:exec echo hi"}]
            options: dict[str, Any] = {
                "model": "claude-sonnet-4-5",
                "max_tokens": 4096,
                "tools": [EXEC_TOOL],
                "thinking": thinking,
            }
            with client.messages.stream(messages=messages, **options) as events:
                called = events.get_final_message()
            use = next(b for b in called.content if b.type == "tool_use")
            messages += [
                {"role": "assistant", "content": [b.model_dump() for b in called.content]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "hi"}],
                },
            ]
            return called, client.messages.create(messages=messages, **options)
        finally:
            client.close()

    called, answered = await trio.to_thread.run_sync(run)
    (block,) = [b for b in called.content if b.type == "thinking"]
    assert block.thinking == "" and block.signature
    assert answered.content[0].text == "Tool output received: hi"
    sent = [r["body"] for r in await proxy.mock.control.model_requests()]
    assert all(b["reasoning"] == {"effort": "low"} for b in sent), [b["reasoning"] for b in sent]
    assert any(i.get("type") == "reasoning" and i["encrypted_content"] for i in sent[1]["input"])
    async with httpx.AsyncClient(timeout=30) as http:
        refused = await http.post(
            f"{proxy.root}/v1/messages",
            headers={"x-api-key": proxy.api_key or ""},
            json={
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}],
                "thinking": {**thinking, "display": "loud"},
            },
        )
    assert refused.status_code == 400, refused.text
    assert "thinking.display" in refused.json()["error"]["message"]


async def test_errors_come_in_anthropic_shapes(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, api_key=True)
    url = f"{proxy.root}/v1/messages"
    user = [{"role": "user", "content": "hi"}]
    headers = {"x-api-key": proxy.api_key or "", "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(timeout=30) as http:
        for body in (
            {"model": "claude-sonnet-4-5", "messages": user},  # no max_tokens
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 10,
                "messages": user,
                "stop_sequences": ["END"],
            },
        ):
            answer = await http.post(url, json=body, headers=headers)
            assert answer.status_code == 400, answer.text
            value = answer.json()
            assert value["type"] == "error"
            assert value["error"]["type"] == "invalid_request_error"
        wrong_key = await http.post(
            url,
            json={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": user},
            headers={**headers, "x-api-key": "trx_nope_nope"},
        )
        assert wrong_key.status_code == 401
        assert wrong_key.json()["error"]["type"] == "authentication_error"
        # the pool exhausted: rate_limit_error with retry-after
        await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=600)
        limited = await http.post(
            url,
            json={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": user, "stream": True},
            headers=headers,
        )
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) > 0
    assert [r["status"] for r in await mock.control.model_requests()] == [429]


async def test_hostile_input_on_the_messages_routes_gets_anthropic_errors(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    """Whoever answers (the HTTP server, the edge, the handler), a Messages client gets
    ``{"type": "error", "error": {"type", "message"}}``; nothing goes upstream."""
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, api_key=True, max_body_bytes=100_000)
    key = {"x-api-key": proxy.api_key or ""}
    as_json = {**key, "content-type": "application/json"}
    valid = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    huge = b'{"messages": "' + b"x" * 200_000 + b'"}'
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("malformed", {"content": b"{nope", "headers": as_json}, 400, "invalid_request_error"),
        (
            "text/plain",
            {"content": b"{}", "headers": {**key, "content-type": "text/plain"}},
            415,
            "invalid_request_error",
        ),
        ("an array", {"content": b"[1]", "headers": as_json}, 400, "invalid_request_error"),
        ("too large", {"content": huge, "headers": as_json}, 413, "request_too_large"),
        (
            "foreign host",
            {"json": valid, "headers": {**key, "host": "evil.example"}},
            421,
            "invalid_request_error",
        ),
        ("no key", {"json": valid, "headers": {"x-api-key": ""}}, 401, "authentication_error"),
        (
            "unknown key",
            {"json": valid, "headers": {"x-api-key": "trx_nope_nope"}},
            401,
            "authentication_error",
        ),
    ]
    async with httpx.AsyncClient(timeout=30) as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            for name, request, status, kind in cases:
                answer = await http.post(f"{proxy.root}{path}", **request)
                assert answer.status_code == status, (path, name, answer.text)
                body = answer.json()
                assert body["type"] == "error", (path, name, body)
                assert body["error"]["type"] == kind and body["error"]["message"], (
                    path,
                    name,
                    body,
                )
    assert await mock.control.model_requests() == []


async def test_local_overload_is_an_overloaded_error(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await keyed_proxy(
        make_mock, make_proxy, lane_proxy_http_limit=1, lane_proxy_http_wait=0.0
    )
    await proxy.mock.control.add_fault("stall", seconds=5, count=1)
    url = f"{proxy.root}/v1/messages"
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"x-api-key": proxy.api_key or ""}
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=30) as http:

        async def held() -> None:
            answer = await http.post(url, json=body, headers=headers)
            statuses.append(answer.status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(held)

            async def upstream_holds_it() -> bool:
                return bool(await proxy.mock.control.model_requests())

            await eventually(upstream_holds_it)
            refused = await http.post(url, json=body, headers=headers)
            await proxy.mock.control.clear_faults()
    assert refused.status_code == 529
    assert refused.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": refused.json()["error"]["message"]},
    }
    assert statuses == [200]
