"""One answer from a stream of events, for clients that did not ask for a stream (sans-IO).

``POST /v1/responses`` with ``stream: false`` is answered with the ``response`` object of
``response.completed``; a compaction request (``.../responses/compact``) with
``{"output": [the request's user messages..., the compaction item]}``. Upstream is always
asked for a stream; :class:`Aggregation` is fed every event of it, in order, and gives the
answer, or a ``502`` envelope saying why there is none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from trioproxy.protocol.errors import error_envelope, upstream_envelope

COMPACTION_ITEMS = frozenset({"compaction", "compaction_summary"})


@attrs.define(eq=False)
class Aggregation:
    items: list[Any] = attrs.field(factory=list)
    completed: dict[str, Any] | None = None
    failed: Mapping[str, Any] | None = None
    cut: str | None = None  # why the stream ended early, if it did

    def feed(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind == "response.output_item.done":
            self.items.append(event.get("item"))
        elif kind == "response.completed":
            response = event.get("response")
            self.completed = response if isinstance(response, dict) else {}
        elif kind in ("response.failed", "response.incomplete", "error"):
            self.failed = event

    def answer(self) -> tuple[int, dict[str, Any]]:
        """The completed response, or a ``502`` envelope saying why there is none."""
        if self.completed is not None:
            return 200, self.completed
        failed = self.failed or {}
        response = failed.get("response")
        error = failed.get("error") or (
            response.get("error") if isinstance(response, dict) else None
        )
        if isinstance(error, dict) and error:
            return 502, upstream_envelope({"error": {**error, "param": None}})
        reason = "Upstream ended the stream before response.completed."
        if self.cut is not None:
            reason = f"Upstream cut the stream before response.completed ({self.cut})."
        return 502, error_envelope(reason, "upstream_error", "stream_incomplete")

    def compact_answer(self, request_input: Sequence[Any]) -> tuple[int, dict[str, Any]]:
        """The unary compaction answer: the request's user messages, then the compaction."""
        status, value = self.answer()
        if status != 200:
            return status, value
        output = value.get("output") or self.items
        retained = [
            item
            for item in request_input
            if isinstance(item, dict)
            and item.get("type", "message") == "message"
            and item.get("role") == "user"
        ]
        compaction = [
            item
            for item in output
            if isinstance(item, dict) and item.get("type") in COMPACTION_ITEMS
        ]
        return 200, {"output": [*retained, *compaction]}
