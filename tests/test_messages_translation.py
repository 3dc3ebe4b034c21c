"""Anthropic's Messages API over the Responses API (``protocol/anthropic_messages.py``):
requests translate to what the Codex backend takes, upstream's events to Anthropic's stream
and answer, errors to Anthropic's shape; and, for any valid request and any event sequence,
nothing with a counterpart is lost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy.protocol.anthropic_messages import (
    SIGNATURE_PREFIX,
    TOOL_ERROR_PREFIX,
    AnthropicError,
    MessagesStream,
    anthropic_error,
    count_tokens_estimate,
    from_proxy_error,
    message_from_response,
    messages_to_responses,
    ping,
    stream_error,
    thinking_effort,
    upstream_model,
)
from trioproxy.protocol.errors import ProxyError

CAPTURES = Path(__file__).resolve().parent / "captures" / "ws_builtin_toolcall"


def capture(name: str) -> dict[str, Any]:
    (path,) = CAPTURES.glob(f"*_ws_send_{name}.json")
    value = json.loads(path.read_text())
    assert isinstance(value, dict)
    return value


def request(**extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello"}],
        **extra,
    }


# -- requests --------------------------------------------------------------------------------


def test_a_simple_request_becomes_a_stateless_streamed_responses_request() -> None:
    translated = messages_to_responses(request(system="Be brief.", stream=True))
    assert translated.body == {
        "model": "gpt-5.5",
        "instructions": "Be brief.",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello"}],
            }
        ],
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
    }
    assert translated.stream and not translated.thinking
    assert translated.model == "claude-sonnet-4-5"
    assert translated.ignored == ("max_tokens",)


def test_a_system_message_in_messages_becomes_a_developer_item_in_place() -> None:
    # Claude Code 2.1.332 sends the environment and reminders as a mid-conversation system
    # turn (beta per-turn-control-2026-07-01): messages[1] has role "system"
    body = request(
        system=[{"type": "text", "text": "Top.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Run it."}]},
            {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
            {"role": "system", "content": "Later."},
        ],
    )
    translated = messages_to_responses(body)
    assert translated.body["instructions"] == "Top."
    assert translated.body["input"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Run it."}]},
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "# Environment"}],
        },
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Later."}],
        },
    ]
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    for bad, where in (
        ({"role": "system", "content": [image]}, "messages.0.content.0"),
        ({"role": "tool", "content": "x"}, "messages.0.role"),
    ):
        with pytest.raises(AnthropicError) as caught:
            messages_to_responses(request(messages=[bad]))
        assert caught.value.message.startswith(where)


def test_a_tool_conversation_keeps_call_ids_order_and_errors() -> None:
    body = request(
        system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "List files"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Running ls."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01A",
                        "name": "shell",
                        "input": {"cmd": "ls"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01A",
                        "is_error": True,
                        "content": [{"type": "text", "text": "ls: denied"}],
                    },
                    {"type": "text", "text": "Try again"},
                ],
            },
        ],
        tools=[
            {
                "name": "shell",
                "description": "Run a command",
                "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}},
            }
        ],
        tool_choice={"type": "tool", "name": "shell", "disable_parallel_tool_use": True},
    )
    out = messages_to_responses(body).body
    assert out["instructions"] == "One.\n\nTwo."
    assert out["input"] == [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "List files"}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Running ls."}],
        },
        {
            "type": "function_call",
            "call_id": "toolu_01A",
            "name": "shell",
            "arguments": '{"cmd": "ls"}',
        },
        {
            "type": "function_call_output",
            "call_id": "toolu_01A",
            "output": TOOL_ERROR_PREFIX + "ls: denied",
        },
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Try again"}],
        },
    ]
    assert out["tools"] == [
        {
            "type": "function",
            "name": "shell",
            "description": "Run a command",
            "strict": False,
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
        }
    ]
    assert out["tool_choice"] == {"type": "function", "name": "shell"}
    assert out["parallel_tool_calls"] is False


def test_images_and_pdfs_become_input_images_and_files() -> None:
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        {
            "type": "document",
            "title": "spec.pdf",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
        },
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "notes"},
        },
    ]
    (item,) = messages_to_responses(request(messages=[{"role": "user", "content": content}])).body[
        "input"
    ]
    assert item["content"] == [
        {"type": "input_image", "image_url": "data:image/png;base64,iVBO"},
        {"type": "input_image", "image_url": "https://example.com/a.jpg"},
        {
            "type": "input_file",
            "filename": "spec.pdf",
            "file_data": "data:application/pdf;base64,JVBE",
        },
        {"type": "input_text", "text": "notes"},
    ]


def test_tool_results_with_images_become_a_list_output() -> None:
    block = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [
            {"type": "text", "text": "screenshot:"},
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"},
            },
        ],
    }
    (item,) = messages_to_responses(request(messages=[{"role": "user", "content": [block]}])).body[
        "input"
    ]
    assert item["output"] == [
        {"type": "input_text", "text": "screenshot:"},
        {"type": "input_image", "image_url": "data:image/jpeg;base64,/9j/"},
    ]


@pytest.mark.parametrize(
    ("budget", "effort"),
    [
        (1024, "low"),
        (4095, "low"),
        (4096, "medium"),
        (16383, "medium"),
        (16384, "high"),
        (64000, "high"),
    ],
)
def test_thinking_budgets_map_to_efforts_by_threshold(budget: int, effort: str) -> None:
    assert thinking_effort(budget) == effort
    translated = messages_to_responses(
        request(thinking={"type": "enabled", "budget_tokens": budget})
    )
    assert translated.body["reasoning"] == {"effort": effort, "summary": "auto"}
    assert translated.thinking


def test_disabled_thinking_asks_the_lowest_effort_and_absent_thinking_the_default() -> None:
    disabled = messages_to_responses(request(thinking={"type": "disabled"}))
    assert disabled.body["reasoning"] == {"effort": "low"}
    assert not disabled.thinking
    assert "reasoning" not in messages_to_responses(request()).body
    adaptive = messages_to_responses(
        request(thinking={"type": "adaptive"}, output_config={"effort": "max"})
    )
    assert adaptive.body["reasoning"] == {"effort": "high", "summary": "auto"}


def test_thinking_display_omitted_asks_no_summary_and_shows_signatures_only() -> None:
    omitted = messages_to_responses(
        request(thinking={"type": "enabled", "budget_tokens": 5000, "display": "omitted"})
    )
    assert omitted.body["reasoning"] == {"effort": "medium"}  # no summary asked upstream
    assert omitted.thinking and not omitted.thinking_text
    assert "reasoning.encrypted_content" in omitted.body["include"]
    summarized = messages_to_responses(
        request(thinking={"type": "adaptive", "display": "summarized"})
    )
    assert summarized.body["reasoning"] == {"summary": "auto"} and summarized.thinking_text
    with pytest.raises(AnthropicError) as refused:
        messages_to_responses(request(thinking={"type": "adaptive", "display": "verbose"}))
    assert refused.value.status == 400 and "thinking.display" in str(refused.value.body)
    # an upstream that sends a summary anyway: the blocks still carry the signature only
    reasoning = {
        "id": "rs_1",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "private"}],
        "encrypted_content": "enc",
    }
    upstream: list[dict[str, Any]] = [
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**reasoning, "summary": []},
        },
        {
            "type": "response.reasoning_summary_text.delta",
            "output_index": 0,
            "summary_index": 0,
            "delta": "private",
        },
        {"type": "response.output_item.done", "output_index": 0, "item": reasoning},
        {"type": "response.completed", "response": {"status": "completed", "output": [reasoning]}},
    ]
    stream = MessagesStream(model="claude-sonnet-4-5", thinking=True, thinking_text=False)
    events = [data for upstream_event in upstream for _, data in stream.feed(upstream_event)]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert deltas == [{"type": "signature_delta", "signature": SIGNATURE_PREFIX + "enc"}]
    assert "private" not in json.dumps(events)
    unary = message_from_response(
        {"status": "completed", "output": [reasoning]},
        model="claude-sonnet-4-5",
        thinking=True,
        thinking_text=False,
    )
    assert unary["content"] == [
        {"type": "thinking", "thinking": "", "signature": SIGNATURE_PREFIX + "enc"}
    ]


def test_only_this_proxys_thinking_signatures_go_back_upstream_as_reasoning() -> None:
    assistant = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Plan.", "signature": SIGNATURE_PREFIX + "ZW5j"},
            {"type": "thinking", "thinking": "Foreign.", "signature": "EqQBCkYIBxgCKkAAA"},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
            {"type": "text", "text": "Done."},
        ],
    }
    body = request(messages=[{"role": "user", "content": "Hi"}, assistant])
    items = messages_to_responses(body).body["input"]
    assert items[1] == {
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "Plan."}],
        "encrypted_content": "ZW5j",
    }
    assert items[2]["content"] == [{"type": "output_text", "text": "Done."}]
    assert len(items) == 3


def test_sampling_parameters_are_accepted_and_reported_as_ignored() -> None:
    translated = messages_to_responses(
        request(temperature=0.2, top_p=0.9, top_k=40, context_management={"edits": []})
    )
    assert translated.ignored == (
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "context_management",
    )
    for name in ("temperature", "top_p", "top_k", "max_tokens", "max_output_tokens"):
        assert name not in translated.body


def test_metadata_user_id_becomes_a_hashed_prompt_cache_key() -> None:
    translated = messages_to_responses(request(metadata={"user_id": "user_abc_session_1"}))
    key = translated.body["prompt_cache_key"]
    assert key.startswith("anthropic-") and "user_abc" not in key
    assert (
        key
        == messages_to_responses(request(metadata={"user_id": "user_abc_session_1"})).body[
            "prompt_cache_key"
        ]
    )
    assert translated.user_id == "user_abc_session_1"


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"stop_sequences": ["\n\nHuman:"]}, "stop_sequences"),
        ({"max_tokens": None}, "max_tokens"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "document", "source": {"type": "file", "file_id": "f"}}
                        ],
                    }
                ]
            },
            "messages.0.content.0",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}
                ]
            },
            "messages.0.content.0",
        ),
        ({"messages": []}, "messages"),
    ],
)
def test_what_upstream_cannot_honour_is_a_400_naming_it(extra: dict[str, Any], names: str) -> None:
    with pytest.raises(AnthropicError) as caught:
        messages_to_responses(request(**extra))
    assert caught.value.status == 400
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert caught.value.message.startswith(names)


def test_claude_names_map_to_the_default_models_and_the_map_overrides() -> None:
    assert upstream_model("claude-opus-4-1") == "gpt-5.5"
    assert upstream_model("claude-3-5-haiku-latest") == "gpt-5.5-mini"
    assert upstream_model("gpt-5.5-mini") == "gpt-5.5-mini"
    custom = {"claude-opus-4-1": "gpt-6-astra", "claude-sonnet-*": "gpt-5.5-mini"}
    assert upstream_model("claude-opus-4-1", custom) == "gpt-6-astra"
    assert upstream_model("claude-sonnet-4-5", custom) == "gpt-5.5-mini"
    assert upstream_model("claude-opus-4-5", custom) == "gpt-5.5"


def test_count_tokens_is_an_estimate_from_characters_and_images() -> None:
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x" * 400}]}
    assert count_tokens_estimate(body) == 100
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "A" * 9000},
    }
    body["messages"] = [{"role": "user", "content": [image]}]
    assert count_tokens_estimate(body) == 1600


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
        (422, "invalid_request_error"),
    ],
)
def test_error_types_follow_the_status(status: int, type_: str) -> None:
    assert anthropic_error(status, "m") == {
        "type": "error",
        "error": {"type": type_, "message": "m"},
    }


def test_proxy_errors_become_anthropic_answers_keeping_retry_after() -> None:
    overloaded = ProxyError.of(503, "Busy.", "proxy_overloaded", headers=[("retry-after", "1")])
    assert from_proxy_error(overloaded) == (
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "Busy."}},
        [("retry-after", "1")],
    )
    for code in ("usage_limit_reached", "key_budget_exceeded"):
        limited = ProxyError.of(
            429, "Spent.", code, type_="usage_limit_reached", headers=[("retry-after", "30")]
        )
        status, body, headers = from_proxy_error(limited)
        assert (status, body["error"]["type"], headers) == (
            429,
            "rate_limit_error",
            [("retry-after", "30")],
        )
    unauthorized = ProxyError.of(401, "No key.", "invalid_api_key")
    assert from_proxy_error(unauthorized)[:2] == (
        401,
        {"type": "error", "error": {"type": "authentication_error", "message": "No key."}},
    )


def test_upstream_failures_map_by_code_without_response_ids() -> None:
    failed = {
        "type": "response.failed",
        "response": {"error": {"code": "server_is_overloaded", "message": "resp_abc123 is busy"}},
    }
    assert stream_error(failed) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "resp_[redacted] is busy"},
    }
    error = {"type": "error", "error": {"code": "context_length_exceeded", "message": "Too long."}}
    assert stream_error(error)["error"]["type"] == "invalid_request_error"


# -- the stream ------------------------------------------------------------------------------


def captured_tool_turn() -> list[dict[str, Any]]:
    """The captured tool-call turn (reasoning, then a function call), completed."""
    created = capture("response.created")
    added_rs, done_rs = capture("response.output_item.added"), capture("response.output_item.done")
    args = capture("response.function_call_arguments.delta")
    args_done = capture("response.function_call_arguments.done")
    call = {
        "id": args["item_id"],
        "type": "function_call",
        "status": "in_progress",
        "arguments": "",
        "call_id": "call_7",
        "name": "exec_command",
    }
    full = args_done["arguments"]
    completed = capture("response.completed")
    completed["response"]["usage"] = {
        "input_tokens": 1234,
        "input_tokens_details": {"cached_tokens": 1000},
        "output_tokens": 30,
    }
    return [
        created,
        added_rs,
        done_rs,
        {"type": "response.output_item.added", "output_index": 1, "item": call},
        args,
        {**args, "delta": full[len(args["delta"]) :]},
        args_done,
        {
            "type": "response.output_item.done",
            "output_index": 1,
            "item": {**call, "status": "completed", "arguments": full},
        },
        completed,
    ]


def test_a_captured_tool_turn_streams_thinking_then_tool_use() -> None:
    stream = MessagesStream(
        model="claude-sonnet-4-5", thinking=True, message_id="msg_1", input_tokens=9
    )
    events = [e for upstream in captured_tool_turn() for e in stream.feed(upstream)]
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0][1]["message"]["usage"] == {"input_tokens": 9, "output_tokens": 0}
    assert events[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[2][1]["delta"] == {
        "type": "signature_delta",
        "signature": SIGNATURE_PREFIX + "ZmFrZS1lbmNyeXB0ZWQtcmVhc29uaW5n",
    }
    assert events[4][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_7", "name": "exec_command", "input": {}},
    }
    partial = "".join(data["delta"]["partial_json"] for _, data in events[5:7])
    assert json.loads(partial) == {"cmd": "echo hello-from-tool", "yield_time_ms": 1000}
    assert events[8][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 234,
            "output_tokens": 30,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 1000,
        },
    }
    assert stream.feed({"type": "response.completed"}) == []


def test_without_thinking_reasoning_is_not_shown() -> None:
    stream = MessagesStream(model="claude-sonnet-4-5")
    names = [name for upstream in captured_tool_turn() for name, _ in stream.feed(upstream)]
    assert names.count("content_block_start") == 1


def test_a_captured_text_turn_and_its_unary_message() -> None:
    delta = capture("response.output_text.delta")
    done_text = capture("response.output_text.done")["text"]
    item = {
        "id": delta["item_id"],
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": done_text}],
    }
    upstream = [
        capture("response.created"),
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        delta,
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {
            "type": "response.incomplete",
            "response": {
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
                "output": [item],
            },
        },
    ]
    stream = MessagesStream(model="claude-haiku-4-5")
    events = [e for event in upstream for e in stream.feed(event)]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == done_text
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    message = message_from_response(
        upstream[-1]["response"], model="claude-haiku-4-5", thinking=False, message_id="msg_2"
    )
    assert message["content"] == [{"type": "text", "text": done_text}]
    assert message["stop_reason"] == "max_tokens"
    assert message["id"] == "msg_2" and message["model"] == "claude-haiku-4-5"


def test_the_unary_message_parses_tool_arguments_and_counts_cached_tokens() -> None:
    response = {
        "status": "completed",
        "output": [],
        "usage": {
            "input_tokens": 50,
            "input_tokens_details": {"cached_tokens": 20},
            "output_tokens": 7,
        },
    }
    items = [
        {
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": "Think."}],
            "encrypted_content": "e",
        },
        {"type": "message", "content": [{"type": "output_text", "text": "Calling."}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a": [1]}'},
    ]
    message = message_from_response(response, model="claude-opus-4-1", thinking=True, items=items)
    assert message["content"] == [
        {"type": "thinking", "thinking": "Think.", "signature": SIGNATURE_PREFIX + "e"},
        {"type": "text", "text": "Calling."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": [1]}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {
        "input_tokens": 30,
        "output_tokens": 7,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 20,
    }


def test_failures_after_the_start_become_one_error_event() -> None:
    stream = MessagesStream(model="claude-sonnet-4-5")
    stream.feed(capture("response.created"))
    events = stream.feed(
        {"type": "error", "error": {"code": "rate_limit_exceeded", "message": "Slow down."}}
    )
    assert events == [
        ("error", {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down."}})
    ]
    assert stream.done and stream.end() == []
    cut = MessagesStream(model="claude-sonnet-4-5")
    cut.feed(capture("response.created"))
    ((name, data),) = cut.end("connection reset")
    assert name == "error" and data["error"]["type"] == "api_error"
    assert "connection reset" in data["error"]["message"]
    assert ping() == ("ping", {"type": "ping"})


# -- properties ------------------------------------------------------------------------------

texts = st.text(min_size=1, max_size=12)
names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
image = st.builds(
    lambda data: {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": data},
    },
    st.from_regex(r"[A-Za-z0-9+/]{4,12}", fullmatch=True),
)
text_block = st.builds(lambda t: {"type": "text", "text": t}, texts)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def messages_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Messages request: user and assistant turns alternating, each assistant
    tool_use answered by a tool_result at the start of the next user turn."""
    tool_names = draw(st.lists(names, min_size=0, max_size=3, unique=True))
    messages: list[dict[str, Any]] = []
    pending: list[str] = []
    counter = 0
    for turn in range(draw(st.integers(1, 4))):
        user: list[Any] = []
        for call_id in pending:
            content = draw(st.one_of(texts, st.lists(st.one_of(text_block, image), max_size=2)))
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": content,
            }
            if draw(st.booleans()):
                result["is_error"] = draw(st.booleans())
            user.append(result)
        pending = []
        user += draw(st.lists(st.one_of(text_block, image), min_size=0 if user else 1, max_size=3))
        if not any(b["type"] in ("text", "tool_result") for b in user) and draw(st.booleans()):
            messages.append({"role": "user", "content": draw(texts)})
        else:
            messages.append({"role": "user", "content": user})
        if turn == 0 and draw(st.booleans()):
            continue
        assistant: list[dict[str, Any]] = draw(st.lists(text_block, max_size=2))
        if tool_names:
            for _ in range(draw(st.integers(0, 2))):
                counter += 1
                call_id = f"toolu_{counter:02d}"
                pending.append(call_id)
                assistant.append(
                    {
                        "type": "tool_use",
                        "id": call_id,
                        "name": draw(st.sampled_from(tool_names)),
                        "input": draw(
                            st.dictionaries(st.text(max_size=4), json_values, max_size=3)
                        ),
                    }
                )
        if assistant:
            messages.append({"role": "assistant", "content": assistant})
        else:
            messages.append({"role": "assistant", "content": draw(texts)})
    if pending:
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": c} for c in pending],
            }
        )
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(["claude-sonnet-4-5", "claude-3-5-haiku-latest", "gpt-5.5"])),
        "max_tokens": draw(st.integers(1, 64000)),
        "messages": messages,
    }
    system = draw(st.one_of(st.none(), texts, st.lists(text_block, min_size=1, max_size=2)))
    if system is not None:
        body["system"] = system
    if tool_names:
        body["tools"] = [
            {
                "name": n,
                "description": draw(texts),
                "input_schema": {"type": "object", "properties": {}},
            }
            for n in tool_names
        ]
        body["tool_choice"] = draw(
            st.sampled_from(
                [
                    {"type": "auto"},
                    {"type": "any"},
                    {"type": "none"},
                    {"type": "tool", "name": tool_names[0]},
                ]
            )
        )
    thinking = draw(
        st.one_of(
            st.none(),
            st.just({"type": "disabled"}),
            st.builds(lambda n: {"type": "enabled", "budget_tokens": n}, st.integers(1024, 40000)),
        )
    )
    if thinking is not None:
        body["thinking"] = thinking
    return body


def all_texts(body: dict[str, Any]) -> list[str]:
    """Every text of a request's messages: string contents, text blocks, tool results'."""
    found = []
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            found.append(content)
            continue
        for block in content:
            if block["type"] == "text":
                found.append(block["text"])
            elif block["type"] == "tool_result":
                inner = block.get("content")
                if isinstance(inner, str):
                    found.append(inner)
                for part in inner if isinstance(inner, list) else []:
                    if part["type"] == "text":
                        found.append(part["text"])
    system = body.get("system")
    found += [system] if isinstance(system, str) else [b["text"] for b in system or []]
    return found


def upstream_texts(out: dict[str, Any]) -> str:
    pieces = [out.get("instructions", "")]
    for item in out["input"]:
        if item["type"] == "message":
            pieces += [part.get("text", "") for part in item["content"]]
        elif item["type"] == "function_call_output":
            output = item["output"]
            pieces += [output] if isinstance(output, str) else [p.get("text", "") for p in output]
    return "\x00".join(pieces)


VALID_PARTS = {
    "user": {"input_text", "input_image", "input_file"},
    "assistant": {"output_text"},
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages_requests())
def test_any_valid_request_translates_without_losing_what_has_a_counterpart(
    body: dict[str, Any],
) -> None:
    translated = messages_to_responses(body)
    out = translated.body
    assert out["store"] is False and out["stream"] is True
    assert out["include"] == ["reasoning.encrypted_content"]
    calls, outputs = {}, {}
    for item in out["input"]:
        assert item["type"] in ("message", "function_call", "function_call_output")
        if item["type"] == "message":
            assert item["content"]
            assert {p["type"] for p in item["content"]} <= VALID_PARTS[item["role"]]
        elif item["type"] == "function_call":
            calls[item["call_id"]] = item
        else:
            outputs[item["call_id"]] = item
    blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
    uses = {b["id"]: b for b in blocks if b["type"] == "tool_use"}
    results = {b["tool_use_id"]: b for b in blocks if b["type"] == "tool_result"}
    assert calls.keys() == uses.keys() == outputs.keys() == results.keys()
    for call_id, use in uses.items():
        assert json.loads(calls[call_id]["arguments"]) == use["input"]
        assert calls[call_id]["name"] == use["name"]
        assert calls[call_id]["call_id"] == call_id
    text = upstream_texts(out)
    for piece in all_texts(body):
        assert piece in text
    images = sum(1 for b in json.dumps(body["messages"]).split('"type": "image"')[1:])
    assert json.dumps(out["input"]).count('"input_image"') == images
    assert [t["name"] for t in out["tools"]] == [t["name"] for t in body.get("tools", [])]
    assert all(t["type"] == "function" and t["parameters"] for t in out["tools"])
    choice = body.get("tool_choice", {"type": "auto"})["type"]
    expected = {"auto": "auto", "any": "required", "none": "none"}.get(choice)
    assert out["tool_choice"] == (
        expected or {"type": "function", "name": body["tool_choice"]["name"]}
    )
    thinking = body.get("thinking")
    if thinking is None:
        assert "reasoning" not in out
    elif thinking["type"] == "enabled":
        assert out["reasoning"]["effort"] == thinking_effort(thinking["budget_tokens"])
        assert translated.thinking
    else:
        assert out["reasoning"] == {"effort": "low"}
    assert out["model"] == upstream_model(body["model"])
    assert count_tokens_estimate(body) >= 1


chunks = st.lists(st.text(min_size=1, max_size=6), min_size=0, max_size=4)
output_items = st.lists(
    st.one_of(
        st.tuples(st.just("message"), chunks),
        st.tuples(st.just("reasoning"), st.lists(chunks, max_size=3)),
        st.tuples(st.just("function_call"), chunks),
    ),
    max_size=5,
)


def upstream_events(
    items: list[tuple[str, Any]], ending: str
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Upstream's events for ``items`` and the (kind, text) each shown block must carry."""
    events: list[dict[str, Any]] = [
        {
            "type": "response.created",
            "response": {"id": "resp_1", "status": "in_progress", "output": []},
        }
    ]
    expected: list[tuple[str, str]] = []
    done_items = []
    item: dict[str, Any]
    final: dict[str, Any]
    for index, (kind, content) in enumerate(items):
        if kind == "message":
            text = "".join(content)
            item = {"id": f"msg_{index}", "type": "message", "role": "assistant", "content": []}
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": item}
            )
            events += [
                {
                    "type": "response.output_text.delta",
                    "output_index": index,
                    "content_index": 0,
                    "delta": c,
                }
                for c in content
            ]
            final = {**item, "content": [{"type": "output_text", "text": text}]}
            if text:
                expected.append(("text", text))
        elif kind == "reasoning":
            item = {
                "id": f"rs_{index}",
                "type": "reasoning",
                "summary": [],
                "encrypted_content": None,
            }
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": item}
            )
            for part, part_chunks in enumerate(content):
                events += [
                    {
                        "type": "response.reasoning_summary_text.delta",
                        "output_index": index,
                        "summary_index": part,
                        "delta": c,
                    }
                    for c in part_chunks
                ]
            summary = [{"type": "summary_text", "text": "".join(p)} for p in content]
            final = {**item, "summary": summary, "encrypted_content": f"enc{index}"}
            expected.append(("thinking", "\n\n".join("".join(p) for p in content if p)))
        else:
            arguments = "".join(content)
            item = {
                "id": f"fc_{index}",
                "type": "function_call",
                "call_id": f"call_{index}",
                "name": "f",
                "arguments": "",
            }
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": item}
            )
            events += [
                {
                    "type": "response.function_call_arguments.delta",
                    "output_index": index,
                    "item_id": item["id"],
                    "delta": c,
                }
                for c in content
            ]
            final = {**item, "arguments": arguments}
            expected.append(("tool_use", arguments))
        events.append({"type": "response.output_item.done", "output_index": index, "item": final})
        done_items.append(final)
    usage = {"input_tokens": 10, "output_tokens": 5}
    if ending == "completed":
        events.append(
            {
                "type": "response.completed",
                "response": {"status": "completed", "output": done_items, "usage": usage},
            }
        )
    else:
        events.append(
            {
                "type": "response.incomplete",
                "response": {
                    "status": "incomplete",
                    "incomplete_details": {"reason": "max_output_tokens"},
                    "output": done_items,
                    "usage": usage,
                },
            }
        )
    return events, expected


@settings(max_examples=80, deadline=None)
@given(output_items, st.sampled_from(["completed", "incomplete"]))
def test_any_event_sequence_streams_every_delta_in_order(
    items: list[tuple[str, Any]], ending: str
) -> None:
    upstream, expected = upstream_events(items, ending)
    stream = MessagesStream(model="claude-sonnet-4-5", thinking=True)
    events = [e for event in upstream for e in stream.feed(event)]
    assert [n for n, _ in events].count("message_stop") == 1
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    blocks: list[tuple[str, str]] = []
    open_index = None
    for name, data in events:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            open_index = data["index"]
            blocks.append((data["content_block"]["type"], ""))
        elif name == "content_block_delta":
            assert data["index"] == open_index
            kind, text = blocks[-1]
            delta = data["delta"]
            piece = delta.get("text", delta.get("thinking", delta.get("partial_json", "")))
            blocks[-1] = (kind, text + piece)
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    assert open_index is None
    assert blocks == expected
    (_, delta), _stop = events[-2], events[-1]
    stop = delta["delta"]["stop_reason"]
    if ending == "incomplete":
        assert stop == "max_tokens"
    else:
        assert stop == ("tool_use" if any(k == "tool_use" for k, _ in expected) else "end_turn")
    message = message_from_response(upstream[-1]["response"], model="m", thinking=True)
    assert [b["type"] for b in message["content"]] == [k for k, _ in expected]
