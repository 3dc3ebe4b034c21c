"""OpenAI Chat Completions in front of the Codex backend's Responses API (sans-IO).

Three pure pieces that a ``POST /v1/chat/completions`` front calls around the conversation
core (docs/chat-completions.md has the user-facing table):

- :func:`chat_to_responses` checks a Chat Completions request body and translates it into
  the Responses request the Codex backend takes (``store: false``, ``stream: true``,
  ``include: ["reasoning.encrypted_content"]``, tools flattened to ``name``/``parameters``/
  ``strict``, ``response_format`` as ``text.format``). A parameter upstream cannot honour is
  a 400 :class:`ProxyError` naming it; one that does not change the answer is accepted and
  not sent (:data:`IGNORED`); one upstream's reasoning models accept only at its default is
  accepted at that default (:data:`DEFAULT_ONLY`) and refused otherwise.
- :class:`ChatStream` is fed upstream's events, in order, and gives the
  ``chat.completion.chunk`` objects to send, each as one ``data:`` line.
- :func:`chat_completion` builds the non-streamed ``chat.completion`` from the final
  ``response`` object; :func:`chat_answer` does it from an :class:`Aggregation`.

Errors keep the proxy's one envelope, which is already the Chat Completions shape
(``{"error": {"message", "type", "param", "code"}}``): :func:`chat_error`.

Reasoning summaries (upstream's ``response.reasoning_summary_text.delta``) are shown as
``reasoning_content``, on the delta and on the message: the field DeepSeek's API defined and
that LiteLLM, LangChain's OpenAI client and most OpenAI-compatible servers read.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from trioproxy.protocol.aggregate import Aggregation
from trioproxy.protocol.errors import ProxyError, error_envelope, upstream_envelope

#: what upstream gets as ``instructions`` when the request has no system or developer
#: message at its start: the Codex backend refuses a request without instructions
DEFAULT_INSTRUCTIONS = "You are a helpful assistant."

REASONING_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})
VERBOSITIES = frozenset({"low", "medium", "high"})
IMAGE_DETAILS = frozenset({"auto", "low", "high"})

#: Chat fields translated into the Responses request
TRANSLATED = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "reasoning_effort",
        "verbosity",
        "prompt_cache_key",
        "stream",
        "stream_options",
    }
)
#: accepted and not sent upstream (the Codex backend refuses ``max_output_tokens``; the rest
#: it has no counterpart for): why, for the documentation and the refusal messages
IGNORED: Mapping[str, str] = {
    "max_tokens": "upstream refuses an output token limit; the model's own limit applies",
    "max_completion_tokens": "upstream refuses an output token limit; the model's own limit applies",
    "user": "an end-user id for abuse monitoring; upstream has no such field",
    "safety_identifier": "an end-user id for abuse monitoring; upstream has no such field",
    "metadata": "stored completions only; upstream stores nothing",
    "store": "nothing is stored upstream (store: false)",
    "service_tier": "upstream picks the tier of the account's plan",
    "seed": "best-effort determinism only; upstream has no seed",
}
#: accepted only at their default value: upstream's reasoning models take no other
DEFAULT_ONLY: Mapping[str, Any] = {
    "n": 1,
    "temperature": 1,
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "top_logprobs": 0,
    "logit_bias": {},
}
#: refused whenever given (not null): why
UNSUPPORTED: Mapping[str, str] = {
    "stop": "upstream cannot honour stop sequences",
    "audio": "audio output is not available upstream",
    "modalities": "only text output is available upstream",
    "prediction": "predicted outputs are not available upstream",
    "web_search_options": "web search is not available through Chat Completions here",
    "functions": "use 'tools' (the deprecated 'functions' is not supported)",
    "function_call": "use 'tool_choice' (the deprecated 'function_call' is not supported)",
}


def _bad(message: str, param: str, code: str = "invalid_value") -> ProxyError:
    return ProxyError.of(400, message, code, param=param)


def _unsupported(param: str, why: str) -> ProxyError:
    return _bad(f"Unsupported parameter: '{param}': {why}.", param, "unsupported_parameter")


@attrs.frozen
class TranslatedChat:
    """A Chat Completions request as the Responses request that serves it."""

    body: dict[str, Any]  # the Responses request body for upstream
    model: str  # the model the client named (shown back in every chunk)
    stream: bool  # whether the client asked for a stream
    include_usage: bool  # ``stream_options.include_usage``
    ignored: tuple[str, ...]  # accepted parameters not sent upstream (for the request log)

    def stream_translator(self, created: int, completion_id: str | None = None) -> ChatStream:
        """The :class:`ChatStream` for this request's answer."""
        return ChatStream(
            model=self.model,
            created=created,
            include_usage=self.include_usage,
            id=completion_id or new_completion_id(),
        )


def new_completion_id() -> str:
    """A fresh ``chatcmpl-...`` id (upstream's response id is never shown to clients)."""
    return f"chatcmpl-{uuid.uuid4().hex}"


# --- the request ---------------------------------------------------------------------------


def chat_to_responses(
    body: Mapping[str, Any],
    *,
    model_aliases: Mapping[str, str] | None = None,
    default_instructions: str = DEFAULT_INSTRUCTIONS,
    reasoning_summary: str | None = "auto",
) -> TranslatedChat:
    """The Responses request for a Chat Completions request body, or a 400
    :class:`ProxyError` naming the parameter that cannot be served.

    ``model_aliases`` maps a model name clients use to the one upstream gets.
    ``reasoning_summary`` is asked for as ``reasoning.summary`` (None: not asked; then no
    ``reasoning_content`` comes back)."""
    if not isinstance(body, Mapping):
        raise ProxyError.of(400, "The request body must be a JSON object.", "invalid_body")
    ignored: list[str] = []
    for key, value in body.items():
        if key in TRANSLATED:
            continue
        if key in IGNORED:
            _check_ignored(key, value)
            if value is not None:
                ignored.append(key)
        elif key in DEFAULT_ONLY:
            _check_default(key, value, body)
        elif key in UNSUPPORTED:
            if value is not None and not (key == "stop" and value in ("", [])):
                if key == "modalities" and value == ["text"]:
                    continue
                raise _unsupported(key, UNSUPPORTED[key])
        else:
            raise _bad(
                f"Unrecognized request argument supplied: '{key}'.", key, "unknown_parameter"
            )

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string.", "model", "missing_required_parameter")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean.", "stream", "invalid_type")
    include_usage = _include_usage(body.get("stream_options"))

    instructions, items = _messages(body.get("messages"))
    out: dict[str, Any] = {
        "model": (model_aliases or {}).get(model, model),
        "instructions": instructions or default_instructions,
        "input": items,
    }
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    if tool_choice is not None:
        out["tool_choice"] = tool_choice
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad(
            "'parallel_tool_calls' must be a boolean.", "parallel_tool_calls", "invalid_type"
        )
    out["parallel_tool_calls"] = True if parallel is None else parallel
    reasoning: dict[str, Any] = {}
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise _bad(
                f"'reasoning_effort' must be one of {sorted(REASONING_EFFORTS)}.",
                "reasoning_effort",
            )
        reasoning["effort"] = effort
    if reasoning_summary is not None:
        reasoning["summary"] = reasoning_summary
    if reasoning:
        out["reasoning"] = reasoning
    out["store"] = False
    out["stream"] = True
    out["include"] = ["reasoning.encrypted_content"]
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None:
        if not isinstance(cache_key, str):
            raise _bad("'prompt_cache_key' must be a string.", "prompt_cache_key", "invalid_type")
        out["prompt_cache_key"] = cache_key
    text = _text(body.get("response_format"), body.get("verbosity"))
    if text:
        out["text"] = text
    return TranslatedChat(
        body=out,
        model=model,
        stream=bool(stream),
        include_usage=include_usage,
        ignored=tuple(ignored),
    )


def _check_ignored(key: str, value: Any) -> None:
    if value is None:
        return
    if key in ("max_tokens", "max_completion_tokens", "seed"):
        if not isinstance(value, int) or isinstance(value, bool) or (key != "seed" and value < 1):
            raise _bad(f"'{key}' must be a positive integer.", key, "invalid_type")
    elif key in ("user", "safety_identifier", "service_tier") and not isinstance(value, str):
        raise _bad(f"'{key}' must be a string.", key, "invalid_type")
    elif key == "metadata" and not isinstance(value, dict):
        raise _bad("'metadata' must be an object.", key, "invalid_type")
    elif key == "store" and not isinstance(value, bool):
        raise _bad("'store' must be a boolean.", key, "invalid_type")


def _check_default(key: str, value: Any, body: Mapping[str, Any]) -> None:
    default = DEFAULT_ONLY[key]
    if value is None or value is default or (value == default and not isinstance(value, bool)):
        return
    if key == "n":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _bad("'n' must be a positive integer.", "n", "invalid_type")
        raise _bad("Only one choice (n = 1) is supported upstream.", "n", "unsupported_value")
    numeric = key in ("temperature", "top_p", "presence_penalty", "frequency_penalty")
    if numeric and not _is_number(value):
        raise _bad(f"'{key}' must be a number.", key, "invalid_type")
    raise _bad(
        f"Unsupported value: '{key}' does not support {json.dumps(value)} with upstream's "
        f"reasoning models. Only the default ({json.dumps(default)}) value is supported.",
        key,
        "unsupported_value",
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _include_usage(options: Any) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise _bad(
            "'stream_options.include_usage' must be a boolean.",
            "stream_options.include_usage",
            "invalid_type",
        )
    return value


def _text_of(content: Any, param: str, kinds: frozenset[str] = frozenset({"text"})) -> str:
    """A message's text: a string, or the concatenation of its text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"'{param}' must be a string or a list of content parts.", param, "invalid_type")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise _bad(
                f"'{param}[{i}]' must be a text part ({{'type': 'text', 'text': ...}}).",
                f"{param}[{i}]",
                "invalid_type",
            )
        texts.append(part["text"])
    return "".join(texts)


def _user_content(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"'{param}' must be a string or a list of content parts.", param, "invalid_type")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "input_text", "text": part["text"]})
        elif kind == "image_url":
            parts.append(_image(part.get("image_url"), where))
        elif kind == "file":
            parts.append(_file(part.get("file"), where))
        elif kind == "input_audio":
            raise _unsupported(where, "audio input is not available upstream")
        else:
            raise _bad(f"'{where}' is not a valid content part.", where, "invalid_type")
    return parts


def _image(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url.startswith(("https://", "http://", "data:image/")):
        raise _bad(
            f"'{where}.image_url.url' must be an http(s) URL or a data:image/ URL.",
            f"{where}.image_url.url",
        )
    detail = image.get("detail") if isinstance(image, dict) else None
    if detail is not None and detail not in IMAGE_DETAILS:
        raise _bad(f"'{where}.image_url.detail' must be auto, low or high.", f"{where}.image_url")
    return {"type": "input_image", "image_url": url, "detail": detail or "auto"}


def _file(file: Any, where: str) -> dict[str, Any]:
    if not isinstance(file, dict) or not isinstance(file.get("file_data"), str):
        raise _unsupported(f"{where}.file", "only inline files ('file_data') can be sent upstream")
    part = {"type": "input_file", "file_data": file["file_data"]}
    if isinstance(file.get("filename"), str):
        part["filename"] = file["filename"]
    return part


def _messages(messages: Any) -> tuple[str, list[dict[str, Any]]]:
    """The leading system and developer messages' text (``instructions``) and the input
    items for the rest (a later system or developer message stays in place, as a developer
    message)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list.", "messages", "invalid_type")
    leading: list[str] = []
    items: list[dict[str, Any]] = []
    calls: set[str] = set()
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{param}' must be an object.", param, "invalid_type")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = _text_of(content, f"{param}.content")
            if not items:
                leading.append(text)
            else:
                items.append(_message("developer", [{"type": "input_text", "text": text}]))
        elif role == "user":
            items.append(_message("user", _user_content(content, f"{param}.content")))
        elif role == "assistant":
            items.extend(_assistant(message, param, calls))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise _bad(
                    f"'{param}.tool_call_id' must name a tool call of an earlier assistant "
                    "message.",
                    f"{param}.tool_call_id",
                )
            output = _text_of(content, f"{param}.content")
            items.append({"type": "function_call_output", "call_id": call_id, "output": output})
        elif role == "function":
            raise _unsupported(f"{param}.role", "use 'tool' messages ('function' is deprecated)")
        else:
            raise _bad(
                f"'{param}.role' must be system, developer, user, assistant or tool.",
                f"{param}.role",
            )
    return "\n\n".join(leading), items


def _message(role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": content}


def _assistant(message: dict[str, Any], param: str, calls: set[str]) -> list[dict[str, Any]]:
    if message.get("audio") is not None or message.get("function_call") is not None:
        key = "audio" if message.get("audio") is not None else "function_call"
        raise _unsupported(f"{param}.{key}", "not available upstream")
    items: list[dict[str, Any]] = []
    content = message.get("content")
    parts: list[dict[str, Any]] = []
    if content is not None:
        text = _text_of(content, f"{param}.content", frozenset({"text", "refusal"}))
        if isinstance(content, list):
            for part in content:
                if part["type"] == "refusal":
                    parts.append({"type": "refusal", "refusal": part["text"]})
                else:
                    parts.append({"type": "output_text", "text": part["text"]})
        elif text:
            parts.append({"type": "output_text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    tool_calls = message.get("tool_calls")
    if parts or not tool_calls:
        items.append(_message("assistant", parts or [{"type": "output_text", "text": ""}]))
    if tool_calls is None:
        return items
    if not isinstance(tool_calls, list):
        raise _bad(f"'{param}.tool_calls' must be a list.", f"{param}.tool_calls", "invalid_type")
    for j, call in enumerate(tool_calls):
        where = f"{param}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id"), str)
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise _bad(
                f"'{where}' must be a function call with an id, a name and arguments.", where
            )
        calls.add(call["id"])
        items.append(
            {
                "type": "function_call",
                "call_id": call["id"],
                "name": function["name"],
                "arguments": function["arguments"],
            }
        )
    return items


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list.", "tools", "invalid_type")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _unsupported(f"{where}.type", "only function tools are available upstream")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"'{where}.function.name' must be a string.", f"{where}.function.name")
        flat: dict[str, Any] = {"type": "function", "name": function["name"]}
        if isinstance(function.get("description"), str):
            flat["description"] = function["description"]
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(
                f"'{where}.function.parameters' must be a JSON schema object.",
                f"{where}.function.parameters",
                "invalid_type",
            )
        flat["parameters"] = (
            parameters if parameters is not None else {"type": "object", "properties": {}}
        )
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad(
                f"'{where}.function.strict' must be a boolean.",
                f"{where}.function.strict",
                "invalid_type",
            )
        flat["strict"] = bool(strict)
        out.append(flat)
    return out


def _tool_choice(choice: Any, tools: list[dict[str, Any]]) -> Any:
    if choice is None:
        return "auto" if tools else None
    if choice in ("none", "auto", "required"):
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(function, dict):
        name = function.get("name")
        if not any(tool["name"] == name for tool in tools):
            raise _bad("'tool_choice' names a function that is not in 'tools'.", "tool_choice")
        return {"type": "function", "name": name}
    raise _bad(
        "'tool_choice' must be none, auto, required or {'type': 'function', 'function': "
        "{'name': ...}}.",
        "tool_choice",
    )


def _text(response_format: Any, verbosity: Any) -> dict[str, Any]:
    text: dict[str, Any] = {}
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            text["format"] = {"type": "json_object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if (
                not isinstance(spec, dict)
                or not isinstance(spec.get("name"), str)
                or not isinstance(spec.get("schema", {}), dict)
            ):
                raise _bad(
                    "'response_format.json_schema' must have a name and a schema.",
                    "response_format.json_schema",
                )
            fmt: dict[str, Any] = {
                "type": "json_schema",
                "name": spec["name"],
                "schema": spec.get("schema", {}),
                "strict": bool(spec.get("strict")),
            }
            if isinstance(spec.get("description"), str):
                fmt["description"] = spec["description"]
            text["format"] = fmt
        elif kind != "text":
            raise _bad(
                "'response_format.type' must be text, json_object or json_schema.",
                "response_format",
            )
    if verbosity is not None:
        if verbosity not in VERBOSITIES:
            raise _bad("'verbosity' must be low, medium or high.", "verbosity")
        text["verbosity"] = verbosity
    return text


# --- the answer ----------------------------------------------------------------------------


def chat_usage(usage: Any) -> dict[str, Any]:
    """Responses ``usage`` as Chat Completions ``usage``."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = _count(usage.get("input_tokens"))
    completion = _count(usage.get("output_tokens"))
    input_details = usage.get("input_tokens_details")
    output_details = usage.get("output_tokens_details")
    cached = _count(input_details.get("cached_tokens")) if isinstance(input_details, dict) else 0
    reasoning = (
        _count(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": _count(usage.get("total_tokens")) or prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _incomplete_reason(response: Any) -> str:
    """``finish_reason`` for an incomplete response."""
    details = response.get("incomplete_details") if isinstance(response, dict) else None
    reason = details.get("reason") if isinstance(details, dict) else None
    return "content_filter" if reason == "content_filter" else "length"


@attrs.define(eq=False)
class _Call:
    index: int
    call_id: str
    name: str
    sent: str = ""  # the arguments sent so far


@attrs.define(eq=False)
class ChatStream:
    """Upstream's events in, ``chat.completion.chunk`` objects out.

    ``feed`` takes each parsed event, in order, and returns what to send (each one
    ``data: <json>`` line); after the turn's last event ``done`` is true and the front
    sends ``data: [DONE]``. The first chunk carries ``role: assistant``; text comes as
    ``content`` deltas, reasoning summaries as ``reasoning_content`` deltas, and each
    function call as ``tool_calls`` deltas with one stable ``index``: its ``id``,
    ``type`` and ``function.name`` on the first, ``function.arguments`` pieces after. The
    turn ends with one chunk carrying ``finish_reason`` and, when asked
    (``include_usage``), a chunk with ``usage`` and no choices. A failed turn ends with
    ``{"error": {...}}`` (the proxy's envelope) instead, and no ``finish_reason``.
    """

    model: str
    created: int
    include_usage: bool = False
    id: str = attrs.field(factory=new_completion_id)
    done: bool = False
    started: bool = False
    calls: dict[str, _Call] = attrs.field(factory=dict)  # by upstream item id
    summary_seen: set[tuple[str, int]] = attrs.field(factory=set)
    error: dict[str, Any] | None = None  # the envelope a failed turn ended with

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.done:
            return []
        kind = event.get("type")
        out: list[dict[str, Any]] = []
        if kind in ("response.failed", "error"):
            self.done = True
            response = event.get("response")
            error = event.get("error")
            if not isinstance(error, dict) and isinstance(response, dict):
                error = response.get("error")
            if isinstance(error, dict) and error:
                self.error = upstream_envelope({"error": {**error, "param": None}})
            else:
                self.error = error_envelope(
                    "Upstream failed the response.", "upstream_error", "upstream_failed"
                )
            return [self.error]
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        if kind == "response.output_text.delta":
            out += self._delta({"content": event.get("delta")})
        elif kind == "response.refusal.delta":
            out += self._delta({"refusal": event.get("delta")})
        elif kind == "response.reasoning_summary_text.delta":
            out += self._reasoning(event)
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                out += self._call(item, done=kind == "response.output_item.done")
        elif kind == "response.function_call_arguments.delta":
            call = self.calls.get(str(event.get("item_id")))
            delta = event.get("delta")
            if call is not None and isinstance(delta, str) and delta:
                call.sent += delta
                out.append(
                    self._tool_delta({"index": call.index, "function": {"arguments": delta}})
                )
        elif kind in ("response.completed", "response.incomplete"):
            self.done = True
            response = event.get("response")
            if kind == "response.incomplete":
                reason = _incomplete_reason(response)
            else:
                reason = "tool_calls" if self.calls else "stop"
            out.append(self._chunk({}, finish_reason=reason))
            if self.include_usage:
                usage = response.get("usage") if isinstance(response, dict) else None
                out.append(self._usage_chunk(chat_usage(usage)))
        return out

    def _reasoning(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        delta = event.get("delta")
        if not isinstance(delta, str) or not delta:
            return []
        part = (str(event.get("item_id")), _count(event.get("summary_index")))
        if part not in self.summary_seen:
            if self.summary_seen:
                delta = "\n\n" + delta  # a new summary part reads as a new paragraph
            self.summary_seen.add(part)
        return [self._chunk({"reasoning_content": delta})]

    def _call(self, item: dict[str, Any], *, done: bool) -> list[dict[str, Any]]:
        item_id = str(item.get("id"))
        call = self.calls.get(item_id)
        out: list[dict[str, Any]] = []
        if call is None:
            call = _Call(
                index=len(self.calls),
                call_id=str(item.get("call_id") or item_id),
                name=str(item.get("name") or ""),
            )
            self.calls[item_id] = call
            out.append(
                self._tool_delta(
                    {
                        "index": call.index,
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                )
            )
        arguments = item.get("arguments")
        if done and isinstance(arguments, str) and arguments.startswith(call.sent):
            rest = arguments[len(call.sent) :]
            if rest:  # what the argument deltas did not bring
                call.sent = arguments
                out.append(self._tool_delta({"index": call.index, "function": {"arguments": rest}}))
        return out

    def _delta(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        value = next(iter(delta.values()))
        return [self._chunk(delta)] if isinstance(value, str) and value else []

    def _tool_delta(self, call: dict[str, Any]) -> dict[str, Any]:
        return self._chunk({"tool_calls": [call]})

    def _base(self) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        return chunk

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk = self._base()
        chunk["choices"] = [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        chunk = self._base()
        chunk["choices"] = []
        chunk["usage"] = usage
        return chunk


def chat_completion(
    response: Mapping[str, Any], *, model: str, created: int, completion_id: str | None = None
) -> dict[str, Any]:
    """The ``chat.completion`` object for a final Responses ``response`` object (completed,
    or incomplete: then ``finish_reason`` is ``length`` or ``content_filter``)."""
    texts: list[str] = []
    refusals: list[str] = []
    summaries: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    output = response.get("output")
    for item in output if isinstance(output, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or []:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                    refusals.append(part["refusal"])
        elif kind == "reasoning":
            for part in item.get("summary") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str) and part["text"]:
                    summaries.append(part["text"])
        elif kind == "function_call":
            tool_calls.append(
                {
                    "id": str(item.get("call_id") or item.get("id")),
                    "type": "function",
                    "function": {
                        "name": str(item.get("name") or ""),
                        "arguments": str(item.get("arguments") or ""),
                    },
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": "".join(refusals) or None,
    }
    if summaries:
        message["reasoning_content"] = "\n\n".join(summaries)
    if tool_calls:
        message["tool_calls"] = tool_calls
    if response.get("status") == "incomplete":
        finish_reason = _incomplete_reason(response)
    else:
        finish_reason = "tool_calls" if tool_calls else "stop"
    return {
        "id": completion_id or new_completion_id(),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": chat_usage(response.get("usage")),
    }


def chat_answer(
    aggregation: Aggregation, *, model: str, created: int, completion_id: str | None = None
) -> tuple[int, dict[str, Any]]:
    """The non-streamed answer from an :class:`Aggregation` fed the whole turn: ``200`` and
    a ``chat.completion`` (an incomplete response is one, with its ``finish_reason``), or
    the aggregation's error status and envelope."""
    failed = aggregation.failed
    if aggregation.completed is None and failed is not None:
        response = failed.get("response")
        if failed.get("type") == "response.incomplete" and isinstance(response, dict):
            return 200, chat_completion(
                response, model=model, created=created, completion_id=completion_id
            )
    status, value = aggregation.answer()
    if status != 200:
        return status, value
    return 200, chat_completion(value, model=model, created=created, completion_id=completion_id)


def chat_error(error: ProxyError) -> tuple[int, dict[str, Any]]:
    """A proxy error as a Chat Completions error answer: its status and
    ``{"error": {"message", "type", "param", "code", ...}}`` (the proxy's envelope is
    that shape; the four keys are always present)."""
    inner = error.body.get("error")
    inner = dict(inner) if isinstance(inner, dict) else {}
    body = {
        "message": str(inner.pop("message", "") or ""),
        "type": inner.pop("type", None) or "invalid_request_error",
        "param": inner.pop("param", None),
        "code": inner.pop("code", None),
        **inner,
    }
    return error.status, {"error": body}
