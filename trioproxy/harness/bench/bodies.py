"""Request bodies shaped like the Codex CLI's (see its ``POST /responses`` and ``ws_recv``
captures under ``tests/captures/``): a developer message carrying the base instructions
(padded to ``input_bytes``), a user message, one function tool, ``store: false``; WebSocket
follow-ups carry only the new items and ``previous_response_id``. The mock answers
``mock:exec CMD`` with a tool call."""

from __future__ import annotations

import json
import uuid
from typing import Any

EXEC_TOOL = {
    "type": "function",
    "name": "exec_command",
    "description": "Runs a command in a PTY, returning output or a session ID.",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {"cmd": {"type": "string"}},
        "required": ["cmd"],
        "additionalProperties": False,
    },
}


def developer_message(input_bytes: int) -> dict[str, Any]:
    text = "You are Codex, a coding agent. " + "x" * max(0, input_bytes - 31)
    return {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": text}],
    }


def user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def tool_output(call_id: str, output: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def request(
    input_items: list[dict[str, Any]],
    *,
    thread: str | None,
    previous_response_id: str | None = None,
    generate: bool | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-5.5",
        "stream": True,
        "input": input_items,
        "tools": [EXEC_TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "text": {"verbosity": "low"},
    }
    if thread is not None:
        # a conversation key: the proxy keeps the conversation on one account and, over
        # HTTP, serves it through its bridge (a pooled upstream WebSocket)
        body["prompt_cache_key"] = thread
    if previous_response_id is not None:
        body["previous_response_id"] = previous_response_id
    if generate is not None:
        body["generate"] = generate
    return body


def new_thread() -> str:
    return str(uuid.uuid4())


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def function_call_id(terminal: dict[str, Any] | None) -> str | None:
    """The ``call_id`` of the function call in a ``response.completed`` event, if any."""
    if not terminal:
        return None
    response = terminal.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    for item in output or []:
        if isinstance(item, dict) and item.get("type") == "function_call":
            call_id = item.get("call_id")
            return str(call_id) if call_id else None
    return None
