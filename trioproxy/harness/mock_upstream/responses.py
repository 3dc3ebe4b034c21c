"""What the mock answers, as plain data: the event sequence of one response (sans-IO).

The answer depends on the request the way a scripted model would:

* ``generate: false``                       -> prewarm: ``response.created`` + ``response.completed``,
                                               empty output.
* last input item ``compaction_trigger``     -> exactly one ``compaction`` output item.
* last input item ``function_call_output``   -> a text answer quoting the tool's last output line.
* last user message contains ``mock:exec CMD`` -> a tool-call turn: a reasoning item (with
  ``encrypted_content``) and an ``exec_command`` function call with argument deltas.
* ``mock:say TEXT``                          -> exactly TEXT; ``mock:whoami`` -> the account id.
* anything else                              -> ``DEFAULT_ANSWER``.

A test may script the next answers instead (``POST /__mock__/script``): each generating
request takes the next ``{"text": ...}``, ``{"tool_call": CMD}``, ``{"function_call": {"name":
NAME, "arguments": {...}}}`` (a call of any named function, e.g. another client's own tool,
in the same events as the ``exec_command`` call) or ``{"compaction": true}``.

Event and item shapes are those of the Codex CLI captures vendored under ``tests/captures/``
(the ``ws_send`` frames), which ``tests/test_mock_captures.py`` compares the mock against.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

import attrs

DEFAULT_ANSWER = "Hello from the trioproxy mock backend."
_DIRECTIVE = re.compile(r"mock:(exec|say|whoami|recap)\b[ \t]*([^\n]*)")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _opaque(payload: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


def decode_opaque(value: str) -> dict[str, Any]:
    """Read back an ``encrypted_content`` made by the mock (``{}`` if it is not one)."""
    try:
        data = json.loads(base64.b64decode(value))
    except (ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}


def estimate_tokens(items: Sequence[Any]) -> int:
    return sum(len(json.dumps(item, separators=(",", ":"))) for item in items) // 4


def message_text(item: dict[str, Any]) -> str:
    parts = item.get("content")
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        return ""
    return "\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


def last_user_text(items: Sequence[dict[str, Any]]) -> str:
    for item in reversed(items):
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return message_text(item)
    return ""


def recap(items: Sequence[Any]) -> str:
    """The conversation's user messages and the model's text answers, in order."""
    said = []
    for item in items:
        if isinstance(item, dict) and item.get("type", "message") == "message":
            if item.get("role") in ("user", "assistant"):
                said.append(f"{item['role']}: {message_text(item)}")
        elif isinstance(item, dict) and item.get("type") == "function_call_output":
            said.append(f"tool: {item.get('output')}")
    return "recap " + " | ".join(said)


@attrs.frozen
class TurnPlan:
    kind: str  # prewarm | text | tool_call | function_call | compaction
    events: list[dict[str, Any]]
    output: list[dict[str, Any]]
    usage: dict[str, Any]


def response_object(
    response_id: str,
    status: str,
    body: dict[str, Any],
    created_at: int,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "model": body.get("model", "gpt-5.5"),
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": None},
        "store": False,
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [],
        "usage": usage,
    }


def _chunks(text: str, deltas: int) -> list[str]:
    size = 10 if deltas <= 0 else max(1, -(-len(text) // deltas))
    pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
    while deltas > 0 and len(pieces) < deltas:
        pieces.append("")
    return pieces


def choose_answer(
    input_items: Sequence[dict[str, Any]],
    account_id: str,
    context: Sequence[dict[str, Any]] = (),
) -> tuple[str, str]:
    """(kind, payload): ``("text", answer)``, ``("tool_call", cmd)`` or ``("compaction", "")``.
    ``mock:recap`` answers with every user message and answer of the conversation as the
    mock sees it (``context``, the anchor's chain, then the input), joined by `` | ``: what
    a test reads to know that upstream saw the whole conversation, once.

    (A scripted answer may also be ``("function_call", json.dumps({"name", "arguments"}))``,
    which no request chooses by itself.)"""
    last = input_items[-1] if input_items else {}
    kind = last.get("type")
    if kind == "compaction_trigger":
        return "compaction", ""
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = last.get("output", "")
        if not isinstance(output, str):
            output = json.dumps(output)
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        return "text", f"Tool output received: {lines[-1] if lines else '(empty)'}"
    matches = list(_DIRECTIVE.finditer(last_user_text(input_items)))
    match = matches[-1] if matches else None
    if match is not None:
        directive, arg = match.group(1), match.group(2).strip()
        if directive == "exec" and arg:
            return "tool_call", arg
        if directive == "say" and arg:
            return "text", arg
        if directive == "whoami":
            return "text", f"account {account_id}"
        if directive == "recap":
            return "text", recap([*context, *input_items])
    return "text", DEFAULT_ANSWER


@attrs.define(eq=False)
class _Events:
    """The events of one response as they are planned, numbered in order, and its output."""

    events: list[dict[str, Any]] = attrs.field(factory=list)
    output: list[dict[str, Any]] = attrs.field(factory=list)

    def emit(self, event: dict[str, Any]) -> None:
        event["sequence_number"] = len(self.events)
        self.events.append(event)

    def add_item(
        self, index: int, added: dict[str, Any], done: dict[str, Any], middle: list[dict[str, Any]]
    ) -> None:
        """An output item: its ``added`` event, the events that build it, its ``done``."""
        self.emit({"type": "response.output_item.added", "output_index": index, "item": added})
        for event in middle:
            self.emit(event)
        self.emit({"type": "response.output_item.done", "output_index": index, "item": done})
        self.output.append(done)


def plan_response(
    body: dict[str, Any],
    context: Sequence[dict[str, Any]],
    *,
    response_id: str,
    created_at: int,
    account_id: str,
    deltas: int = 0,
    delta_bytes: int = 0,
    answer: tuple[str, str] | None = None,
) -> TurnPlan:
    """Plan the events of one response. ``context`` is the chain before this request's input
    (empty without ``previous_response_id``); it counts as cached input tokens."""
    input_items = [i for i in body.get("input") or [] if isinstance(i, dict)]
    plan = _Events()

    def response(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        output = plan.output if status == "completed" else []
        return response_object(response_id, status, body, created_at, output, usage)

    if body.get("generate") is False:
        empty_usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        plan.emit({"type": "response.created", "response": response("in_progress", None)})
        plan.emit({"type": "response.completed", "response": response("completed", empty_usage)})
        return TurnPlan("prewarm", plan.events, [], empty_usage)

    kind, payload = answer or choose_answer(input_items, account_id, context)
    plan.emit({"type": "response.created", "response": response("in_progress", None)})
    plan.emit({"type": "response.in_progress", "response": response("in_progress", None)})
    reasoning_tokens = 0
    if kind == "compaction":
        text_len = _compaction(plan, account_id, len(context) + len(input_items))
    elif kind == "tool_call":
        arguments = json.dumps({"cmd": payload, "yield_time_ms": 1000})
        text_len = _tool_call(plan, "exec_command", arguments, deltas, account_id, response_id)
        reasoning_tokens = 16
    elif kind == "function_call":
        call = json.loads(payload)
        name, arguments = str(call["name"]), str(call["arguments"])
        text_len = _tool_call(plan, name, arguments, deltas, account_id, response_id)
        reasoning_tokens = 16
    else:
        text_len = _text(plan, payload, deltas, delta_bytes)
    usage = _usage(context, input_items, text_len, reasoning_tokens)
    plan.emit({"type": "response.completed", "response": response("completed", usage)})
    return TurnPlan(kind, plan.events, plan.output, usage)


def _compaction(plan: _Events, account_id: str, items: int) -> int:
    """One ``compaction`` item; returns the length of its blob."""
    item_id = new_id("cmp")
    blob = _opaque({"mock": "compaction", "account": account_id, "items": items})
    plan.add_item(
        0,
        {"id": item_id, "type": "compaction", "encrypted_content": None},
        {"id": item_id, "type": "compaction", "encrypted_content": blob},
        [],
    )
    return len(blob)


def function_call_payload(name: str, arguments: Any) -> str:
    """The payload of a scripted ``function_call`` answer: ``arguments`` is an object (sent
    as its JSON) or a JSON string sent as it is."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return json.dumps({"name": name, "arguments": text})


def _tool_call(
    plan: _Events, name: str, arguments: str, deltas: int, account_id: str, response_id: str
) -> int:
    """A reasoning item, then a ``function_call`` of ``name`` with ``arguments`` (a JSON
    string) in argument deltas; returns the length of the arguments."""
    rs_id, fc_id, call_id = new_id("rs"), new_id("fc"), new_id("call")
    blob = _opaque({"mock": "reasoning", "account": account_id, "response": response_id})
    plan.add_item(
        0,
        {"id": rs_id, "type": "reasoning", "summary": [], "encrypted_content": None},
        {"id": rs_id, "type": "reasoning", "summary": [], "encrypted_content": blob},
        [],
    )
    loc = {"item_id": fc_id, "output_index": 1}
    middle = [
        {"type": "response.function_call_arguments.delta", **loc, "delta": piece}
        for piece in _chunks(arguments, deltas)
    ]
    middle.append({"type": "response.function_call_arguments.done", **loc, "arguments": arguments})
    base = {"id": fc_id, "type": "function_call", "call_id": call_id, "name": name}
    plan.add_item(
        1,
        {**base, "status": "in_progress", "arguments": ""},
        {**base, "status": "completed", "arguments": arguments},
        middle,
    )
    return len(arguments)


def _text(plan: _Events, text: str, deltas: int, delta_bytes: int) -> int:
    """An assistant message of ``text`` in ``deltas`` deltas (padded to ``delta_bytes`` each
    if given); returns the length of the text."""
    if delta_bytes > 0:
        count = max(deltas, 1)
        text = (text + " " + "x" * (count * delta_bytes))[: count * delta_bytes]
    msg_id = new_id("msg")
    part_empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    part_full = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    loc = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    middle = [{"type": "response.content_part.added", **loc, "part": part_empty}]
    middle += [
        {"type": "response.output_text.delta", **loc, "delta": p, "logprobs": []}
        for p in _chunks(text, deltas)
    ]
    middle.append({"type": "response.output_text.done", **loc, "text": text, "logprobs": []})
    middle.append({"type": "response.content_part.done", **loc, "part": part_full})
    base = {"id": msg_id, "type": "message", "role": "assistant"}
    plan.add_item(
        0,
        {**base, "status": "in_progress", "content": []},
        {**base, "status": "completed", "content": [part_full]},
        middle,
    )
    return len(text)


def _usage(
    context: Sequence[dict[str, Any]],
    input_items: Sequence[dict[str, Any]],
    text_len: int,
    reasoning_tokens: int,
) -> dict[str, Any]:
    cached = estimate_tokens(context)
    input_tokens = cached + estimate_tokens(input_items)
    output_tokens = text_len // 4 + 1 + reasoning_tokens
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


def compact_output(body: dict[str, Any], account_id: str) -> dict[str, Any]:
    """The legacy unary ``/responses/compact`` answer: retained user messages + one compaction."""
    items = [i for i in body.get("input") or [] if isinstance(i, dict)]
    retained = [
        i for i in items if i.get("type", "message") == "message" and i.get("role") == "user"
    ]
    blob = _opaque({"mock": "compaction", "account": account_id, "items": len(items)})
    return {
        "output": [
            *retained,
            {"type": "compaction", "id": new_id("cmp"), "encrypted_content": blob},
        ]
    }
