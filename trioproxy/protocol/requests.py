"""A Responses request as the conversation core sees it, whichever front it came through
(sans-IO).

A :class:`TurnRequest` is the request body (parsed), its input as a list of items, and, when
the proxy may forward it unchanged, the exact form the client sent: the HTTP body bytes
(zstd stays zstd) with their headers, or the WebSocket message text. A request the proxy must
change (re-anchored, sent without a stale anchor) is encoded again from the body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import zstandard

from trioproxy.protocol.errors import ProxyError, json_bytes
from trioproxy.protocol.headers import RawHeaders, header

_ZSTD = zstandard.ZstdDecompressor()

#: input items that only a request carrying its own history has
HISTORY_ITEMS = frozenset(
    {"function_call", "reasoning", "custom_tool_call", "compaction", "compaction_summary"}
)


#: model aliases: name -> (upstream model, reasoning effort or None)
Aliases = dict[str, tuple[str, str | None]]
_ALIAS = re.compile(r"^([A-Za-z0-9._-]+)=([A-Za-z0-9._-]+)(?::([a-z]+))?$")


def parse_aliases(text: str) -> Aliases:
    """``NAME=MODEL[:EFFORT],...`` (the ``model_aliases`` option) as a mapping; a malformed
    entry is a ``ValueError`` naming it."""
    aliases: Aliases = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        match = _ALIAS.match(entry)
        if match is None:
            raise ValueError(f"{entry!r} is not NAME=MODEL or NAME=MODEL:EFFORT")
        name, model, effort = match.groups()
        if name == model:
            raise ValueError(f"{entry!r} names itself")
        aliases[name] = (model, effort)
    return aliases


def decode_json_body(
    raw: bytes, encoding: str | None, limit: int, charge: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """A request body as a JSON object (zstd or identity); a :class:`ProxyError` saying what
    is wrong otherwise.

    A zstd body is inflated at most to ``limit`` bytes (past it: 413), however far it would
    go. ``charge`` is told what the body will cost in memory before it is parsed (the
    inflated copy, then :func:`parse_cost`) and may raise to refuse the work; the parse is
    synchronous, so at most one inflated copy exists uncharged at a time."""
    encoding = (encoding or "").strip().lower()
    inflated = 0
    if encoding == "zstd":
        raw = _inflate(raw, limit)
        inflated = len(raw)
    elif encoding not in ("", "identity"):
        raise ProxyError.of(
            415,
            f"Unsupported Content-Encoding {encoding!r}; send identity or zstd.",
            "unsupported_content_encoding",
        )
    if charge is not None:
        charge(inflated + parse_cost(raw))
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # (nesting past the stack)
        raise ProxyError.of(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(value, dict):
        raise ProxyError.of(400, "The request body must be a JSON object.", "invalid_body")
    return value


def _inflate(raw: bytes, limit: int) -> bytes:
    """A zstd body inflated, at most ``limit`` bytes of it (413 past it)."""
    try:
        with _ZSTD.stream_reader(raw, read_across_frames=True) as reader:
            data = reader.read(limit + 1)
    except zstandard.ZstdError:
        raise ProxyError.of(
            400, "The zstd request body could not be decompressed.", "invalid_body"
        ) from None
    if len(data) > limit:
        raise ProxyError.of(
            413, f"Decompressed body larger than {limit} bytes.", "payload_too_large"
        )
    return data


# What ``json.loads`` takes at its peak, measured with tracemalloc on bodies of many shapes
# (long strings, non-ASCII text, arrays of small numbers, strings, objects with repeated and
# with unique keys): the body decoded to text once more, and per structural character
# (``{ [ : ,``) at most about 105 bytes (an object of one unique key); this bounds all of them.
PARSE_BYTES_PER_BODY_BYTE = 2
PARSE_BYTES_PER_TOKEN = 112


def parse_cost(raw: bytes | str) -> int:
    """An upper bound of the memory parsing ``raw`` (a body, or a WebSocket message's text)
    as JSON takes, from counting its structural characters (no parse): a 60 MB body of short
    items becomes several hundred MB of Python objects, a 60 MB string about twice its size."""
    if isinstance(raw, str):
        tokens = raw.count("{") + raw.count("[") + raw.count(":") + raw.count(",")
        return PARSE_BYTES_PER_BODY_BYTE * len(raw) + PARSE_BYTES_PER_TOKEN * tokens
    tokens = raw.count(b"{") + raw.count(b"[") + raw.count(b":") + raw.count(b",")
    return PARSE_BYTES_PER_BODY_BYTE * len(raw) + PARSE_BYTES_PER_TOKEN * tokens


def normalized_input(body: dict[str, Any]) -> list[Any]:
    """``input`` as a list of items (a string is one user message)."""
    value = body.get("input")
    if isinstance(value, str):
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        ]
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProxyError.of(
            400, "'input' must be a string or a list of items.", "invalid_type", param="input"
        )
    return value


def self_contained(items: Sequence[Any]) -> bool:
    """Whether an input carries its own history (a full resend), not only a continuation."""
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") in HISTORY_ITEMS:
            return True
        if item.get("type", "message") == "message" and item.get("role") in (
            "developer",
            "system",
            "assistant",
        ):
            return True
    return False


def conversation_key(headers: Sequence[tuple[str, str]], body: dict[str, Any]) -> str | None:
    """The conversation a request belongs to: its ``session-id`` / ``session_id`` /
    ``conversation_id`` header, else its ``prompt_cache_key`` (``x-codex-turn-state`` is not
    one: it changes with the upstream connection)."""
    for name in ("session-id", "session_id", "conversation_id"):
        value = header(headers, name)
        if value:
            return value
    key = body.get("prompt_cache_key")
    return key if isinstance(key, str) and key else None


def routing_key(headers: Sequence[tuple[str, str]], conversation: str | None) -> str | None:
    """Routing's soft-affinity key: the upstream turn state, else the conversation."""
    turn_state = header(headers, "x-codex-turn-state")
    if turn_state:
        return f"x-codex-turn-state:{turn_state}"
    return f"session:{conversation}" if conversation else None


def as_json_body(headers: RawHeaders) -> RawHeaders:
    """Raw request headers for a body the proxy encoded itself, as plain JSON."""
    kept = [(k, v) for k, v in headers if k not in (b"content-encoding", b"content-type")]
    return [*kept, (b"content-type", b"application/json")]


@attrs.define(eq=False)
class TurnRequest:
    """One Responses request (see the module docstring)."""

    body: dict[str, Any]
    input: list[Any]  # the client's input items (the conversation's new turn)
    http_body: bytes | None = None  # the body exactly as sent, when it may go on unchanged
    http_headers: RawHeaders = attrs.field(factory=list)  # request headers, names lower case
    ws_text: str | None = None  # the message exactly as sent, when it may go on unchanged
    # the running digest of the whole input, for a request whose turn may be continued by a
    # resent history (``protocol/continuation.py``)
    history: bytes | None = None
    # the request as the client sent it, when the proxy made it a continuation of an
    # earlier turn (sent instead when that turn's anchor cannot be used)
    whole: TurnRequest | None = None

    @property
    def anchor(self) -> str | None:
        anchor = self.body.get("previous_response_id")
        return anchor if isinstance(anchor, str) and anchor else None

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def effort(self) -> str | None:
        """The reasoning effort asked for (``reasoning.effort``), if any."""
        reasoning = self.body.get("reasoning")
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
        return effort if isinstance(effort, str) else None

    def aliased(self, aliases: Aliases) -> TurnRequest:
        """The request with an operator-defined model name replaced by the model it stands
        for (and its reasoning effort, when the alias names one); the same request when its
        model is no alias. An aliased request is encoded again from its body."""
        alias = aliases.get(self.model or "")
        if alias is None:
            return self
        model, effort = alias
        body = {**self.body, "model": model}
        if effort is not None:
            reasoning = body.get("reasoning")
            body["reasoning"] = {
                **(reasoning if isinstance(reasoning, dict) else {}),
                "effort": effort,
            }
        return TurnRequest(body, self.input, None, self.http_headers, history=self.history)

    def continued(self, anchor: str, start: int) -> TurnRequest:
        """The request sent as a continuation of the turn whose response is ``anchor``: only
        its input from ``start`` on (the rest is that turn's input and output)."""
        items = self.input[start:]
        body = {**self.body, "previous_response_id": anchor, "input": items}
        return TurnRequest(body, items, None, self.http_headers, history=self.history, whole=self)

    def without_anchor(self, input_items: Sequence[Any] | None = None) -> dict[str, Any]:
        """The body sent without ``previous_response_id`` (and with ``input_items``, if
        given: a re-anchored turn's whole input)."""
        body = {k: v for k, v in self.body.items() if k != "previous_response_id"}
        if input_items is not None:
            body["input"] = list(input_items)
        return body

    def encode_http(self, body: dict[str, Any] | None) -> tuple[bytes, RawHeaders]:
        """The upstream HTTP body and headers for ``body`` (None: the request unchanged)."""
        if body is None and self.http_body is not None:
            return self.http_body, self.http_headers
        return json_bytes(self.body if body is None else body), as_json_body(self.http_headers)

    def encode_ws(self, body: dict[str, Any] | None) -> str:
        """The upstream ``response.create`` message for ``body`` (None: unchanged)."""
        if body is None and self.ws_text is not None:
            return self.ws_text
        value = self.body if body is None else body
        return json.dumps({**value, "type": "response.create"}, ensure_ascii=False)
