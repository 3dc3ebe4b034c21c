"""Chat Completions ⇄ Responses translation (``protocol/chat_completions.py``): each mapping
on real-looking payloads, upstream's captured event shapes, and properties over generated
requests and event sequences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.protocol.aggregate import Aggregation
from trioproxy.protocol.chat_completions import (
    DEFAULT_INSTRUCTIONS,
    IGNORED,
    ChatStream,
    chat_answer,
    chat_completion,
    chat_error,
    chat_to_responses,
)
from trioproxy.protocol.errors import ProxyError

CAPTURES = Path(__file__).resolve().parent / "captures"


def capture(scenario: str, name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((CAPTURES / scenario / name).read_text())
    return value


def refused(body: dict[str, Any]) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        chat_to_responses(body)
    assert caught.value.status == 400
    return caught.value


def param_of(error: ProxyError) -> Any:
    return error.body["error"]["param"]


USER = {"role": "user", "content": "hi"}


# -- the request ------------------------------------------------------------------------------


def test_a_plain_chat_becomes_a_codex_style_responses_request() -> None:
    chat = chat_to_responses(
        {
            "model": "gpt-5.5",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Say hi"},
            ],
            "reasoning_effort": "low",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert chat.body == {
        "model": "gpt-5.5",
        "instructions": "Be terse.\n\nAnswer in French.",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Say hi"}],
            }
        ],
        "parallel_tool_calls": True,
        "reasoning": {"effort": "low", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
    }
    assert chat.stream and chat.include_usage and chat.model == "gpt-5.5"


def test_without_a_leading_system_message_upstream_gets_the_default_instructions() -> None:
    chat = chat_to_responses({"model": "m", "messages": [USER]})
    assert chat.body["instructions"] == DEFAULT_INSTRUCTIONS
    assert not chat.stream and not chat.include_usage


def test_a_system_message_later_in_the_chat_stays_in_place_as_a_developer_message() -> None:
    chat = chat_to_responses(
        {"model": "m", "messages": [USER, {"role": "system", "content": "Now be formal."}]}
    )
    assert chat.body["input"][1] == {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": "Now be formal."}],
    }


def test_a_model_alias_names_the_upstream_model_and_the_client_sees_its_own() -> None:
    chat = chat_to_responses(
        {"model": "fast", "messages": [USER]}, model_aliases={"fast": "gpt-5.5"}
    )
    assert chat.body["model"] == "gpt-5.5" and chat.model == "fast"


def test_image_parts_by_url_and_data_url_become_input_images() -> None:
    chat = chat_to_responses(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "data:image/png;base64,iVBORw0KGgo=",
                                "detail": "low",
                            },
                        },
                    ],
                }
            ],
        }
    )
    assert chat.body["input"][0]["content"] == [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "auto"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
    ]
    error = refused(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                }
            ],
        }
    )
    assert param_of(error) == "messages[0].content[0].image_url.url"


def test_tool_calls_and_tool_results_become_function_call_items_with_their_call_ids() -> None:
    chat = chat_to_responses(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "List the files"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_278e4c9b976c45dda7f70df3",
                            "type": "function",
                            "function": {"name": "exec_command", "arguments": '{"cmd": "ls"}'},
                        }
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": "call_278e4c9b976c45dda7f70df3",
                    "content": "README.md\n",
                },
                {"role": "assistant", "content": "There is a README."},
            ],
        }
    )
    assert chat.body["input"][1:] == [
        {
            "type": "function_call",
            "call_id": "call_278e4c9b976c45dda7f70df3",
            "name": "exec_command",
            "arguments": '{"cmd": "ls"}',
        },
        {
            "type": "function_call_output",
            "call_id": "call_278e4c9b976c45dda7f70df3",
            "output": "README.md\n",
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "There is a README."}],
        },
    ]


def test_a_tool_result_for_no_earlier_call_is_refused() -> None:
    error = refused(
        {
            "model": "m",
            "messages": [USER, {"role": "tool", "tool_call_id": "call_x", "content": "1"}],
        }
    )
    assert param_of(error) == "messages[1].tool_call_id"


def test_function_tools_are_flattened_with_their_schema_and_strictness() -> None:
    schema = {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}
    chat = chat_to_responses(
        {
            "model": "m",
            "messages": [USER],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "exec_command",
                        "description": "Runs a command.",
                        "parameters": schema,
                        "strict": True,
                    },
                },
                {"type": "function", "function": {"name": "now"}},
            ],
            "tool_choice": {"type": "function", "function": {"name": "exec_command"}},
            "parallel_tool_calls": False,
        }
    )
    assert chat.body["tools"] == [
        {
            "type": "function",
            "name": "exec_command",
            "description": "Runs a command.",
            "parameters": schema,
            "strict": True,
        },
        {
            "type": "function",
            "name": "now",
            "parameters": {"type": "object", "properties": {}},
            "strict": False,
        },
    ]
    assert chat.body["tool_choice"] == {"type": "function", "name": "exec_command"}
    assert chat.body["parallel_tool_calls"] is False
    assert param_of(refused({"model": "m", "messages": [USER], "tools": [{"type": "custom"}]})) == (
        "tools[0].type"
    )


def test_response_formats_become_text_format() -> None:
    chat = chat_to_responses(
        {"model": "m", "messages": [USER], "response_format": {"type": "json_object"}}
    )
    assert chat.body["text"] == {"format": {"type": "json_object"}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_to_responses(
        {
            "model": "m",
            "messages": [USER],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
            "verbosity": "low",
        }
    )
    assert chat.body["text"] == {
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True},
        "verbosity": "low",
    }
    assert (
        "text"
        not in chat_to_responses(
            {"model": "m", "messages": [USER], "response_format": {"type": "text"}}
        ).body
    )


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"stop": ["\n"]}, "stop", "unsupported_parameter"),
        ({"stop": "END"}, "stop", "unsupported_parameter"),
        ({"n": 2}, "n", "unsupported_value"),
        ({"temperature": 0.2}, "temperature", "unsupported_value"),
        ({"top_p": 0.5}, "top_p", "unsupported_value"),
        ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_value"),
        ({"logprobs": True}, "logprobs", "unsupported_value"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "unsupported_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "invalid_type"),
        ({"max_completion_tokens": "many"}, "max_completion_tokens", "invalid_type"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort", "invalid_value"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"audio": {"voice": "alloy"}}, "audio", "unsupported_parameter"),
        ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
        ({"top_k": 40}, "top_k", "unknown_parameter"),
        ({"messages": "hi"}, "messages", "invalid_type"),
        ({"messages": []}, "messages", "invalid_type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "invalid_type"),
        ({"model": None}, "model", "missing_required_parameter"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "ghost"}}},
            "tool_choice",
            "invalid_value",
        ),
        (
            {"stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "invalid_type",
        ),
    ],
)
def test_what_upstream_cannot_honour_is_a_400_naming_the_parameter(
    extra: dict[str, Any], param: str, code: str
) -> None:
    error = refused({"model": "m", "messages": [USER], **extra})
    assert error.body["error"]["param"] == param
    assert error.body["error"]["code"] == code
    assert error.body["error"]["type"] == "invalid_request_error"


def test_defaults_and_ignored_parameters_are_accepted_and_not_sent_upstream() -> None:
    chat = chat_to_responses(
        {
            "model": "m",
            "messages": [USER],
            "temperature": 1,
            "top_p": 1.0,
            "n": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logprobs": False,
            "stop": None,
            "max_tokens": 512,
            "max_completion_tokens": 1024,
            "user": "user-1234",
            "seed": 7,
            "store": False,
            "metadata": {"app": "x"},
            "service_tier": "auto",
            "safety_identifier": "h-1",
            "modalities": ["text"],
        }
    )
    assert set(chat.ignored) == set(IGNORED)
    sent = set(chat.body) - {"store"}  # (upstream gets store: false, whatever was asked)
    assert chat.body["store"] is False
    assert not sent & (
        {"temperature", "top_p", "n", "max_output_tokens", "user", "stop"} | set(IGNORED)
    )


# -- the stream ------------------------------------------------------------------------------


def content_of(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c.get("choices"))


def test_a_captured_text_turn_streams_as_chunks_with_role_content_finish_and_usage() -> None:
    scenario = "proactive_refresh"
    events = [
        capture(scenario, "13_ws_send_response.in_progress.json"),
        capture(scenario, "14_ws_send_response.output_item.added.json"),
        capture(scenario, "15_ws_send_response.content_part.added.json"),
        capture(scenario, "16_ws_send_response.output_text.delta.json"),
        {**capture(scenario, "16_ws_send_response.output_text.delta.json"), "delta": "ke backend"},
        capture(scenario, "17_ws_send_response.output_text.done.json"),
        capture(scenario, "18_ws_send_response.content_part.done.json"),
        capture(scenario, "19_ws_send_response.output_item.done.json"),
        {
            "type": "response.completed",
            "response": {
                "id": "resp_1",
                "status": "completed",
                "usage": {
                    "input_tokens": 1234,
                    "input_tokens_details": {"cached_tokens": 1024},
                    "output_tokens": 5,
                    "output_tokens_details": {"reasoning_tokens": 2},
                    "total_tokens": 1239,
                },
            },
        },
    ]
    stream = ChatStream(model="gpt-5.5", created=1795254874, include_usage=True)
    chunks = [chunk for event in events for chunk in stream.feed(event)]
    assert stream.done
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["id"] == stream.id and c["id"].startswith("chatcmpl-") for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gpt-5.5" for c in chunks)
    assert content_of(chunks, "content") == "hi from fake backend"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 1234,
        "completion_tokens": 5,
        "total_tokens": 1239,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    assert all(c["usage"] is None for c in chunks[:-1])


def test_a_captured_tool_call_turn_streams_tool_call_deltas_with_one_index() -> None:
    scenario = "ws_builtin_toolcall"
    delta = capture(scenario, "15_ws_send_response.function_call_arguments.delta.json")
    done = capture(scenario, "16_ws_send_response.function_call_arguments.done.json")
    item = {
        "id": delta["item_id"],
        "type": "function_call",
        "status": "in_progress",
        "arguments": "",
        "call_id": "call_278e4c9b976c45dda7f70df3",
        "name": "exec_command",
    }
    events = [
        capture(scenario, "13_ws_send_response.output_item.added.json"),
        capture(scenario, "14_ws_send_response.output_item.done.json"),
        {"type": "response.output_item.added", "output_index": 1, "item": item},
        delta,
        {**delta, "delta": done["arguments"][len(delta["delta"]) :]},
        done,
        {
            "type": "response.output_item.done",
            "output_index": 1,
            "item": {**item, "status": "completed", "arguments": done["arguments"]},
        },
        {"type": "response.completed", "response": {"id": "resp_2", "usage": None}},
    ]
    stream = ChatStream(model="gpt-5.5", created=1)
    chunks = [chunk for event in events for chunk in stream.feed(event)]
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0] == {
        "index": 0,
        "id": "call_278e4c9b976c45dda7f70df3",
        "type": "function",
        "function": {"name": "exec_command", "arguments": ""},
    }
    assert all(call["index"] == 0 for call in calls)
    assert "".join(call["function"]["arguments"] for call in calls) == done["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "usage" not in chunks[-1]


def test_reasoning_summaries_stream_as_reasoning_content() -> None:
    stream = ChatStream(model="m", created=1)
    chunks: list[dict[str, Any]] = []
    for index, text in [(0, "Looking at "), (0, "the files."), (1, "Then answering.")]:
        chunks += stream.feed(
            {
                "type": "response.reasoning_summary_text.delta",
                "item_id": "rs_1",
                "output_index": 0,
                "summary_index": index,
                "delta": text,
            }
        )
    assert content_of(chunks, "reasoning_content") == "Looking at the files.\n\nThen answering."


@pytest.mark.parametrize(
    ("reason", "finish"), [("max_output_tokens", "length"), ("content_filter", "content_filter")]
)
def test_an_incomplete_response_finishes_with_length_or_content_filter(
    reason: str, finish: str
) -> None:
    stream = ChatStream(model="m", created=1)
    chunks = stream.feed(
        {
            "type": "response.incomplete",
            "response": {"status": "incomplete", "incomplete_details": {"reason": reason}},
        }
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == finish and stream.done


def test_a_failed_response_ends_the_stream_with_an_error_object_and_no_finish_reason() -> None:
    stream = ChatStream(model="m", created=1)
    stream.feed({"type": "response.created", "response": {"id": "resp_9"}})
    out = stream.feed(
        {
            "type": "response.failed",
            "response": {
                "id": "resp_9",
                "error": {"code": "context_length_exceeded", "message": "Too long for resp_9."},
            },
        }
    )
    assert out == [
        {
            "error": {
                "message": "Too long for resp_[redacted].",
                "type": "upstream_error",
                "code": "context_length_exceeded",
                "param": None,
            }
        }
    ]
    assert stream.done and stream.error == out[0]
    assert stream.feed({"type": "response.completed", "response": {}}) == []
    error = ChatStream(model="m", created=1).feed(
        {"type": "error", "error": {"type": "usage_limit_reached", "message": "limit"}}
    )
    assert error[0]["error"]["type"] == "usage_limit_reached"


# -- the non-streamed answer and errors ----------------------------------------------------


TOOL_RESPONSE: dict[str, Any] = {
    "id": "resp_3",
    "status": "completed",
    "output": [
        {
            "id": "rs_1",
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": "Need the file list."}],
            "encrypted_content": "ZmFrZQ==",
        },
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "annotations": [], "text": "Listing."}],
        },
        {
            "id": "fc_1",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_1",
            "name": "exec_command",
            "arguments": '{"cmd":"ls"}',
        },
    ],
    "usage": {"input_tokens": 10, "output_tokens": 4, "total_tokens": 14},
}


def test_a_completed_response_becomes_a_chat_completion() -> None:
    completion = chat_completion(
        TOOL_RESPONSE, model="gpt-5.5", created=7, completion_id="chatcmpl-x"
    )
    assert completion == {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 7,
        "model": "gpt-5.5",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Listing.",
                    "refusal": None,
                    "reasoning_content": "Need the file list.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "exec_command", "arguments": '{"cmd":"ls"}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def test_the_non_streamed_answer_comes_from_the_aggregation() -> None:
    done = Aggregation()
    done.feed({"type": "response.completed", "response": TOOL_RESPONSE})
    status, body = chat_answer(done, model="m", created=1)
    assert status == 200 and body["choices"][0]["message"]["tool_calls"][0]["id"] == "call_1"
    cut = Aggregation()
    cut.feed(
        {
            "type": "response.incomplete",
            "response": {
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
                "output": [],
            },
        }
    )
    status, body = chat_answer(cut, model="m", created=1)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == ""
    failed = Aggregation()
    failed.feed(
        {"type": "response.failed", "response": {"error": {"code": "server_error", "message": "x"}}}
    )
    status, body = chat_answer(failed, model="m", created=1)
    assert status == 502 and body["error"]["code"] == "server_error"


def test_errors_render_in_the_chat_completions_shape() -> None:
    status, body = chat_error(refused({"model": "m", "messages": [USER], "stop": ["x"]}))
    assert status == 400
    assert list(body["error"])[:4] == ["message", "type", "param", "code"]
    assert body["error"]["param"] == "stop" and "stop" in body["error"]["message"]
    status, body = chat_error(ProxyError(429, {"error": {"message": "m", "resets_at": 5}}))
    assert status == 429 and body["error"]["resets_at"] == 5 and body["error"]["code"] is None


# -- properties ------------------------------------------------------------------------------

TEXT = st.text(max_size=12)
NAME = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
SCHEMA = st.fixed_dictionaries(
    {
        "type": st.just("object"),
        "properties": st.dictionaries(NAME, st.just({"type": "string"}), max_size=2),
    }
)


@st.composite
def chat_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Chat Completions request: messages of every role, content parts, tools,
    tool_choice, response_format, reasoning effort."""
    tools = draw(
        st.lists(
            st.fixed_dictionaries(
                {"name": NAME, "parameters": SCHEMA},
                optional={"description": TEXT, "strict": st.booleans()},
            ),
            max_size=3,
            unique_by=lambda f: f["name"],
        )
    )
    messages: list[dict[str, Any]] = [
        {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(TEXT)}
        for _ in range(draw(st.integers(0, 2)))
    ]
    call_number = 0
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["user", "user_parts", "assistant", "calls", "developer"]))
        if kind == "user":
            messages.append({"role": "user", "content": draw(TEXT)})
        elif kind == "user_parts":
            parts = draw(
                st.lists(
                    st.one_of(
                        TEXT.map(lambda t: {"type": "text", "text": t}),
                        st.sampled_from(
                            ["https://x.test/a.png", "data:image/png;base64,iVBORw0KGgo="]
                        ).map(lambda u: {"type": "image_url", "image_url": {"url": u}}),
                    ),
                    max_size=3,
                )
            )
            messages.append({"role": "user", "content": parts})
        elif kind == "assistant":
            messages.append({"role": "assistant", "content": draw(TEXT)})
        elif kind == "developer":
            messages.append(
                {"role": "developer", "content": [{"type": "text", "text": draw(TEXT)}]}
            )
        elif tools:
            calls = []
            for _ in range(draw(st.integers(1, 2))):
                call_number += 1
                name = draw(st.sampled_from([t["name"] for t in tools]))
                calls.append(
                    {
                        "id": f"call_{call_number}",
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps({"n": draw(TEXT)})},
                    }
                )
            messages.append(
                {"role": "assistant", "content": draw(st.none() | TEXT), "tool_calls": calls}
            )
            for call in calls:
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": draw(TEXT)})
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(["gpt-5.5", "gpt-6-astra"])),
        "messages": messages,
    }
    if tools:
        body["tools"] = [{"type": "function", "function": f} for f in tools]
        body["tool_choice"] = draw(
            st.sampled_from(["none", "auto", "required"])
            | st.sampled_from([t["name"] for t in tools]).map(
                lambda n: {"type": "function", "function": {"name": n}}
            )
        )
    body.update(
        draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "reasoning_effort": st.sampled_from(["minimal", "low", "medium", "high"]),
                    "response_format": st.sampled_from(
                        [
                            {"type": "text"},
                            {"type": "json_object"},
                            {
                                "type": "json_schema",
                                "json_schema": {"name": "a", "schema": {"type": "object"}},
                            },
                        ]
                    ),
                    "stream": st.booleans(),
                    "parallel_tool_calls": st.booleans(),
                    "max_tokens": st.integers(1, 10_000),
                },
            )
        )
    )
    if not messages or messages[-1]["role"] in ("system", "developer"):
        messages.append({"role": "user", "content": draw(TEXT)})
    return body


def texts_of(item: dict[str, Any]) -> list[str]:
    return [p.get("text", p.get("refusal", "")) for p in item.get("content", [])]


VALID_PARTS = {
    "user": {"input_text", "input_image", "input_file"},
    "developer": {"input_text"},
    "assistant": {"output_text", "refusal"},
}


@settings(max_examples=60, deadline=None)
@given(chat_requests())
def test_any_valid_chat_request_translates_to_a_valid_responses_request(
    body: dict[str, Any],
) -> None:
    chat = chat_to_responses(body)
    out = chat.body
    assert out["store"] is False and out["stream"] is True
    assert out["include"] == ["reasoning.encrypted_content"]
    assert isinstance(out["instructions"], str) and out["instructions"]
    assert "max_output_tokens" not in out
    seen_calls: set[str] = set()
    texts: list[str] = [out["instructions"]]
    for item in out["input"]:
        kind = item["type"]
        if kind == "message":
            assert set(item) == {"type", "role", "content"}
            for part in item["content"]:
                assert part["type"] in VALID_PARTS[item["role"]]
                if part["type"] == "input_image":
                    assert part["image_url"].startswith(("https://", "data:image/"))
            texts += texts_of(item)
        elif kind == "function_call":
            assert set(item) == {"type", "call_id", "name", "arguments"}
            assert item["name"] in {t["name"] for t in out["tools"]}
            seen_calls.add(item["call_id"])
        else:
            assert kind == "function_call_output" and set(item) == {"type", "call_id", "output"}
            assert item["call_id"] in seen_calls
            texts.append(item["output"])
    joined = "\x00".join(texts)
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            assert content in joined
        for part in content if isinstance(content, list) else []:
            if part["type"] == "text":
                assert part["text"] in joined
        for call in message.get("tool_calls", []):
            assert call["id"] in seen_calls
    for tool in body.get("tools", []):
        function = tool["function"]
        (sent,) = [t for t in out["tools"] if t["name"] == function["name"]]
        assert sent["parameters"] == function["parameters"]
        assert sent["strict"] is function.get("strict", False)
        assert sent.get("description") == function.get("description")
    if "reasoning_effort" in body:
        assert out["reasoning"]["effort"] == body["reasoning_effort"]
    fmt = body.get("response_format", {}).get("type", "text")
    assert out.get("text", {}).get("format", {"type": "text"})["type"] == fmt
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        assert out["tool_choice"] == {"type": "function", "name": choice["function"]["name"]}
    elif choice is not None:
        assert out["tool_choice"] == choice


OUTPUTS = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.lists(TEXT, max_size=4)),
        st.tuples(st.just("reasoning"), st.lists(st.lists(TEXT, max_size=3), max_size=3)),
        st.tuples(st.just("call"), st.tuples(NAME, st.lists(TEXT, max_size=4), st.booleans())),
    ),
    max_size=5,
)


def upstream_events(outputs: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A turn's events for ``outputs`` (as upstream sends them) and its final response."""
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {"id": "resp_g"}}]
    items: list[dict[str, Any]] = []
    for index, (kind, spec) in enumerate(outputs):
        if kind == "text":
            item_id = f"msg_{index}"
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {"id": item_id, "type": "message", "role": "assistant", "content": []},
                }
            )
            for chunk in spec:
                events.append(
                    {
                        "type": "response.output_text.delta",
                        "item_id": item_id,
                        "output_index": index,
                        "content_index": 0,
                        "delta": chunk,
                    }
                )
            item = {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "".join(spec)}],
            }
        elif kind == "reasoning":
            item_id = f"rs_{index}"
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {"id": item_id, "type": "reasoning", "summary": []},
                }
            )
            for summary_index, part in enumerate(spec):
                for chunk in part:
                    events.append(
                        {
                            "type": "response.reasoning_summary_text.delta",
                            "item_id": item_id,
                            "output_index": index,
                            "summary_index": summary_index,
                            "delta": chunk,
                        }
                    )
            item = {
                "id": item_id,
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "".join(p)} for p in spec],
            }
        else:
            name, chunks, streamed = spec
            item_id = f"fc_{index}"
            base = {
                "id": item_id,
                "type": "function_call",
                "call_id": f"call_{index}",
                "name": name,
            }
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**base, "arguments": ""},
                }
            )
            if streamed:
                for chunk in chunks:
                    events.append(
                        {
                            "type": "response.function_call_arguments.delta",
                            "item_id": item_id,
                            "output_index": index,
                            "delta": chunk,
                        }
                    )
            item = {**base, "arguments": "".join(chunks)}
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        items.append(item)
    response = {
        "id": "resp_g",
        "status": "completed",
        "output": items,
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
    }
    events.append({"type": "response.completed", "response": response})
    return events, response


@settings(max_examples=80, deadline=None)
@given(OUTPUTS, st.booleans())
def test_any_event_sequence_streams_chunks_whose_deltas_rebuild_the_answer(
    outputs: list[Any], include_usage: bool
) -> None:
    events, response = upstream_events(outputs)
    stream = ChatStream(model="m", created=1, include_usage=include_usage)
    chunks = [chunk for event in events for chunk in stream.feed(event)]
    assert stream.done and len({c["id"] for c in chunks}) == 1
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["delta"]["role"] == "assistant"
    finishes = [c["finish_reason"] for c in choices if c["finish_reason"] is not None]
    calls = [spec for kind, spec in outputs if kind == "call"]
    assert finishes == ["tool_calls" if calls else "stop"]
    assert choices[-1]["finish_reason"] is not None
    texts = "".join("".join(spec) for kind, spec in outputs if kind == "text")
    assert content_of(chunks, "content") == texts
    summaries = ["".join(part) for kind, spec in outputs if kind == "reasoning" for part in spec]
    assert content_of(chunks, "reasoning_content") == "\n\n".join(s for s in summaries if s)
    deltas = [call for c in choices for call in c["delta"].get("tool_calls", [])]
    for index, (name, chunks_of_call, _) in enumerate(calls):
        mine = [d for d in deltas if d["index"] == index]
        assert mine[0]["function"]["name"] == name and mine[0]["id"].startswith("call_")
        assert all("id" not in d for d in mine[1:])
        assert "".join(d["function"]["arguments"] for d in mine) == "".join(chunks_of_call)
    assert {d["index"] for d in deltas} == set(range(len(calls)))
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5
    completion = chat_completion(response, model="m", created=1)
    message = completion["choices"][0]["message"]
    assert (message["content"] or "") == texts
    assert message.get("reasoning_content", "") == "\n\n".join(s for s in summaries if s)
    assert [c["function"]["arguments"] for c in message.get("tool_calls", [])] == [
        "".join(c[1]) for c in calls
    ]
    assert completion["choices"][0]["finish_reason"] == finishes[0]
