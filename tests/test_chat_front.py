"""``POST /v1/chat/completions`` through a live proxy on loopback in front of the mock, driven
by the OpenAI Python SDK (``client.chat.completions``) and by raw HTTP for bad input."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.quota_support import eventually
from trioproxy.harness.mock_upstream import MockConfig

EXEC_TOOL = {
    "type": "function",
    "function": {
        "name": "exec_command",
        "description": "Run a shell command.",
        "parameters": {
            "type": "object",
            "properties": {"cmd": {"type": "string"}},
            "required": ["cmd"],
        },
    },
}


def sdk(proxy: ProxyEnv) -> Any:
    import openai

    return openai.OpenAI(
        base_url=f"{proxy.root}/v1", api_key=proxy.api_key or "unused", max_retries=0
    )


async def proxy_with_keys(make_mock: MockFactory, make_proxy: ProxyFactory) -> ProxyEnv:
    mock = await make_mock(MockConfig(accounts=2))
    return await make_proxy(mock, api_key=True)


async def test_the_openai_sdk_gets_a_completion_streamed_and_not(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await proxy_with_keys(make_mock, make_proxy)

    def run() -> tuple[Any, list[Any]]:
        client = sdk(proxy)
        try:
            unary = client.chat.completions.create(
                model="gpt-5.5",
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "mock:say unary chat works"},
                ],
            )
            chunks = list(
                client.chat.completions.create(
                    model="gpt-5.5",
                    messages=[{"role": "user", "content": "mock:say streamed chat works"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            return unary, chunks
        finally:
            client.close()

    unary, chunks = await trio.to_thread.run_sync(run)
    assert unary.object == "chat.completion" and unary.model == "gpt-5.5"
    assert unary.choices[0].message.role == "assistant"
    assert unary.choices[0].message.content == "unary chat works"
    assert unary.choices[0].finish_reason == "stop"
    assert unary.usage.prompt_tokens > 0 and unary.usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed chat works"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert len({c.id for c in chunks}) == 1
    # upstream got a Responses request: the system message as instructions, streamed,
    # not stored
    sent = [r["body"] for r in await proxy.mock.control.model_requests()]
    assert sent[0]["instructions"] == "Be brief."
    assert sent[0]["stream"] is True and sent[0]["store"] is False
    # both requests are in the request log (written in batches), charged to the key

    async def logged() -> bool:
        answer = await proxy.client.get(f"{proxy.root}/api/requests")
        chat = [r for r in answer.json()["requests"] if r["route"] == "/v1/chat/completions"]
        return len(chat) == 2 and all(
            r["status"] == 200 and r["output_tokens"] and r["key_id"] for r in chat
        )

    await eventually(logged)


async def test_a_tool_call_round_trip_and_a_json_schema_answer(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await proxy_with_keys(make_mock, make_proxy)
    schema = {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"answer": {"type": "integer"}},
                "required": ["answer"],
                "additionalProperties": False,
            },
        },
    }

    def run() -> tuple[Any, Any, list[Any], Any]:
        client = sdk(proxy)
        try:
            messages: list[dict[str, Any]] = [
                {"role": "user", "content": "mock:exec echo from-the-tool"}
            ]
            called = client.chat.completions.create(
                model="gpt-5.5", messages=messages, tools=[EXEC_TOOL]
            )
            call = called.choices[0].message.tool_calls[0]
            messages += [
                called.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "from-the-tool"},
            ]
            answered = client.chat.completions.create(
                model="gpt-5.5", messages=messages, tools=[EXEC_TOOL]
            )
            streamed = list(
                client.chat.completions.create(
                    model="gpt-5.5",
                    messages=[{"role": "user", "content": "mock:exec echo streamed"}],
                    tools=[EXEC_TOOL],
                    stream=True,
                )
            )
            structured = client.chat.completions.create(
                model="gpt-5.5",
                messages=[{"role": "user", "content": 'mock:say {"answer": 42}'}],
                response_format=schema,
            )
            return called, answered, streamed, structured
        finally:
            client.close()

    called, answered, streamed, structured = await trio.to_thread.run_sync(run)
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "exec_command"
    assert "echo from-the-tool" in json.loads(call.function.arguments)["cmd"]
    assert answered.choices[0].message.content == "Tool output received: from-the-tool"
    # the streamed call: one index, its id and name first, the arguments in pieces
    deltas = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert {tc.index for tc in deltas} == {0}
    assert deltas[0].id and deltas[0].function.name == "exec_command"
    arguments = "".join(tc.function.arguments or "" for tc in deltas)
    assert "echo streamed" in json.loads(arguments)["cmd"]
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"
    assert json.loads(structured.choices[0].message.content) == {"answer": 42}
    sent = [r["body"] for r in await proxy.mock.control.model_requests()]
    # the tool result went upstream as the call's output; the schema as text.format
    outputs = [i for i in sent[1]["input"] if i.get("type") == "function_call_output"]
    assert outputs and outputs[0]["call_id"] == call.id and outputs[0]["output"] == "from-the-tool"
    assert sent[3]["text"]["format"]["type"] == "json_schema"
    assert sent[3]["text"]["format"]["schema"]["required"] == ["answer"]


async def test_bad_chat_requests_get_a_clear_400_and_nothing_goes_upstream(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await proxy_with_keys(make_mock, make_proxy)
    url = f"{proxy.root}/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    cases: list[tuple[Any, str | None]] = [
        ({"model": "gpt-5.5", "messages": user, "stop": ["\n"]}, "stop"),
        ({"model": "gpt-5.5", "messages": user, "n": 2}, "n"),
        ({"model": "gpt-5.5", "messages": "hi"}, "messages"),
        ({"model": "gpt-5.5", "messages": [{"role": "wizard", "content": "x"}]}, None),
    ]
    for body, param in cases:
        answer = await proxy.client.post(url, json=body)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param
    malformed = await proxy.client.post(
        url, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and malformed.json()["error"]["code"]
    wrong_type = await proxy.client.post(url, content=b"hi", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415
    async with httpx.AsyncClient() as bare:
        anonymous = await bare.post(url, json={"model": "gpt-5.5", "messages": user})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_api_key"
    assert await proxy.mock.control.model_requests() == []


async def test_failover_and_pool_exhaustion_on_the_chat_front(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    url = f"{proxy.root}/v1/chat/completions"
    body = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "mock:whoami"}]}
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=3600)
    answer = await proxy.client.post(url, json=body)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "account acct-mock-2"
    await mock.control.patch_account("acct-mock-2", exhaust="primary", resets_in=600)
    refused = await proxy.client.post(url, json={**body, "stream": True})
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "usage_limit_reached" and refused.headers["retry-after"]
