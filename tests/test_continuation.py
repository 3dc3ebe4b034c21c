"""Conversations that resend their whole history (Chat Completions, Anthropic Messages) served
incrementally upstream: through a live proxy on loopback in front of the mock, driven by the
OpenAI and Anthropic SDKs, and properties of the matching itself
(``protocol/continuation.py``).

What must hold: a later turn that continues the previous one exactly goes upstream as that
turn's continuation (its response id as ``previous_response_id``, only the new items), and
whatever gets in the way (an edited history, a closed upstream socket, a failover to another
account, a fork served at the same time) sends the client's request whole instead, so the
answer is the one the whole history gets. The mock's ``mock:recap`` answer lists every
message of the conversation as upstream saw it: one check that nothing was lost or doubled.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.protocol.anthropic_messages import message_from_response, messages_to_responses
from trioproxy.protocol.chat_completions import chat_completion, chat_to_responses
from trioproxy.protocol.continuation import History, extend, scope_mark

MODEL = "gpt-5.5"
SCOPE = scope_mark("key-1", MODEL)

EXEC_TOOL = {
    "type": "function",
    "function": {
        "name": "exec_command",
        "parameters": {
            "type": "object",
            "properties": {"cmd": {"type": "string"}},
            "required": ["cmd"],
        },
    },
}
ANTHROPIC_EXEC_TOOL = {
    "name": "exec_command",
    "input_schema": {
        "type": "object",
        "properties": {"cmd": {"type": "string"}},
        "required": ["cmd"],
    },
}


# -- properties of the matching ---------------------------------------------------------------

texts = st.text(min_size=1, max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def upstream_outputs(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A turn's output items as upstream sends them: reasoning, an optional message, calls
    (arguments in upstream's own spacing)."""
    output: list[dict[str, Any]] = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x" * 8}
    ]
    calls = draw(st.lists(st.dictionaries(st.sampled_from("abc"), json_values), max_size=3))
    if not calls or draw(st.booleans()):
        output.append(
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": draw(texts), "annotations": []}],
            }
        )
    for n, arguments in enumerate(calls):
        spaced = json.dumps(arguments, indent=draw(st.sampled_from([None, 1])))
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{n}",
                "status": "completed",
                "call_id": f"call_{n}",
                "name": "exec_command",
                "arguments": spaced,
            }
        )
    return output


def chat_items(messages: list[dict[str, Any]]) -> list[Any]:
    items: list[Any] = chat_to_responses({"model": MODEL, "messages": messages}).body["input"]
    return items


def anthropic_items(messages: list[dict[str, Any]]) -> list[Any]:
    body = {"model": MODEL, "max_tokens": 100, "messages": messages}
    items: list[Any] = messages_to_responses(body).body["input"]
    return items


def chat_echo(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message a Chat client gets for ``output``, as it sends it back."""
    completion = chat_completion({"output": output}, model=MODEL, created=0)
    return {k: v for k, v in completion["choices"][0]["message"].items() if v is not None}


def continued_length(
    first: list[Any], output: list[dict[str, Any]], later: list[Any]
) -> int | None:
    turn = extend(History.of(SCOPE, first).whole, output)
    return History.of(SCOPE, later).longest({turn})


@settings(max_examples=150, deadline=None)
@given(upstream_outputs(), texts, texts)
def test_a_chat_client_echoing_the_answer_continues_the_turn(
    output: list[dict[str, Any]], first: str, then: str
) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    turn = chat_items(messages)
    answer = chat_echo(output)
    messages.append(answer)
    for call in answer.get("tool_calls", []):
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": then})
    if "tool_calls" not in answer:
        messages.append({"role": "user", "content": then})
    later = chat_items(messages)
    echoed = len(later) - (len(answer.get("tool_calls", [])) or 1)
    assert continued_length(turn, output, later) == echoed
    # the new items are exactly what came after the answer
    assert all(
        i.get("role") == "user" or i["type"] == "function_call_output" for i in later[echoed:]
    )


@settings(max_examples=150, deadline=None)
@given(upstream_outputs(), texts, texts)
def test_an_anthropic_client_echoing_the_answer_continues_the_turn(
    output: list[dict[str, Any]], first: str, then: str
) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    turn = anthropic_items(messages)
    answer = message_from_response({"output": output}, model=MODEL, thinking=True)
    messages.append({"role": "assistant", "content": answer["content"]})
    uses = [b for b in answer["content"] if b["type"] == "tool_use"]
    results = [{"type": "tool_result", "tool_use_id": b["id"], "content": then} for b in uses]
    messages.append({"role": "user", "content": results or then})
    later = anthropic_items(messages)
    assert continued_length(turn, output, later) == len(later) - (len(results) or 1)


@settings(max_examples=100, deadline=None)
@given(upstream_outputs(), texts, texts, st.data())
def test_an_edited_history_never_continues_the_turn(
    output: list[dict[str, Any]], first: str, then: str, data: st.DataObject
) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    turn = chat_items(messages)
    answer = chat_echo(output)
    edit = data.draw(st.sampled_from(["first", "answer", "call"]))
    if edit == "first":
        messages[0] = {"role": "user", "content": first + "!"}
    elif edit == "answer" or "tool_calls" not in answer:
        answer["content"] = (answer.get("content") or "") + "!"
    else:
        call = answer["tool_calls"][-1]
        call["function"] = {**call["function"], "arguments": json.dumps({"edited": True})}
    messages += [answer, {"role": "user", "content": then}]
    later = chat_items(messages)
    assert continued_length(turn, output, later) is None


def test_another_key_or_model_never_continues_the_turn() -> None:
    first = chat_items([{"role": "user", "content": "hello"}])
    output = [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}
    ]
    later = chat_items(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"},
        ]
    )
    turn = extend(History.of(SCOPE, first).whole, output)
    assert History.of(SCOPE, later).longest({turn}) == 2
    assert History.of(scope_mark("key-2", MODEL), later).longest({turn}) is None
    assert History.of(scope_mark("key-1", "gpt-5.4"), later).longest({turn}) is None
    # the conversation's name is the same on every turn, and differs between keys
    assert History.of(SCOPE, first).key() == History.of(SCOPE, later).key()
    assert History.of(scope_mark("key-2", MODEL), later).key() != History.of(SCOPE, later).key()


# -- through the proxy -------------------------------------------------------------------------


def openai_sdk(proxy: ProxyEnv) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{proxy.root}/v1", api_key=proxy.api_key, max_retries=0)


async def keyed_proxy(make_mock: MockFactory, make_proxy: ProxyFactory) -> ProxyEnv:
    mock = await make_mock(MockConfig(accounts=2))
    return await make_proxy(mock, api_key=True)


async def model_requests(proxy: ProxyEnv) -> list[dict[str, Any]]:
    return [r for r in await proxy.mock.control.model_requests() if r["status"] == 200]


def chat_turn(client: Any, messages: list[dict[str, Any]], stream: bool, **extra: Any) -> str:
    """One Chat Completions turn; the answer is appended to ``messages`` as a client does."""
    if stream:
        chunks = list(
            client.chat.completions.create(model=MODEL, messages=messages, stream=True, **extra)
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        messages.append({"role": "assistant", "content": text})
        return text
    answer = client.chat.completions.create(model=MODEL, messages=messages, **extra)
    message = answer.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    return str(message.content or "")


async def test_a_chat_conversation_is_served_incrementally_upstream(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await keyed_proxy(make_mock, make_proxy)

    def run() -> list[str]:
        client = openai_sdk(proxy)
        said = []
        messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
        try:
            for n, stream in enumerate([False, True, False, True], 1):
                messages.append({"role": "user", "content": f"mock:say turn {n}"})
                said.append(chat_turn(client, messages, stream))
            messages.append({"role": "user", "content": "mock:recap"})
            said.append(chat_turn(client, messages, False))
            return said
        finally:
            client.close()

    said = await trio.to_thread.run_sync(run)
    assert said[:4] == ["turn 1", "turn 2", "turn 3", "turn 4"]
    # upstream saw the whole conversation, each message once
    assert said[4] == "recap " + " | ".join(
        [
            *(f"user: mock:say turn {n} | assistant: turn {n}" for n in range(1, 5)),
            "user: mock:recap",
        ]
    )
    sent = await model_requests(proxy)
    assert len(sent) == 5
    # the first turn over HTTP, the second whole on a bridge session's socket, the others as
    # continuations of the turn before, with only the new user message
    assert sent[0]["transport"] == "http" and "previous_response_id" not in sent[0]["body"]
    assert sent[1]["method"] == "WS" and sent[1]["body"].get("previous_response_id") is None
    assert len(sent[1]["body"]["input"]) == 3
    for before, turn in itertools.pairwise(sent[1:]):
        assert turn["method"] == "WS" and turn["parent"] == sent[1]["parent"]
        assert turn["body"]["previous_response_id"] == before["response_id"]
        (item,) = turn["body"]["input"]
        assert item["role"] == "user"
    # one conversation name upstream on every turn, and one account (prompt-cache locality)
    keys = {r["body"]["prompt_cache_key"] for r in sent}
    assert len(keys) == 1 and next(iter(keys)).startswith("trioproxy-")
    assert len({r["account"] for r in sent}) == 1


async def test_a_tool_round_trip_continues_with_the_tool_output_only(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await keyed_proxy(make_mock, make_proxy)

    def run() -> list[str]:
        client = openai_sdk(proxy)
        messages: list[dict[str, Any]] = [{"role": "user", "content": "mock:say ready"}]
        try:
            said = [chat_turn(client, messages, False, tools=[EXEC_TOOL])]
            messages.append({"role": "user", "content": "mock:exec echo tool-ran"})
            chat_turn(client, messages, False, tools=[EXEC_TOOL])
            call = messages[-1]["tool_calls"][0]
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "tool-ran"})
            said.append(chat_turn(client, messages, False, tools=[EXEC_TOOL]))
            messages.append({"role": "user", "content": "mock:recap"})
            said.append(chat_turn(client, messages, True, tools=[EXEC_TOOL]))
            return said
        finally:
            client.close()

    said = await trio.to_thread.run_sync(run)
    assert said[:2] == ["ready", "Tool output received: tool-ran"]
    assert said[2] == (
        "recap user: mock:say ready | assistant: ready | user: mock:exec echo tool-ran"
        " | tool: tool-ran | assistant: Tool output received: tool-ran | user: mock:recap"
    )
    sent = await model_requests(proxy)
    third = sent[2]["body"]
    assert third["previous_response_id"] == sent[1]["response_id"]
    assert [i["type"] for i in third["input"]] == ["function_call_output"]


async def test_whatever_gets_in_the_way_sends_the_history_whole(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    """An edited history, an upstream socket closed between turns, and a failover to another
    account: each turn goes whole, and its answer is the whole history's."""
    proxy = await keyed_proxy(make_mock, make_proxy)
    control = proxy.mock.control
    client = openai_sdk(proxy)
    messages: list[dict[str, Any]] = []

    async def turn(text: str) -> str:
        messages.append({"role": "user", "content": text})
        return await trio.to_thread.run_sync(chat_turn, client, messages, False)

    try:
        await turn("mock:say one")
        await turn("mock:say two")
        # the client edits an answer: no continuation
        messages[-1]["content"] = "two, edited"
        assert await turn("mock:recap") == (
            "recap user: mock:say one | assistant: one | user: mock:say two"
            " | assistant: two, edited | user: mock:recap"
        )
        edited = (await model_requests(proxy))[-1]["body"]
        assert "previous_response_id" not in edited and len(edited["input"]) == 5
        await turn("mock:say three")  # a continuation again
        assert (await model_requests(proxy))[-1]["body"].get("previous_response_id")
        # upstream closes its sockets between turns: the continuation goes whole on a new one
        await control.close_websockets()
        await trio.sleep(0.2)
        assert (await turn("mock:say four")) == "four"
        resent = (await model_requests(proxy))[-1]
        assert "previous_response_id" not in resent["body"] and len(resent["body"]["input"]) == 9
        # the session's account is spent: failover to the other one, whole again
        await control.add_fault("usage_limit", account=resent["account"], count=1)
        assert (await turn("mock:recap")).endswith("assistant: four | user: mock:recap")
        moved = (await model_requests(proxy))[-1]
        assert moved["account"] != resent["account"]
        assert "previous_response_id" not in moved["body"] and len(moved["body"]["input"]) == 11
    finally:
        client.close()


async def test_a_fork_is_served_beside_its_conversation(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    """Two requests continuing the same turn at once (a client's retry or branch): one goes
    as the continuation, the other whole, and each answer is its own history's."""
    proxy = await keyed_proxy(make_mock, make_proxy)
    await proxy.mock.control.configure(first_event_delay=0.3)
    client = openai_sdk(proxy)
    try:
        base: list[dict[str, Any]] = [{"role": "user", "content": "mock:say one"}]
        await trio.to_thread.run_sync(chat_turn, client, base, False)
        base.append({"role": "user", "content": "mock:say two"})
        await trio.to_thread.run_sync(chat_turn, client, base, False)
        answers: dict[str, str] = {}

        async def branch(name: str) -> None:
            messages = [*base, {"role": "user", "content": f"mock:recap {name}"}]
            answers[name] = await trio.to_thread.run_sync(chat_turn, client, messages, False)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(branch, "left")
            nursery.start_soon(branch, "right")
    finally:
        client.close()
    history = "recap user: mock:say one | assistant: one | user: mock:say two | assistant: two"
    assert answers == {name: f"{history} | user: mock:recap {name}" for name in ("left", "right")}
    forks = (await model_requests(proxy))[-2:]
    anchored = [r for r in forks if r["body"].get("previous_response_id")]
    assert len(anchored) == 1 and len(anchored[0]["body"]["input"]) == 1


async def test_an_anthropic_conversation_with_a_tool_is_served_incrementally(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    import anthropic

    proxy = await keyed_proxy(make_mock, make_proxy)

    def run() -> list[str]:
        client: Any = anthropic.Anthropic(base_url=proxy.root, api_key=proxy.api_key, max_retries=0)
        messages: list[dict[str, Any]] = []
        said = []

        def turn(content: Any, stream: bool) -> Any:
            messages.append({"role": "user", "content": content})
            options = {"model": "claude-sonnet-4-5", "max_tokens": 1024}
            if stream:
                with client.messages.stream(
                    messages=messages, tools=[ANTHROPIC_EXEC_TOOL], **options
                ) as events:
                    answer = events.get_final_message()
            else:
                answer = client.messages.create(
                    messages=messages, tools=[ANTHROPIC_EXEC_TOOL], **options
                )
            messages.append(
                {"role": "assistant", "content": [b.model_dump() for b in answer.content]}
            )
            said.append("".join(b.text for b in answer.content if b.type == "text"))
            return answer

        try:
            turn("mock:say ready", False)
            called = turn("mock:exec echo tool-ran", True)
            use = next(b for b in called.content if b.type == "tool_use")
            turn([{"type": "tool_result", "tool_use_id": use.id, "content": "tool-ran"}], False)
            turn("mock:recap", True)
            return said
        finally:
            client.close()

    said = await trio.to_thread.run_sync(run)
    assert said[0] == "ready" and said[2] == "Tool output received: tool-ran"
    assert said[3] == (
        "recap user: mock:say ready | assistant: ready | user: mock:exec echo tool-ran"
        " | tool: tool-ran | assistant: Tool output received: tool-ran | user: mock:recap"
    )
    sent = await model_requests(proxy)
    assert [r["body"].get("previous_response_id") is not None for r in sent] == [
        False,
        False,
        True,
        True,
    ]
    assert [i["type"] for i in sent[2]["body"]["input"]] == ["function_call_output"]
    assert len(sent[3]["body"]["input"]) == 1
