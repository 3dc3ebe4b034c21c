"""The response side of an HTTP request to a proxy route, and the two ways a turn's answer is
rendered for an HTTP client: as an SSE stream (:class:`SSESink`) or as one JSON answer
(:class:`UnarySink`). Both are :class:`~trioproxy.sessions.sinks.Sink` implementations; the
turn itself is the conversation core's.

Also here: reading a request body under a limit, and the request's one helper task
(:func:`watch_client`), which notices the client leaving and sends keep-alives while
upstream is silent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from trioproxy.protocol.aggregate import Aggregation
from trioproxy.protocol.errors import ProxyError, json_bytes
from trioproxy.protocol.events import RATE_LIMITS, Batch
from trioproxy.protocol.headers import RawHeaders, response_headers
from trioproxy.protocol.sse import KEEPALIVE_FRAME, encode_event
from trioproxy.sessions.sinks import Cut
from trioproxy.web.asgi import Receive, Send


class ClientGone(Exception):
    """The client disconnected."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; ``ProxyError(413)`` past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProxyError.of(
                413, f"Request body larger than {limit} bytes.", "payload_too_large"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


@attrs.define(eq=False)
class Downstream:
    """The response side of one HTTP request."""

    send: Send
    request_id: str
    started: bool = False
    finished: bool = False
    status: int | None = None
    first_byte_at: float | None = None

    async def start(self, status: int, headers: RawHeaders) -> None:
        """The response head (once; later calls are ignored)."""
        if self.started:
            return
        self.started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool = True) -> None:
        if data and self.first_byte_at is None:
            self.first_byte_at = trio.current_time()
        await self.send({"type": "http.response.body", "body": data, "more_body": more})
        if not more:
            self.finished = True

    async def finish(self) -> None:
        if not self.finished:
            await self.body(b"", more=False)

    async def json(
        self,
        status: int,
        value: Any,
        extra: Sequence[tuple[str, str]] = (),
        upstream: Sequence[tuple[bytes, bytes]] = (),
        *,
        close: bool = False,
    ) -> None:
        """A whole JSON answer."""
        data = json_bytes(value)
        head = response_headers(
            self.request_id, length=len(data), extra=extra, upstream=upstream, close=close
        )
        await self.start(status, head)
        await self.body(data, more=False)

    async def error(self, error: ProxyError) -> None:
        """The proxy's own answer: an error envelope, or, once a stream has started (a
        keep-alive committed its 200), an ``error`` event that ends it."""
        if not self.started:
            await self.json(error.status, error.body, error.headers)
            return
        await self.body(encode_event(error.ws_event()))
        await self.finish()


@attrs.define(eq=False)
class KeepAlive:
    """SSE keep-alives for a streaming request while upstream is silent: one every
    ``interval`` until ``stop()`` (the turn's answer starts; from then on only upstream's
    bytes go to the client, since a frame of ours between two of its chunks could split one
    of its frames)."""

    down: Downstream
    interval: float
    stopped: bool = False
    due: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.due = trio.current_time() + self.interval

    def stop(self) -> None:
        self.stopped = True

    async def send(self) -> None:
        """One keep-alive (the 200 head goes out with the first)."""
        await self.down.start(200, response_headers(self.down.request_id, "sse"))
        await self.down.body(KEEPALIVE_FRAME)
        self.due = trio.current_time() + self.interval


async def watch_client(
    receive: Receive, request: trio.CancelScope, keepalive: KeepAlive | None
) -> None:
    """The one helper task of a request: cancels ``request`` when the client goes away and,
    until ``keepalive`` is stopped, sends its keep-alives. After the body, the next
    ``receive()`` returns only at disconnect; the keep-alive deadline interrupts that wait
    (the server keeps what the client sends meanwhile) and is then simply not renewed, so
    stopping the keep-alives costs no wake-up of this task."""
    while True:
        due = keepalive.due if keepalive is not None and not keepalive.stopped else math.inf
        with trio.move_on_at(due) as waiting:
            message = await receive()
            if message["type"] == "http.disconnect":
                request.cancel(reason="client disconnected")
                return
        # the deadline passed (only a live keep-alive sets one); upstream may have spoken since
        if waiting.cancelled_caught and keepalive is not None and not keepalive.stopped:
            await keepalive.send()


@attrs.define(eq=False)
class SSESink:
    """A turn's answer as an SSE stream. Events from an SSE upstream go as they were read,
    byte for byte; events from an upstream WebSocket become SSE frames (``codex.rate_limits``
    stays WebSocket-only: HTTP clients get rate limits as headers)."""

    down: Downstream
    keepalive: KeepAlive | None = None

    async def commit(self, upstream_headers: RawHeaders) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        head = response_headers(self.down.request_id, "sse", upstream=upstream_headers)
        await self.down.start(200, head)

    async def events(self, batch: Batch) -> None:
        if batch.raw is not None:
            await self.down.body(batch.raw)
            return
        for event in batch.events:
            if event.kind != RATE_LIMITS:
                await self.down.body(event.as_sse())

    async def finish(self) -> None:
        await self.down.finish()

    async def cut(self, cut: Cut) -> None:
        # the stream ends without response.completed, as a broken HTTP stream would (the
        # Codex CLI and the SDKs retry that)
        await self.down.finish()

    async def error(self, error: ProxyError) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        await self.down.error(error)


@attrs.define(eq=False)
class TranslatingStreamSink:
    """A turn's answer as another API's server-sent events: each upstream event becomes that
    API's frames (:meth:`frames`), the stream opens and closes the way that API's clients
    expect (:meth:`opening`, :meth:`closing`), and the proxy's own errors take its shape, as
    the answer when nothing was sent yet, else as a last frame (:meth:`failure`)."""

    down: Downstream
    keepalive: KeepAlive | None = attrs.field(default=None, kw_only=True)

    def frames(self, event: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def opening(self) -> bytes:
        return b""

    def closing(self, cut: Cut | None) -> bytes:
        """The last frames: after the turn's end, or after upstream broke off (``cut``)."""
        return b""

    def failure(self, error: ProxyError) -> bytes:
        raise NotImplementedError

    def shape(self, error: ProxyError) -> ProxyError:
        return error

    async def commit(self, upstream_headers: RawHeaders) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        head = response_headers(self.down.request_id, "sse", upstream=upstream_headers)
        await self.down.start(200, head)
        opening = self.opening()
        if opening:
            await self.down.body(opening)

    async def events(self, batch: Batch) -> None:
        frames = b"".join(
            self.frames(value) for event in batch.events if (value := event.json()) is not None
        )
        if frames:
            await self.down.body(frames)

    async def finish(self) -> None:
        await self._close(None)

    async def cut(self, cut: Cut) -> None:
        await self._close(cut)

    async def _close(self, cut: Cut | None) -> None:
        closing = self.closing(cut)
        if closing:
            await self.down.body(closing)
        await self.down.finish()

    async def error(self, error: ProxyError) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        shaped = self.shape(error)
        if not self.down.started:
            await self.down.json(shaped.status, shaped.body, shaped.headers)
            return
        await self.down.body(self.failure(shaped))
        await self.down.finish()


@attrs.define(eq=False)
class OneAnswerSink:
    """A turn's answer as one JSON object, made from the whole turn once it has ended: the
    events are aggregated (``protocol/aggregate.py``) and :meth:`answer` renders them. The
    Responses routes' :class:`UnarySink` and the other APIs' non-streamed sinks are ones."""

    down: Downstream
    aggregation: Aggregation = attrs.field(factory=Aggregation, kw_only=True)
    headers: RawHeaders = attrs.field(factory=list, kw_only=True)
    answered: tuple[int, str | None] | None = attrs.field(default=None, kw_only=True)

    def answer(self) -> tuple[int, dict[str, Any], str | None]:
        """The status, the JSON answer and, for an error, its code."""
        raise NotImplementedError

    def shape(self, error: ProxyError) -> ProxyError:
        """The proxy's own answer as this sink's client expects errors."""
        return error

    async def commit(self, upstream_headers: RawHeaders) -> None:
        self.headers = upstream_headers

    async def events(self, batch: Batch) -> None:
        feed = self.aggregation.feed
        for event in batch.events:
            value = event.json()
            if value is not None:
                feed(value)

    async def finish(self) -> None:
        status, value, code = self.answer()
        self.answered = (status, code)
        await self.down.json(status, value, upstream=self.headers)

    async def cut(self, cut: Cut) -> None:
        self.aggregation.cut = cut.reason
        await self.finish()

    async def error(self, error: ProxyError) -> None:
        await self.down.error(self.shape(error))


@attrs.define(eq=False)
class UnarySink(OneAnswerSink):
    """A Responses turn's answer as one JSON object: the completed response, or for a
    compaction request (``compact_input`` given) the unary compaction answer."""

    compact_input: list[Any] | None = None

    def answer(self) -> tuple[int, dict[str, Any], str | None]:
        aggregation = self.aggregation
        if self.compact_input is not None:
            status, value = aggregation.compact_answer(self.compact_input)
        else:
            status, value = aggregation.answer()
        return status, value, value["error"].get("code") if status != 200 else None
