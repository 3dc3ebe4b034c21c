"""Anthropic's Messages API in front of the Responses API the Codex backend speaks (sans-IO).

Three translations, each a plain function or a state machine fed plain values
(docs/anthropic-messages.md has the full mapping table):

- **Request.** :func:`messages_to_responses` turns a ``POST /v1/messages`` body into the
  Responses body upstream takes (``store: false``, ``stream: true``, encrypted reasoning
  included), or raises :class:`AnthropicError` (a 400 naming the field upstream cannot
  honour). What has no counterpart upstream and changes nothing the client can rely on is
  accepted, ignored and listed in :attr:`TranslatedMessages.ignored`.
- **Stream.** :class:`MessagesStream` is fed upstream's events in order and gives Anthropic's
  events as ``(event name, data)`` pairs. Upstream sends one output item after another;
  each item that carries something becomes one content block (a ``message``'s text, a
  ``reasoning`` item's summary, a ``function_call``), opened at its first content and closed
  at its ``response.output_item.done``, whose final text completes what the deltas did not
  carry. Blocks never overlap: a block still open when another item starts is closed first.
- **Answer.** :func:`message_from_response` builds the non-streamed ``message`` object from
  the final ``response`` (or the output items collected from the stream).

Reasoning round trip: upstream's ``encrypted_content`` travels as a ``thinking`` block's
``signature`` (with :data:`SIGNATURE_PREFIX` in front), so a client that sends the block back
gives upstream its reasoning item again. Signatures without the prefix (another provider's)
have no counterpart and are dropped.

Errors are Anthropic-shaped, ``{"type": "error", "error": {"type", "message"}}``:
:func:`anthropic_error` for a status, :func:`from_proxy_error` for the proxy's own answers,
:func:`stream_error` for a failure upstream reported inside a stream.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from trioproxy.protocol.errors import ProxyError, sanitize_message

#: Claude model names → upstream models; the first matching pattern wins. An exact name in
#: ``model_map`` wins over any pattern; a name no pattern matches is sent as it is.
DEFAULT_MODEL_MAP: dict[str, str] = {
    "claude-*haiku*": "gpt-5.5-mini",
    "claude-*": "gpt-5.5",
}
#: ``thinking.budget_tokens`` below each bound → that effort; at or above the last: ``high``
THINKING_EFFORT_THRESHOLDS: tuple[tuple[int, str], ...] = ((4096, "low"), (16384, "medium"))
#: the effort sent for ``thinking: {"type": "disabled"}``: the lowest every Codex model takes
DISABLED_EFFORT = "low"
#: ``output_config.effort`` → upstream effort
OUTPUT_EFFORT = {"low": "low", "medium": "medium", "high": "high", "max": "high"}
#: the ``thinking.display`` values served
THINKING_DISPLAYS = frozenset({"summarized", "omitted"})
#: what a signature this proxy gave starts with (the rest is upstream's encrypted reasoning)
SIGNATURE_PREFIX = "trioproxy-reasoning:"
#: accepted for compatibility; upstream does not take them (see docs/anthropic-messages.md)
IGNORED_PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "service_tier")
#: every top-level field the translation reads; others are accepted and listed as ignored
KNOWN_PARAMETERS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "metadata",
        "stream",
        "stop_sequences",
        "mcp_servers",
        "container",
        *IGNORED_PARAMETERS,
    }
)
#: the token estimate's rates
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 1600

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
#: the proxy's error codes whose Anthropic answer differs from what their status gives
_PROXY_CODES: dict[str, tuple[int, str]] = {
    "proxy_overloaded": (529, "overloaded_error"),
    "usage_limit_reached": (429, "rate_limit_error"),
    "key_budget_exceeded": (429, "rate_limit_error"),
}
#: upstream failure codes (``response.failed``, ``error``) → Anthropic error types
_UPSTREAM_CODES: dict[str, str] = {
    "context_length_exceeded": "invalid_request_error",
    "invalid_prompt": "invalid_request_error",
    "cyber_policy": "invalid_request_error",
    "rate_limit_exceeded": "rate_limit_error",
    "usage_limit_reached": "rate_limit_error",
    "usage_not_included": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "server_is_overloaded": "overloaded_error",
    "slow_down": "overloaded_error",
}
#: ``response.incomplete`` reasons → ``stop_reason``
_INCOMPLETE_STOP = {"max_output_tokens": "max_tokens", "content_filter": "refusal"}

Event = tuple[str, dict[str, Any]]


# -- errors ----------------------------------------------------------------------------------


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error(status: int, message: str, *, type: str | None = None) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``; the type follows the status
    unless given."""
    return {"type": "error", "error": {"type": type or error_type(status), "message": message}}


class AnthropicError(Exception):
    """A request the translation refuses (400 unless said otherwise), rendered with
    :attr:`body`."""

    def __init__(self, message: str, *, status: int = 400, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)

    @property
    def body(self) -> dict[str, Any]:
        return anthropic_error(self.status, self.message, type=self.type)


def from_proxy_error(error: ProxyError) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
    """The Anthropic answer (status, body, headers) for one of the proxy's own answers: its
    message kept, the status and type from its code (overload → 529, usage limits and key
    budgets → 429) or its status; its headers (``retry-after`` among them) kept."""
    inner = error.body.get("error")
    message = inner.get("message") if isinstance(inner, dict) else None
    status, type_ = _PROXY_CODES.get(error.code or "", (error.status, error_type(error.status)))
    text = message if isinstance(message, str) and message else f"HTTP {error.status}"
    return status, anthropic_error(status, sanitize_message(text), type=type_), list(error.headers)


def stream_error(failure: Mapping[str, Any]) -> dict[str, Any]:
    """The Anthropic ``error`` event's data for an upstream failure: a ``response.failed``
    or ``error`` event, or the ``error`` object of one."""
    error: Any = failure
    if failure.get("type") in ("response.failed", "error"):
        response = failure.get("response")
        error = failure.get("error") or (
            response.get("error") if isinstance(response, dict) else None
        )
    if not isinstance(error, Mapping):
        error = {}
    code = error.get("code") or error.get("type")
    message = error.get("message")
    text = message if isinstance(message, str) and message else "Upstream failed the response."
    type_ = _UPSTREAM_CODES.get(code, "api_error") if isinstance(code, str) else "api_error"
    return anthropic_error(500, sanitize_message(text), type=type_)


# -- the request -----------------------------------------------------------------------------


@attrs.frozen
class TranslatedMessages:
    """A Messages request as upstream gets it, and what answering it needs."""

    body: dict[str, Any]  # the Responses request body
    model: str  # the model the client named (the answers name it)
    stream: bool  # whether the client asked for a stream
    thinking: bool  # whether reasoning is shown to the client as thinking blocks
    thinking_text: bool = True  # whether they carry its summary (``display: "omitted"``: not)
    user_id: str | None = None  # ``metadata.user_id``
    ignored: tuple[str, ...] = ()  # parameters accepted and ignored


def upstream_model(model: str, model_map: Mapping[str, str] | None = None) -> str:
    """The upstream model for a requested one: an exact entry of ``model_map``, else the
    first pattern (``fnmatch``) of ``model_map`` then of :data:`DEFAULT_MODEL_MAP` that
    matches, else the name itself."""
    for table in (model_map or {}, DEFAULT_MODEL_MAP):
        if model in table:
            return table[model]
    for table in (model_map or {}, DEFAULT_MODEL_MAP):
        for pattern, target in table.items():
            if fnmatch.fnmatchcase(model, pattern):
                return target
    return model


def thinking_effort(budget_tokens: int) -> str:
    """The reasoning effort for a thinking budget (:data:`THINKING_EFFORT_THRESHOLDS`)."""
    for bound, effort in THINKING_EFFORT_THRESHOLDS:
        if budget_tokens < bound:
            return effort
    return "high"


def messages_to_responses(
    body: Mapping[str, Any],
    *,
    model_map: Mapping[str, str] | None = None,
    require_max_tokens: bool = True,
) -> TranslatedMessages:
    """The Responses request for a Messages request body, or :class:`AnthropicError`.

    ``require_max_tokens=False`` is for ``count_tokens``, whose body has no ``max_tokens``."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise AnthropicError("model: a model name is required.")
    ignored: list[str] = []
    max_tokens = body.get("max_tokens")
    if max_tokens is not None or require_max_tokens:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise AnthropicError("max_tokens: a positive integer is required.")
        ignored.append("max_tokens")
    for name in ("temperature", "top_p", "top_k"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AnthropicError(f"{name}: a number is required.")
        ignored.append(name)
    if body.get("service_tier") is not None:
        ignored.append("service_tier")
    ignored += sorted(key for key in body if key not in KNOWN_PARAMETERS)
    stops = body.get("stop_sequences")
    if stops:
        raise AnthropicError(
            "stop_sequences: not supported by this server (the upstream model cannot stop "
            "on custom sequences); send the request without stop_sequences."
        )
    for name in ("mcp_servers", "container"):
        if body.get(name):
            raise AnthropicError(f"{name}: not supported by this server.")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise AnthropicError("stream: a boolean is required.")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise AnthropicError("metadata: an object is required.")
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise AnthropicError("metadata.user_id: a string is required.")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise AnthropicError("messages: at least one message is required.")
    effort, thinking, thinking_text = _reasoning(body.get("thinking"), body.get("output_config"))

    out: dict[str, Any] = {"model": upstream_model(model, model_map)}
    instructions = _system_text(body.get("system"))
    if instructions:
        out["instructions"] = instructions
    out["input"] = [item for i, m in enumerate(messages) for item in _message_items(i, m)]
    tools = _tools(body.get("tools"))
    out["tools"] = tools
    choice, parallel = _tool_choice(body.get("tool_choice"))
    out["tool_choice"] = choice
    out["parallel_tool_calls"] = parallel
    if effort is not None or thinking:
        reasoning: dict[str, Any] = {}
        if effort is not None:
            reasoning["effort"] = effort
        if thinking and thinking_text:
            reasoning["summary"] = "auto"
        out["reasoning"] = reasoning
    out["store"] = False
    out["stream"] = True
    out["include"] = ["reasoning.encrypted_content"]
    if user_id:
        digest = hashlib.sha256(user_id.encode()).hexdigest()[:32]
        out["prompt_cache_key"] = f"anthropic-{digest}"
    text_format = _text_format(body.get("output_config"))
    if text_format is not None:
        out["text"] = {"format": text_format}
    return TranslatedMessages(
        body=out,
        model=model,
        stream=stream,
        thinking=thinking,
        thinking_text=thinking_text,
        user_id=user_id,
        ignored=tuple(ignored),
    )


def _reasoning(thinking: Any, output_config: Any) -> tuple[str | None, bool, bool]:
    """(upstream effort or None for upstream's default, whether thinking is shown, whether
    its blocks carry text)."""
    effort: str | None = None
    shown = False
    text = thinking_display(thinking) != "omitted"
    if thinking is not None:
        if not isinstance(thinking, Mapping):
            raise AnthropicError("thinking: an object is required.")
        kind = thinking.get("type")
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise AnthropicError("thinking.budget_tokens: a positive integer is required.")
            effort, shown = thinking_effort(budget), True
        elif kind == "adaptive":
            shown = True
        elif kind == "disabled":
            effort = DISABLED_EFFORT
        else:
            raise AnthropicError(
                f"thinking.type: {kind!r} is not one of 'enabled', 'adaptive', 'disabled'."
            )
    if isinstance(output_config, Mapping) and output_config.get("effort") is not None:
        asked = output_config.get("effort")
        if asked not in OUTPUT_EFFORT:
            raise AnthropicError(f"output_config.effort: {asked!r} is not a known effort.")
        effort = OUTPUT_EFFORT[asked]
    return effort, shown, text


def thinking_display(thinking: Any) -> str:
    """``thinking.display``: ``summarized`` (the default: thinking blocks carry the reasoning
    summary) or ``omitted`` (empty thinking text, the signature only)."""
    display = thinking.get("display") if isinstance(thinking, Mapping) else None
    if display is None:
        return "summarized"
    if display not in THINKING_DISPLAYS:
        raise AnthropicError(
            f"thinking.display: {display!r} is not one of 'summarized', 'omitted'."
        )
    return str(display)


def _text_format(output_config: Any) -> dict[str, Any] | None:
    if not isinstance(output_config, Mapping):
        return None
    fmt = output_config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
        raise AnthropicError("output_config.format: only type 'json_schema' is supported.")
    schema = fmt.get("schema")
    if not isinstance(schema, Mapping):
        raise AnthropicError("output_config.format.schema: an object is required.")
    return {"type": "json_schema", "name": "output", "schema": dict(schema), "strict": True}


def _system_text(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if not isinstance(system, list):
        raise AnthropicError("system: a string or a list of text blocks is required.")
    texts = []
    for i, block in enumerate(system):
        if not isinstance(block, Mapping) or block.get("type") != "text":
            raise AnthropicError(f"system.{i}: only text blocks are supported.")
        texts.append(_text(block, f"system.{i}"))
    return "\n\n".join(texts)


def _text(block: Mapping[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise AnthropicError(f"{where}.text: a string is required.")
    return text


def _blocks(content: Any, where: str) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, Mapping) for b in content):
        raise AnthropicError(f"{where}: a string or a list of content blocks is required.")
    return content


def _message_items(index: int, message: Any) -> list[dict[str, Any]]:
    """One message's input items, in its blocks' order: runs of text, image and document
    blocks become one message item; a ``tool_use`` a ``function_call``, a ``tool_result`` a
    ``function_call_output``, a ``thinking`` block carrying this proxy's signature a
    ``reasoning`` item. A ``system`` message (a mid-conversation system turn, which Claude
    Code sends) becomes a ``developer`` message item in its place, its text blocks as
    ``input_text``."""
    where = f"messages.{index}"
    if not isinstance(message, Mapping):
        raise AnthropicError(f"{where}: an object is required.")
    role = message.get("role")
    if role == "system":
        return [_developer_message(message.get("content"), where)]
    if role not in ("user", "assistant"):
        raise AnthropicError(f"{where}.role: must be 'user', 'assistant' or 'system'.")
    items: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []

    def flush() -> None:
        if parts:
            items.append({"type": "message", "role": role, "content": list(parts)})
            parts.clear()

    for j, block in enumerate(_blocks(message.get("content"), f"{where}.content")):
        at = f"{where}.content.{j}"
        kind = block.get("type")
        if kind == "text":
            text_type = "output_text" if role == "assistant" else "input_text"
            parts.append({"type": text_type, "text": _text(block, at)})
        elif kind in ("image", "document") and role == "user":
            parts.append(_media_part(kind, block, at))
        elif kind == "tool_use" and role == "assistant":
            flush()
            items.append(_function_call(block, at))
        elif kind == "tool_result" and role == "user":
            flush()
            items.append(_function_call_output(block, at))
        elif kind == "thinking" and role == "assistant":
            reasoning = _reasoning_item(block, at)
            if reasoning is not None:
                flush()
                items.append(reasoning)
        elif kind == "redacted_thinking" and role == "assistant":
            continue  # another provider's encrypted reasoning: nothing upstream can read
        else:
            raise AnthropicError(
                f"{at}: content block type {kind!r} is not supported in a {role} message."
            )
    flush()
    return items


def _developer_message(content: Any, where: str) -> dict[str, Any]:
    parts = []
    for j, block in enumerate(_blocks(content, f"{where}.content")):
        if block.get("type") != "text":
            raise AnthropicError(
                f"{where}.content.{j}: content block type {block.get('type')!r} is not "
                "supported in a system message (only text)."
            )
        parts.append({"type": "input_text", "text": _text(block, f"{where}.content.{j}")})
    return {"type": "message", "role": "developer", "content": parts}


def _media_part(kind: str, block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise AnthropicError(f"{where}.source: an object is required.")
    source_type = source.get("type")
    if kind == "image":
        if source_type == "base64":
            media, data = source.get("media_type"), source.get("data")
            if not isinstance(media, str) or not isinstance(data, str):
                raise AnthropicError(f"{where}.source: media_type and data are required.")
            return {"type": "input_image", "image_url": f"data:{media};base64,{data}"}
        if source_type == "url" and isinstance(source.get("url"), str):
            return {"type": "input_image", "image_url": source["url"]}
        raise AnthropicError(
            f"{where}: image source type {source_type!r} is not supported (use base64 or url)."
        )
    title = block.get("title")
    filename = title if isinstance(title, str) and title else "document.pdf"
    if source_type == "base64" and source.get("media_type") == "application/pdf":
        data = source.get("data")
        if not isinstance(data, str):
            raise AnthropicError(f"{where}.source.data: a string is required.")
        return {
            "type": "input_file",
            "filename": filename,
            "file_data": f"data:application/pdf;base64,{data}",
        }
    if source_type == "url" and isinstance(source.get("url"), str):
        return {"type": "input_file", "file_url": source["url"]}
    if source_type == "text" and isinstance(source.get("data"), str):
        return {"type": "input_text", "text": source["data"]}
    raise AnthropicError(
        f"{where}: document source {source_type!r} is not supported "
        "(use a base64 PDF, a PDF url or plain text)."
    )


def _function_call(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id, name = block.get("id"), block.get("name")
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
        raise AnthropicError(f"{where}: tool_use needs an id and a name.")
    arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


#: what a ``tool_result`` with ``is_error: true`` starts with upstream (it has no such flag)
TOOL_ERROR_PREFIX = "Tool error: "


def _function_call_output(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise AnthropicError(f"{where}.tool_use_id: a string is required.")
    content = block.get("content")
    parts: list[dict[str, Any]] = []
    if content is not None:
        for k, part in enumerate(_blocks(content, f"{where}.content")):
            at = f"{where}.content.{k}"
            if part.get("type") == "text":
                parts.append({"type": "input_text", "text": _text(part, at)})
            elif part.get("type") in ("image", "document"):
                parts.append(_media_part(str(part.get("type")), part, at))
            else:
                raise AnthropicError(f"{at}: {part.get('type')!r} is not supported here.")
    prefix = TOOL_ERROR_PREFIX if block.get("is_error") is True else ""
    output: str | list[dict[str, Any]]
    if all(p["type"] == "input_text" for p in parts):
        output = prefix + "\n".join(p["text"] for p in parts)
    else:
        output = ([{"type": "input_text", "text": prefix}] if prefix else []) + parts
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def _reasoning_item(block: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    signature = block.get("signature")
    if not isinstance(signature, str) or not signature.startswith(SIGNATURE_PREFIX):
        return None
    thinking = block.get("thinking")
    summary = [{"type": "summary_text", "text": thinking}] if isinstance(thinking, str) else []
    return {
        "type": "reasoning",
        "summary": [s for s in summary if s["text"]],
        "encrypted_content": signature[len(SIGNATURE_PREFIX) :],
    }


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise AnthropicError("tools: a list is required.")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise AnthropicError(f"tools.{i}: an object is required.")
        if tool.get("type", "custom") not in ("custom", None):
            raise AnthropicError(
                f"tools.{i}: tool type {tool.get('type')!r} is not supported by this server "
                "(only custom tools with an input_schema)."
            )
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise AnthropicError(f"tools.{i}.name: a string is required.")
        if not isinstance(schema, Mapping):
            raise AnthropicError(f"tools.{i}.input_schema: an object is required.")
        description = tool.get("description")
        out.append(
            {
                "type": "function",
                "name": name,
                "description": description if isinstance(description, str) else "",
                "strict": tool.get("strict") is True,
                "parameters": dict(schema),
            }
        )
    return out


def _tool_choice(choice: Any) -> tuple[str | dict[str, Any], bool]:
    """(upstream ``tool_choice``, ``parallel_tool_calls``)."""
    if choice is None:
        return "auto", True
    if not isinstance(choice, Mapping):
        raise AnthropicError("tool_choice: an object is required.")
    parallel = choice.get("disable_parallel_tool_use") is not True
    kind = choice.get("type")
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise AnthropicError("tool_choice.name: a string is required.")
        return {"type": "function", "name": name}, parallel
    raise AnthropicError(f"tool_choice.type: {kind!r} is not one of auto, any, tool, none.")


def count_tokens_estimate(
    body: Mapping[str, Any], *, model_map: Mapping[str, str] | None = None
) -> int:
    """An estimate of a request's input tokens (``/v1/messages/count_tokens``): the
    characters of the translated instructions, input texts, tool calls and tools over
    :data:`CHARS_PER_TOKEN`, plus :data:`IMAGE_TOKENS` per image. Not upstream's tokenizer:
    an estimate, within tens of percent for text."""
    translated = messages_to_responses(body, model_map=model_map, require_max_tokens=False)
    return estimate_tokens(translated.body)


def estimate_tokens(request: Mapping[str, Any]) -> int:
    """:func:`count_tokens_estimate` of a request already translated (its Responses body)."""
    chars = len(request.get("instructions") or "")
    tools = request.get("tools")
    chars += len(json.dumps(tools, ensure_ascii=False)) if tools else 0
    images = 0

    def parts(values: Sequence[Any]) -> None:
        nonlocal chars, images
        for part in values:
            if part.get("type") in ("input_text", "output_text", "summary_text"):
                chars += len(part["text"])
            elif part.get("type") == "input_image":
                images += 1
            elif part.get("type") == "input_file":
                chars += len(part.get("file_data") or part.get("file_url") or "")

    for item in request.get("input") or ():
        kind = item.get("type")
        if kind == "message":
            parts(item["content"])
        elif kind == "function_call":
            chars += len(item["name"]) + len(item["arguments"])
        elif kind == "function_call_output":
            output = item["output"]
            if isinstance(output, str):
                chars += len(output)
            else:
                parts(output)
        elif kind == "reasoning":
            parts(item["summary"])
    return max(1, math.ceil(chars / CHARS_PER_TOKEN) + images * IMAGE_TOKENS)


# -- the answer ------------------------------------------------------------------------------


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def anthropic_usage(usage: Any) -> dict[str, int]:
    """Upstream's ``usage`` in Anthropic's terms: ``input_tokens`` without the cached ones,
    which are ``cache_read_input_tokens``."""
    usage = usage if isinstance(usage, Mapping) else {}
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    cached = cached if isinstance(cached, int) else 0
    total = usage.get("input_tokens")
    output = usage.get("output_tokens")
    return {
        "input_tokens": max(0, (total if isinstance(total, int) else 0) - cached),
        "output_tokens": output if isinstance(output, int) else 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _item_text(item: Mapping[str, Any]) -> str:
    content = item.get("content")
    texts = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, Mapping) and part.get("type") in ("output_text", "refusal"):
            text = part.get("text", part.get("refusal"))
            texts.append(text if isinstance(text, str) else "")
    return "".join(texts)


def _summary_text(item: Mapping[str, Any]) -> str:
    summary = item.get("summary")
    texts = [
        s["text"]
        for s in (summary if isinstance(summary, list) else [])
        if isinstance(s, Mapping) and isinstance(s.get("text"), str) and s["text"]
    ]
    return "\n\n".join(texts)


def _arguments(item: Mapping[str, Any]) -> str:
    arguments = item.get("arguments")
    return arguments if isinstance(arguments, str) else ""


def _signature(item: Mapping[str, Any]) -> str:
    encrypted = item.get("encrypted_content")
    return SIGNATURE_PREFIX + encrypted if isinstance(encrypted, str) and encrypted else ""


def _no_text(item: Mapping[str, Any]) -> str:
    return ""


def _stop_reason(response: Mapping[str, Any], used_tools: bool) -> str:
    if response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, Mapping) else None
        return _INCOMPLETE_STOP.get(reason, "end_turn") if isinstance(reason, str) else "end_turn"
    return "tool_use" if used_tools else "end_turn"


def message_from_response(
    response: Mapping[str, Any],
    *,
    model: str,
    thinking: bool,
    items: Sequence[Any] | None = None,
    message_id: str | None = None,
    thinking_text: bool = True,
) -> dict[str, Any]:
    """The non-streamed Messages answer for upstream's final ``response`` (of
    ``response.completed`` or ``response.incomplete``). ``items``, the output items collected
    from ``response.output_item.done`` events, are used when the response lists none.
    Without ``thinking_text`` (``display: "omitted"``) thinking blocks carry only their
    signature."""
    output = response.get("output")
    if not output and items:
        output = list(items)
    content: list[dict[str, Any]] = []
    for item in output if isinstance(output, list) else []:
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind == "message":
            text = _item_text(item)
            if text:
                content.append({"type": "text", "text": text})
        elif kind == "reasoning" and thinking:
            text = _summary_text(item) if thinking_text else ""
            signature = _signature(item)
            if text or signature:
                content.append({"type": "thinking", "thinking": text, "signature": signature})
        elif kind == "function_call":
            content.append(_tool_use_block(item, parse=True))
    used_tools = any(block["type"] == "tool_use" for block in content)
    return {
        "id": message_id or new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(response, used_tools),
        "stop_sequence": None,
        "usage": anthropic_usage(response.get("usage")),
    }


def _tool_use_block(item: Mapping[str, Any], *, parse: bool) -> dict[str, Any]:
    call_id = item.get("call_id") or item.get("id") or ""
    value: Any = {}
    arguments = item.get("arguments")
    if parse and isinstance(arguments, str) and arguments.strip():
        try:
            value = json.loads(arguments)
        except ValueError:
            value = {"_raw_arguments": arguments}  # what the model wrote, kept visible
    return {"type": "tool_use", "id": call_id, "name": item.get("name") or "", "input": value}


# -- the stream ------------------------------------------------------------------------------


def ping() -> Event:
    """A keep-alive event."""
    return "ping", {"type": "ping"}


@attrs.define(eq=False)
class _Block:
    index: int
    kind: str  # "text", "thinking" or "tool_use"
    sent: str = ""  # the text, thinking or arguments sent so far
    part: int = 0  # reasoning: the summary part being sent (parts are joined by a blank line)


@attrs.define(eq=False)
class MessagesStream:
    """Upstream's events in, Anthropic's events out (see the module docstring).

    :meth:`feed` takes each upstream event in order; :meth:`end` is called when upstream's
    stream ended (or was cut) and gives an ``error`` event if no terminal event came. After
    a terminal event (``message_stop`` or ``error``) :attr:`done` is true and nothing more is
    given."""

    model: str
    thinking: bool = False
    thinking_text: bool = True  # (``display: "omitted"``: thinking blocks carry no text)
    message_id: str = attrs.field(factory=new_message_id)
    input_tokens: int = 0  # for ``message_start`` (upstream reports usage only at the end)
    done: bool = False
    started: bool = False
    _next_index: int = 0
    _open: tuple[int, _Block] | None = None  # (output_index, block)
    _closed: set[int] = attrs.field(factory=set)  # output indexes whose block is closed
    _used_tools: bool = False

    def start(self) -> list[Event]:
        """``message_start`` (once)."""
        if self.started:
            return []
        self.started = True
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def feed(self, event: Mapping[str, Any]) -> list[Event]:
        if self.done:
            return []
        out = self.start()
        kind = event.get("type")
        index = event.get("output_index")
        if kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, Mapping) and item.get("type") == "function_call":
                out += self._open_block(index, "tool_use", _tool_use_block(item, parse=False))
        elif kind == "response.output_text.delta":
            out += self._delta(index, "text", event.get("delta"))
        elif kind == "response.reasoning_summary_text.delta":
            out += self._summary_delta(index, event.get("summary_index"), event.get("delta"))
        elif kind == "response.function_call_arguments.delta":
            out += self._delta(index, "tool_use", event.get("delta"))
        elif kind == "response.output_item.done":
            out += self._item_done(index, event.get("item"))
        elif kind in ("response.completed", "response.incomplete"):
            response = event.get("response")
            out += self._finish(response if isinstance(response, Mapping) else {})
        elif kind in ("response.failed", "error"):
            out += self.fail(stream_error(event))
        return out

    def end(self, reason: str | None = None) -> list[Event]:
        """Upstream's stream is over; an ``error`` event if it ended before a terminal one."""
        if self.done:
            return []
        why = "Upstream ended the stream before the response was complete"
        text = f"{why} ({reason})." if reason else f"{why}."
        return self.fail(anthropic_error(500, text, type="api_error"))

    def fail(self, error: dict[str, Any]) -> list[Event]:
        """End the stream with an ``error`` event (``anthropic_error`` shape)."""
        if self.done:
            return []
        self.done = True
        return [*self.start(), ("error", error)]

    # the blocks

    def _open_block(self, index: Any, kind: str, content_block: dict[str, Any]) -> list[Event]:
        out = self._close()
        block = _Block(self._next_index, kind)
        self._next_index += 1
        self._open = (index, block)
        if kind == "tool_use":
            self._used_tools = True
        start = {
            "type": "content_block_start",
            "index": block.index,
            "content_block": content_block,
        }
        out.append(("content_block_start", start))
        return out

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index, block = self._open
        self._open = None
        self._closed.add(index)
        return [("content_block_stop", {"type": "content_block_stop", "index": block.index})]

    def _block_for(self, index: Any, kind: str) -> tuple[list[Event], _Block | None]:
        """The open block of output ``index`` (opened now if need be), or None when that
        item's block was closed already or is not shown."""
        if kind == "thinking" and not self.thinking:
            return [], None
        if self._open is not None and self._open[0] == index and self._open[1].kind == kind:
            return [], self._open[1]
        if index in self._closed or kind == "tool_use":
            return [], None  # a tool_use block opens only at its item's start
        initial = {"type": "text", "text": ""}
        if kind == "thinking":
            initial = {"type": "thinking", "thinking": "", "signature": ""}
        out = self._open_block(index, kind, initial)
        assert self._open is not None
        return out, self._open[1]

    def _delta(self, index: Any, kind: str, text: Any, block: _Block | None = None) -> list[Event]:
        if not isinstance(text, str) or not text:
            return []
        out: list[Event] = []
        if block is None:
            out, block = self._block_for(index, kind)
            if block is None:
                return out
        block.sent += text
        if kind == "text":
            delta = {"type": "text_delta", "text": text}
        elif kind == "thinking":
            delta = {"type": "thinking_delta", "thinking": text}
        else:
            delta = {"type": "input_json_delta", "partial_json": text}
        data = {"type": "content_block_delta", "index": block.index, "delta": delta}
        out.append(("content_block_delta", data))
        return out

    def _summary_delta(self, index: Any, part: Any, text: Any) -> list[Event]:
        """A reasoning summary's text; its parts are joined by a blank line, as in
        :func:`message_from_response`."""
        if not isinstance(text, str) or not text or not self.thinking_text:
            return []
        out, block = self._block_for(index, "thinking")
        if block is None:
            return out
        part = part if isinstance(part, int) else block.part
        if part > block.part and block.sent:
            out += self._delta(index, "thinking", "\n\n", block)
        block.part = max(part, block.part)
        return out + self._delta(index, "thinking", text, block)

    def _item_done(self, index: Any, item: Any) -> list[Event]:
        """Complete the item's block from its final form (what no delta carried), then close
        it; a ``reasoning`` item's encrypted content becomes the block's signature."""
        if not isinstance(item, Mapping) or index in self._closed:
            return []
        kind = {"message": "text", "reasoning": "thinking", "function_call": "tool_use"}.get(
            str(item.get("type"))
        )
        if kind is None:
            return []
        final = {
            "text": _item_text,
            "thinking": _summary_text if self.thinking_text else _no_text,
            "tool_use": _arguments,
        }[kind](item)
        out: list[Event] = []
        signature = _signature(item) if kind == "thinking" else ""
        if self._open is None or self._open[0] != index:
            if kind == "tool_use":  # its start was not seen: the whole call now
                out = self._open_block(index, kind, _tool_use_block(item, parse=False))
            elif final or signature:
                out, _ = self._block_for(index, kind)
        if self._open is None or self._open[0] != index:
            return out
        block = self._open[1]
        if final.startswith(block.sent):
            out += self._delta(index, kind, final[len(block.sent) :], block)
        if signature:
            delta = {"type": "signature_delta", "signature": signature}
            out.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": block.index, "delta": delta},
                )
            )
        return out + self._close()

    def _finish(self, response: Mapping[str, Any]) -> list[Event]:
        out = self._close()
        self.done = True
        usage = anthropic_usage(response.get("usage"))
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": _stop_reason(response, self._used_tools),
                "stop_sequence": None,
            },
            "usage": usage,
        }
        return [*out, ("message_delta", delta), ("message_stop", {"type": "message_stop"})]
