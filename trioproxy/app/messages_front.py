"""``POST /v1/messages``: Anthropic's Messages API as a front of the core.

The request is translated into a Responses request (``protocol/anthropic_messages.py``) and
runs through the HTTP handler like any other (``app/responses_http.py``: admission, keys and
budgets, routing, failover, accounting). The answer is rendered by one of the two sinks
below: Anthropic's event stream (``message_start``, content blocks, ``message_delta``,
``message_stop``) for ``stream: true``, else one ``message`` object. The proxy's own errors
take Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``): local overload
is ``529 overloaded_error``, an exhausted pool or key budget ``429 rate_limit_error`` with
its ``retry-after``.

``POST /v1/messages/count_tokens`` answers an estimate (``count_tokens``) without going
upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from trioproxy.app.downstream import Downstream, KeepAlive, OneAnswerSink, TranslatingStreamSink
from trioproxy.protocol.anthropic_messages import (
    AnthropicError,
    MessagesStream,
    count_tokens_estimate,
    estimate_tokens,
    from_proxy_error,
    message_from_response,
    messages_to_responses,
    stream_error,
    thinking_display,
)
from trioproxy.protocol.errors import ProxyError, json_bytes
from trioproxy.sessions.sinks import Cut, Sink

Event = tuple[str, dict[str, Any]]


def _frames(events: list[Event]) -> bytes:
    return b"".join(
        b"event: " + name.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"
        for name, data in events
    )


def _thinking(body: Mapping[str, Any]) -> bool:
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def _thinking_text(body: Mapping[str, Any]) -> bool:
    return thinking_display(body.get("thinking")) != "omitted"  # (checked when translated)


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""


def _refusal(exc: AnthropicError) -> ProxyError:
    return ProxyError(exc.status, exc.body)


@attrs.frozen
class MessagesFront:
    """The Anthropic Messages front (see :class:`~trioproxy.app.fronts.Front`)."""

    model_map: Mapping[str, str] = attrs.field(factory=dict)

    def translate(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return messages_to_responses(body, model_map=self.model_map).body
        except AnthropicError as exc:
            raise _refusal(exc) from None

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
        if streaming:
            # message_start's input_tokens (upstream counts only at the end), from the
            # request as translated once already
            tokens = estimate_tokens(translated)
            stream = MessagesStream(
                _model(body),
                _thinking(body),
                thinking_text=_thinking_text(body),
                input_tokens=tokens,
            )
            return MessagesStreamSink(down, keepalive=keepalive, stream=stream, front=self)
        return MessagesUnarySink(
            down,
            model=_model(body),
            thinking=_thinking(body),
            thinking_text=_thinking_text(body),
            front=self,
        )

    def shape(self, error: ProxyError) -> ProxyError:
        if error.body.get("type") == "error":
            return error  # Anthropic's shape already (a refused translation)
        status, body, headers = from_proxy_error(error)
        return ProxyError(status, body, headers)

    def count_tokens(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/v1/messages/count_tokens``'s answer: an estimate (see the module docstring)."""
        try:
            return {"input_tokens": count_tokens_estimate(body, model_map=self.model_map)}
        except AnthropicError as exc:
            raise _refusal(exc) from None


@attrs.define(eq=False)
class MessagesStreamSink(TranslatingStreamSink):
    """A turn's answer as Anthropic's server-sent events."""

    stream: MessagesStream = attrs.field(kw_only=True)
    front: MessagesFront = attrs.field(kw_only=True)

    def frames(self, event: dict[str, Any]) -> bytes:
        return _frames(self.stream.feed(event))

    def opening(self) -> bytes:
        return _frames(self.stream.start())

    def closing(self, cut: Cut | None) -> bytes:
        return _frames(self.stream.end(cut.reason if cut is not None else None))

    def failure(self, error: ProxyError) -> bytes:
        return _frames(self.stream.fail(error.body))

    def shape(self, error: ProxyError) -> ProxyError:
        return self.front.shape(error)


@attrs.define(eq=False)
class MessagesUnarySink(OneAnswerSink):
    """A turn's answer as one Anthropic ``message`` object."""

    model: str = attrs.field(kw_only=True)
    thinking: bool = attrs.field(kw_only=True)
    thinking_text: bool = attrs.field(kw_only=True, default=True)
    front: MessagesFront = attrs.field(kw_only=True)

    def answer(self) -> tuple[int, dict[str, Any], str | None]:
        aggregation = self.aggregation
        failed = aggregation.failed
        response = aggregation.completed
        if response is None and failed is not None and failed.get("type") == "response.incomplete":
            incomplete = failed.get("response")
            response = incomplete if isinstance(incomplete, dict) else None
        if response is not None:
            value = message_from_response(
                response,
                model=self.model,
                thinking=self.thinking,
                items=aggregation.items,
                thinking_text=self.thinking_text,
            )
            return 200, value, None
        if failed is not None:
            body = stream_error(failed)
            return 502, body, body["error"]["type"]
        status, envelope = aggregation.answer()  # the stream ended early: why, as a 502
        shaped = self.shape(ProxyError(status, envelope))
        return shaped.status, shaped.body, envelope["error"]["code"]

    def shape(self, error: ProxyError) -> ProxyError:
        return self.front.shape(error)


#: the front the routes serve (``app/routes.py``) and count tokens with
MESSAGES = MessagesFront()
