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

from trioproxy.app.downstream import Downstream, KeepAlive, OneAnswerSink
from trioproxy.protocol.chat_completions import (
    ChatStream,
    chat_answer,
    chat_error,
    chat_to_responses,
)
from trioproxy.protocol.errors import ProxyError, json_bytes
from trioproxy.protocol.events import Batch
from trioproxy.protocol.headers import RawHeaders, response_headers
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
            return ChatStreamSink(down, stream, self, keepalive)
        return ChatUnarySink(down, model=_model(body), created=created, front=self)

    def shape(self, error: ProxyError) -> ProxyError:
        status, body = chat_error(error)
        return ProxyError(status, body, error.headers)


@attrs.define(eq=False)
class ChatStreamSink:
    """A turn's answer as ``chat.completion.chunk`` server-sent events."""

    down: Downstream
    stream: ChatStream
    front: ChatFront
    keepalive: KeepAlive | None = None

    async def commit(self, upstream_headers: RawHeaders) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        head = response_headers(self.down.request_id, "sse", upstream=upstream_headers)
        await self.down.start(200, head)

    async def events(self, batch: Batch) -> None:
        for event in batch.events:
            value = event.json()
            if value is None:
                continue
            frames = [_frame(chunk) for chunk in self.stream.feed(value)]
            if frames:
                await self.down.body(b"".join(frames))

    async def finish(self) -> None:
        if self.stream.error is None:
            await self.down.body(DONE_FRAME)
        await self.down.finish()

    async def cut(self, cut: Cut) -> None:
        # the stream ends without [DONE], as a broken stream would (clients see it cut)
        await self.down.finish()

    async def error(self, error: ProxyError) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        shaped = self.front.shape(error)
        if not self.down.started:
            await self.down.json(shaped.status, shaped.body, shaped.headers)
            return
        await self.down.body(_frame(shaped.body))
        await self.down.finish()


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
