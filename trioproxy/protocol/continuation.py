"""Which earlier turn a resent history continues (sans-IO).

Chat Completions and Anthropic Messages clients send a conversation's whole history with
every request. Upstream can take a conversation incrementally instead: on the WebSocket that
served the previous turn, a request that names that turn's response (``previous_response_id``)
and carries only what is new. This module says when that is the same request.

A request's input is read as a sequence of item digests (:func:`item_digest`), folded into a
running digest (:class:`History`: one mark per prefix of the input). A turn served on an
upstream WebSocket leaves the running digest of its whole input followed by its output
(:func:`extend`). A later request continues that turn exactly when one of its marks equals
it: its input starts with that turn's input and what upstream answered, item for item.

What counts as the same item is what a client of another API can carry back: a message's
role, its text (parts joined) and its media; a function call's id, name and arguments (as
JSON values, so re-serialized arguments still match); a call's output. ``reasoning`` items
are left out on both sides: these clients cannot return them (or return them re-encoded),
and upstream holds the turn's own reasoning with the anchor. Any other item counts with all
its fields but ``id`` and ``status``. Nothing else is assumed: an edited, dropped or
reordered item is simply no continuation, and the request goes upstream whole.

The first mark is the request's scope (the API key and the model), so a request never
continues a turn of another key, or of another model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Container, Iterable, Sequence
from typing import Any

import attrs

#: items left out of the comparison (see the module docstring)
SKIPPED = frozenset({"reasoning"})
#: items that are a model's answer: a request holding one continues a conversation
ANSWERS = frozenset({"function_call", "custom_tool_call"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text"})
_FOLD = hashlib.sha256


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _as_value(text: Any) -> Any:
    """A JSON text as its value (arguments re-serialized by a client still match)."""
    if isinstance(text, str):
        try:
            return ["json", json.loads(text)]
        except ValueError:
            return ["text", text]
    return ["value", text]


def _fields(kind: bytes, *fields: bytes) -> bytes:
    """The digest of ``fields`` (each length-prefixed, so no two lists collide)."""
    digest = _FOLD(kind)
    for field in fields:
        digest.update(len(field).to_bytes(8, "little"))
        digest.update(field)
    return digest.digest()


def _message(item: dict[str, Any]) -> bytes:
    content = item.get("content")
    parts: list[Any] = []
    text: list[str] = []
    if isinstance(content, str):
        text.append(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                parts.append(["?", part])
            elif part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif part.get("type") == "refusal":
                parts.append(["refusal", part.get("refusal")])
            else:
                rest = {k: v for k, v in part.items() if k not in ("type", "detail")}
                parts.append([part.get("type"), rest])
    role = item.get("role")
    return _fields(
        b"message",
        role.encode() if isinstance(role, str) else _canonical(role),
        "".join(text).encode(),
        _canonical(parts) if parts else b"",
    )


def item_digest(item: Any) -> bytes | None:
    """What identifies ``item`` across APIs (see the module docstring); None: left out."""
    if not isinstance(item, dict):
        return _fields(b"?", _canonical(item))
    kind = item.get("type", "message")
    if kind in SKIPPED:
        return None
    if kind == "message":
        return _message(item)
    if kind == "function_call":
        form: Any = [item.get("call_id"), item.get("name"), _as_value(item.get("arguments"))]
    elif kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, str):  # (the usual case, and often the largest item)
            return _fields(b"output", _canonical(item.get("call_id")), output.encode())
        form = [item.get("call_id"), _as_value(output)]
    else:
        form = {k: v for k, v in item.items() if k not in ("id", "status")}
    return _fields(_canonical(kind), _canonical(form))


def _fold(mark: bytes, digest: bytes | None) -> bytes:
    return mark if digest is None else _FOLD(mark + digest).digest()


def scope_mark(client: str, model: str | None) -> bytes:
    """The first mark of every history of ``client`` (an API key id) on ``model``."""
    return _fields(b"scope", client.encode(), (model or "").encode())


@attrs.frozen
class History:
    """A request's input read as running digests: ``marks[i]`` covers ``input[:i]``."""

    marks: tuple[bytes, ...]
    opening: int  # how many items come before the first answer (the conversation's opening)

    @classmethod
    def of(cls, scope: bytes, items: Sequence[Any]) -> History:
        marks = [scope]
        opening = len(items)
        for index, item in enumerate(items):
            marks.append(_fold(marks[-1], item_digest(item)))
            if opening == len(items) and _is_answer(item):
                opening = index
        return cls(tuple(marks), opening)

    @property
    def whole(self) -> bytes:
        """The mark of the whole input."""
        return self.marks[-1]

    @property
    def continues(self) -> bool:
        """Whether the input holds an answer of the model (it is not a first turn)."""
        return self.opening < len(self.marks) - 1

    def key(self) -> str:
        """A stable name of the conversation: the digest of its opening, the same on every
        turn (what the proxy uses as its key upstream and among bridge sessions)."""
        return self.marks[self.opening].hex()[:32]

    def longest(self, known: Container[bytes]) -> int | None:
        """The longest prefix (its length, at least one item and not the whole input) whose
        mark is one of ``known``; None if none is."""
        for length in range(len(self.marks) - 2, 0, -1):
            if self.marks[length] in known:
                return length
        return None


def _is_answer(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    kind = item.get("type", "message")
    return kind in ANSWERS or (kind == "message" and item.get("role") == "assistant")


def extend(mark: bytes, output: Iterable[Any]) -> bytes:
    """The mark after ``output`` (a turn's output items) follows the input marked ``mark``."""
    for item in output:
        mark = _fold(mark, item_digest(item))
    return mark
