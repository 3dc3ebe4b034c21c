"""``POST /v1/chat/completions``: OpenAI's Chat Completions API as a front of the core.

The request is translated into a Responses request (``protocol/chat_completions.py``) and
runs through the HTTP handler like any other (``app/responses_http.py``: admission, keys and
budgets, routing, failover, accounting). The answer is rendered by one of the two sinks
below: ``chat.completion.chunk`` events (``data: {...}`` lines ending with ``data: [DONE]``)
for ``stream: true``, else one ``chat.completion`` object; the proxy's own errors keep their
envelope, which is already the shape Chat Completions clients read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import attrs

from trioproxy.app.downstream import Downstream, KeepAlive, OneAnswerSink, TranslatingStreamSink
from trioproxy.protocol.chat_completions import (
    ChatStream,
    chat_answer,
    chat_error,
    chat_to_responses,
)
from trioproxy.protocol.errors import ProxyError, json_bytes
from trioproxy.sessions.sinks import Cut, Sink

DONE_FRAME = b"data: [DONE]\n\n"


def _frame(value: Any) -> bytes:
    return b"data: " + json_bytes(value) + b"\n\n"


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""


@attrs.frozen
class ChatFront:
    """The Chat Completions front (see :class:`~trioproxy.app.fronts.Front`)."""

    model_aliases: Mapping[str, str] = attrs.field(factory=dict)

    def translate(self, body: dict[str, Any]) -> dict[str, Any]:
        return chat_to_responses(body, model_aliases=self.model_aliases).body

    def streams(self, body: dict[str, Any]) -> bool:
        return body.get("stream") is True

    def sink(
        self,
        down: Downstream,
        keepalive: KeepAlive | None,
        streaming: bool,
        body: dict[str, Any],
        translated: dict[str, Any],
    ) -> Sink:
        created = int(time.time())
        if streaming:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            stream = ChatStream(_model(body), created, include_usage=usage)
            return ChatStreamSink(down, keepalive=keepalive, stream=stream, front=self)
        return ChatUnarySink(down, model=_model(body), created=created, front=self)

    def shape(self, error: ProxyError) -> ProxyError:
        status, body = chat_error(error)
        return ProxyError(status, body, error.headers)


@attrs.define(eq=False)
class ChatStreamSink(TranslatingStreamSink):
    """A turn's answer as ``chat.completion.chunk`` server-sent events."""

    stream: ChatStream = attrs.field(kw_only=True)
    front: ChatFront = attrs.field(kw_only=True)

    def frames(self, event: dict[str, Any]) -> bytes:
        return b"".join(_frame(chunk) for chunk in self.stream.feed(event))

    def closing(self, cut: Cut | None) -> bytes:
        # a broken stream ends without [DONE] (clients see it cut), as does a failed turn
        return DONE_FRAME if cut is None and self.stream.error is None else b""

    def failure(self, error: ProxyError) -> bytes:
        return _frame(error.body)

    def shape(self, error: ProxyError) -> ProxyError:
        return self.front.shape(error)


@attrs.define(eq=False)
class ChatUnarySink(OneAnswerSink):
    """A turn's answer as one ``chat.completion`` object."""

    model: str = attrs.field(kw_only=True)
    created: int = attrs.field(kw_only=True)
    front: ChatFront = attrs.field(kw_only=True)

    def answer(self) -> tuple[int, dict[str, Any], str | None]:
        status, value = chat_answer(self.aggregation, model=self.model, created=self.created)
        error = value.get("error") if status != 200 else None
        return status, value, error.get("code") if isinstance(error, dict) else None

    def shape(self, error: ProxyError) -> ProxyError:
        return self.front.shape(error)
