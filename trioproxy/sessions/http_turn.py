"""HTTP turns: ``POST .../responses`` (SSE or aggregated JSON) and ``.../responses/compact``.

Each request is one nursery that owns, for exactly the request's life: the client watcher
(which also sends the keep-alives while upstream is silent) and the upstream stream (closed
on any exit).

Routes:
  codex         ``POST /backend-api/codex/responses``: the body is forwarded byte for byte
                (zstd stays zstd), the SSE stream relayed chunk by chunk.
  v1            ``POST /v1/responses``: OpenAI-style; ``stream: false`` (the default) is
                answered with the ``response`` object of ``response.completed``; the upstream
                request always streams (the Codex backend needs it) and has ``store: false``.
  compact       ``POST .../responses/compact``: upstream no longer serves the legacy endpoint
                reliably, so the proxy sends a normal streamed request whose input ends with
                ``{"type": "compaction_trigger"}`` and answers the unary ``{"output": [...]}``:
                the request's user messages followed by the compaction item.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

import attrs
import httpx
import structlog
import trio
import zstandard

from trioproxy.accounts.pool import RequestInfo
from trioproxy.admission import Overloaded
from trioproxy.logs import get_logger
from trioproxy.protocol.errors import error_envelope
from trioproxy.protocol.headers import header, passthrough_raw_headers, passthrough_response_headers
from trioproxy.protocol.sse import KEEPALIVE_FRAME, encode_event, frame_data
from trioproxy.protocol.upstream_errors import sanitize_envelope
from trioproxy.sessions.context import ProxyContext, ProxyError
from trioproxy.sessions.upstream_turn import UpstreamTurn, inspect_frame, json_bytes, run_turn
from trioproxy.web.asgi import (
    ClientGone,
    Downstream,
    Message,
    Receive,
    Scope,
    Send,
    client_host,
    read_body,
    scope_headers,
)

log = get_logger("trioproxy.http")
SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
]
_ZSTD = zstandard.ZstdDecompressor()


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def decode_json_body(raw: bytes, encoding: str | None, limit: int) -> dict[str, Any]:
    encoding = (encoding or "").strip().lower()
    try:
        if encoding == "zstd":
            raw = _ZSTD.decompressobj().decompress(raw)
            if len(raw) > limit:
                raise ProxyError(
                    413,
                    error_envelope(
                        f"Decompressed body larger than {limit} bytes.",
                        "invalid_request_error",
                        "payload_too_large",
                    ),
                )
        elif encoding not in ("", "identity"):
            raise ProxyError(
                415,
                error_envelope(
                    f"Unsupported Content-Encoding {encoding!r}; send identity or zstd.",
                    "invalid_request_error",
                    "unsupported_content_encoding",
                ),
            )
        value = json.loads(raw)
    except zstandard.ZstdError:
        raise ProxyError(
            400,
            error_envelope(
                "The zstd request body could not be decompressed.",
                "invalid_request_error",
                "invalid_body",
            ),
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise ProxyError(
            400,
            error_envelope(
                "The request body is not valid JSON.", "invalid_request_error", "invalid_json"
            ),
        ) from None
    if not isinstance(value, dict):
        raise ProxyError(
            400,
            error_envelope(
                "The request body must be a JSON object.", "invalid_request_error", "invalid_body"
            ),
        )
    return value


def as_json_body(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Raw request headers for a body the proxy rewrote as plain JSON."""
    kept = [(k, v) for k, v in headers if k not in (b"content-encoding", b"content-type")]
    return [*kept, (b"content-type", b"application/json")]


def session_key(headers: list[tuple[str, str]], conversation: str | None) -> str | None:
    """Routing's soft-affinity key: the upstream turn state, else the conversation (its
    ``bridge_key``)."""
    turn_state = header(headers, "x-codex-turn-state")
    if turn_state:
        return f"x-codex-turn-state:{turn_state}"
    return f"session:{conversation}" if conversation else None


def bridge_key(headers: list[tuple[str, str]], body: dict[str, Any]) -> str | None:
    """The conversation an HTTP request belongs to, for the bridge (``x-codex-turn-state`` is
    not one: it changes with the upstream connection)."""
    for name in ("session-id", "session_id", "conversation_id"):
        value = header(headers, name)
        if value:
            return value
    key = body.get("prompt_cache_key")
    return key if isinstance(key, str) and key else None


STREAM_INCOMPLETE = error_envelope(
    "The conversation state for previous_response_id is not available; resend the full input.",
    "upstream_error",
    "stream_incomplete",
)
HISTORY_ITEMS = frozenset(
    {"function_call", "reasoning", "custom_tool_call", "compaction", "compaction_summary"}
)


def self_contained(items: list[Any]) -> bool:
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


def normalized_input(body: dict[str, Any]) -> list[Any]:
    value = body.get("input")
    if isinstance(value, str):
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        ]
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProxyError(
            400,
            error_envelope(
                "'input' must be a string or a list of items.",
                "invalid_request_error",
                "invalid_type",
                "input",
            ),
        )
    return value


async def handle_http_responses(
    ctx: ProxyContext, scope: Scope, receive: Receive, send: Send, route: str
) -> None:
    """ASGI handler for the three HTTP routes (see module docstring).

    The lane lease wraps the whole request, and the request's nursery (client watcher,
    upstream stream) lives inside it: leaving for any reason frees the slot.

    The server reads the socket only when the app calls ``receive()``, and a disconnect
    reaches the app only after the body. So when the request must wait for its lane, a task
    of an outer nursery reads the client's messages from the start (relayed to the request
    through a small channel) and cancels everything when the client goes away: a client that
    leaves while its request waits for a lane leaves the queue at once. A request admitted at
    once reads its messages itself (no relay hop before its first byte)."""
    request_id = new_request_id()
    started = trio.current_time()
    down = Downstream(send)
    record: dict[str, Any] = {
        "time": ctx.pool.clock.now(),
        "request_id": request_id,
        "route": scope["path"],
        "transport": "http",
    }
    structlog.contextvars.bind_contextvars(request_id=request_id, route=scope["path"])
    lane = "compact" if route == "compact" else "proxy_http"
    overloaded: Overloaded | None = None

    async def admitted(client: Receive) -> Overloaded | None:
        try:
            async with ctx.admission.lease(lane):
                await _request(ctx, scope, client, down, route, record, request_id)
        except Overloaded as exc:
            return exc
        return None

    try:
        if ctx.admission.lane(lane).has_room:
            # the slot is taken at once (nothing between this check and the lease yields)
            overloaded = await admitted(receive)
        else:
            async with trio.open_nursery() as nursery:
                relay, relayed = trio.open_memory_channel[Message](RELAYED_MESSAGES)
                nursery.start_soon(_relay_client, receive, relay, nursery.cancel_scope)
                overloaded = await admitted(relayed.receive)
                nursery.cancel_scope.cancel(reason="request handled")
            if nursery.cancel_scope.cancelled_caught and not down.finished:
                record.setdefault("error_code", "client_disconnected")
        if overloaded is not None:
            record.update(status=429, error_code="proxy_overloaded")
            # the body was not read: the connection cannot carry another request
            await down.json(
                429,
                overloaded.envelope(),
                [*overloaded.headers(), ("x-request-id", request_id), ("connection", "close")],
            )
    finally:
        if record.get("status") is None:
            record["status"] = down.status if down.status is not None else 499
        record["duration_ms"] = round((trio.current_time() - started) * 1000, 1)
        if down.first_byte_at is not None:
            record["ttfb_ms"] = round((down.first_byte_at - started) * 1000, 1)
        ctx.reqlog.emit(record)
        structlog.contextvars.unbind_contextvars("request_id", "route", "account")


# client messages read ahead while a request waits for its lane (a body of up to this many
# chunks is read through, so that the disconnect after it is seen; a longer one is seen once
# the request is admitted and reads on)
RELAYED_MESSAGES = 16


async def _relay_client(
    receive: Receive, relay: trio.MemorySendChannel[Message], request: trio.CancelScope
) -> None:
    async with relay:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                request.cancel(reason="client disconnected")
                return
            await relay.send(message)


async def _request(
    ctx: ProxyContext,
    scope: Scope,
    receive: Receive,
    down: Downstream,
    route: str,
    record: dict[str, Any],
    request_id: str,
) -> None:
    """One admitted request: a nursery owning the client watcher and the turn."""
    async with trio.open_nursery() as nursery:
        try:
            await _serve(ctx, scope, receive, down, route, record, request_id, nursery)
        except ProxyError as exc:
            record["status"] = exc.status
            record["error_code"] = exc.body.get("error", {}).get("code")
            if not down.started:
                await down.error(exc, request_id)
            else:
                # a keep-alive already committed the 200: end the stream with the error
                await down.body(
                    encode_event(
                        {"type": "error", "status": exc.status, "error": exc.body["error"]}
                    )
                )
                await down.finish()
        except ClientGone:
            record["error_code"] = "client_disconnected"
        nursery.cancel_scope.cancel()
    if (
        nursery.cancel_scope.cancelled_caught
        and not down.finished
        and record.get("error_code") is None
    ):
        record["error_code"] = "client_disconnected"


async def _serve(
    ctx: ProxyContext,
    scope: Scope,
    receive: Receive,
    down: Downstream,
    route: str,
    record: dict[str, Any],
    request_id: str,
    nursery: trio.Nursery,
) -> None:
    ctx.refuse_if_draining()
    headers = scope_headers(scope)
    await ctx.authorize(headers, client_host(scope))
    content_type = (header(headers, "content-type") or "").lower()
    if "json" not in content_type:
        raise ProxyError(
            415,
            error_envelope(
                "Send the request body as application/json.",
                "invalid_request_error",
                "unsupported_media_type",
            ),
        )
    raw = await read_body(receive, ctx.settings.max_body_bytes)
    body = decode_json_body(raw, header(headers, "content-encoding"), ctx.settings.max_body_bytes)
    model = body.get("model")
    record["model"] = model if isinstance(model, str) else None
    conversation = bridge_key(headers, body)
    info = RequestInfo(session_key=session_key(headers, conversation), model=record["model"])
    streaming = True
    upstream_body = raw
    upstream_headers: list[tuple[bytes, bytes]] = scope["headers"]  # raw, names lower-case
    message = body
    if route in ("v1", "compact"):
        streaming = route == "v1" and body.get("stream") is True
        rewritten = {**body, "stream": True, "store": False, "input": normalized_input(body)}
        if route == "compact":
            rewritten["input"] = [*rewritten["input"], {"type": "compaction_trigger"}]
        message = rewritten
        upstream_body = json_bytes(rewritten)
        headers = [(k, v) for k, v in headers if k not in ("content-encoding", "content-type")]
        headers.append(("content-type", "application/json"))
        upstream_headers = as_json_body(upstream_headers)

    keepalive = KeepAlive(down, request_id, ctx.settings.keepalive_interval)
    bridges = ctx.bridges
    if bridges is not None and route != "compact":
        anchor = body.get("previous_response_id")
        session = bridges.session_for(conversation, anchor if isinstance(anchor, str) else None)
        if session is not None:
            # the bridge sends its own keep-alives (its queue and connect are silent too)
            nursery.start_soon(watch_client, receive, nursery.cancel_scope, None)
            await bridges.serve_http(
                session,
                message=message,
                headers=headers,
                record=record,
                down=down,
                request_id=request_id,
                streaming=streaming,
                keepalive=keepalive.run if streaming else None,
            )
            return

    async def serve(turn: UpstreamTurn) -> None:
        structlog.contextvars.bind_contextvars(account=turn.account.account_id)
        turn.account.in_flight += 1
        try:
            if streaming:
                await relay_sse(ctx, turn, down, record, request_id)
            else:
                await answer_unary(ctx, turn, down, record, request_id, route, body)
        finally:
            turn.learn_headers(ctx)  # (done already unless the client left before)
            turn.account.in_flight -= 1
            await turn.aclose()

    nursery.start_soon(
        watch_client, receive, nursery.cancel_scope, keepalive if streaming else None
    )
    try:
        await run_turn(ctx, info, upstream_headers, upstream_body, record, keepalive.stop, serve)
    except ProxyError as exc:
        if not (
            body.get("previous_response_id")
            and exc.body.get("error", {}).get("code") == "previous_response_not_found"
        ):
            raise
        # upstream does not hold the anchor: never hand the client a raw 400 (it would resend
        # its whole history every turn); a self-contained request goes again without it
        if not self_contained(normalized_input(body)):
            raise ProxyError(502, STREAM_INCOMPLETE) from None
        ctx.counters["anchor_dropped"] += 1
        retry = json.loads(upstream_body) if route in ("v1", "compact") else dict(body)
        retry.pop("previous_response_id", None)
        upstream_body = json_bytes(retry)
        upstream_headers = as_json_body(upstream_headers)
        await run_turn(ctx, info, upstream_headers, upstream_body, record, keepalive.stop, serve)
    finally:
        keepalive.stop()


@attrs.define(eq=False)
class KeepAlive:
    """SSE keep-alives for a streaming request while upstream is silent: one every
    ``interval`` until ``stop()`` (upstream's first event is in; from then on only upstream's
    bytes go to the client, since a frame of ours between two of its chunks could split one
    of its frames)."""

    down: Downstream
    request_id: str
    interval: float
    stopped: bool = False
    due: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.due = trio.current_time() + self.interval

    def stop(self) -> None:
        self.stopped = True

    async def send(self) -> None:
        """One keep-alive (the 200 head goes out with the first)."""
        await self.down.start(200, [*SSE_HEADERS, ("x-request-id", self.request_id)])
        await self.down.body(KEEPALIVE_FRAME)
        self.due = trio.current_time() + self.interval

    async def run(self) -> None:
        """Keep-alives until cancelled (the bridge runs this while a request waits for it)."""
        while True:
            await trio.sleep_until(self.due)
            await self.send()


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


async def relay_sse(
    ctx: ProxyContext, turn: UpstreamTurn, down: Downstream, record: dict[str, Any], request_id: str
) -> None:
    """Forward upstream bytes as they arrive; look only at the frames the proxy needs."""
    account = turn.account
    await down.start(
        200,
        [*SSE_HEADERS, ("x-request-id", request_id)],
        passthrough_raw_headers(turn.response.raw_headers),
    )
    record["status"] = 200
    for chunk in turn.held:
        await down.body(chunk)
    turn.learn_headers(ctx)
    splitter = turn.splitter

    async def forward(chunk: bytes) -> None:
        for frame in splitter.feed(chunk):
            inspect_frame(ctx, account, frame, record)
        await down.body(chunk)

    try:
        await turn.response.body.relay(forward)
    except httpx.HTTPError as exc:
        # output already reached the client: no failover; the client sees the stream end
        # without response.completed (the Codex CLI retries that)
        record["error_code"] = "upstream_stream_broken"
        log.warning("upstream stream broke mid-response", error=type(exc).__name__)
    if record.get("last_event") is None and record.get("error_code") is None:
        record["error_code"] = "stream_incomplete"
    await down.finish()


async def answer_unary(
    ctx: ProxyContext,
    turn: UpstreamTurn,
    down: Downstream,
    record: dict[str, Any],
    request_id: str,
    route: str,
    body: dict[str, Any],
) -> None:
    """Aggregate the stream into one JSON answer."""
    completed: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None
    items: list[Any] = []

    def take(frame: bytes) -> None:
        nonlocal completed, failed
        inspect_frame(ctx, turn.account, frame, record)
        event = frame_data(frame)
        if event is None:
            return
        kind = event.get("type")
        if kind == "response.output_item.done":
            items.append(event.get("item"))
        elif kind == "response.completed":
            completed = event.get("response")
        elif kind in ("response.failed", "response.incomplete", "error"):
            failed = event

    turn.learn_headers(ctx)
    first = turn.first_event
    if first.get("type") in ("response.failed", "error"):
        failed = first
    try:
        async for chunk in turn.chunks:
            for frame in turn.splitter.feed(chunk):
                take(frame)
    except httpx.HTTPError:
        pass
    headers = [
        ("x-request-id", request_id),
        *passthrough_response_headers(turn.response.headers),
    ]
    if completed is None:
        status, envelope = unary_answer(None, failed, items)
        record["status"] = status
        record["error_code"] = envelope["error"]["code"]
        await down.json(status, envelope, headers)
        return
    record["status"] = 200
    if route == "compact":
        output = completed.get("output") or items
        retained = [
            i
            for i in normalized_input(body)
            if isinstance(i, dict)
            and i.get("type", "message") == "message"
            and i.get("role") == "user"
        ]
        compaction = [
            i
            for i in output
            if isinstance(i, dict) and i.get("type") in ("compaction", "compaction_summary")
        ]
        await down.json(200, {"output": [*retained, *compaction]}, headers)
        return
    await down.json(200, completed, headers)


def unary_answer(
    completed: dict[str, Any] | None, failed: dict[str, Any] | None, items: list[Any]
) -> tuple[int, dict[str, Any]]:
    """The aggregated answer of a non-streaming request: the completed response, or a 502
    envelope (sanitized) saying why there is none."""
    if completed is not None:
        return 200, completed
    error = (
        (failed or {}).get("error")
        or ((failed or {}).get("response") or {}).get("error")
        or {
            "message": "Upstream ended the stream before response.completed.",
            "type": "upstream_error",
            "code": "stream_incomplete",
        }
    )
    return 502, sanitize_envelope(
        {
            "error": {
                "message": error.get("message", ""),
                "type": error.get("type", "upstream_error"),
                "code": error.get("code"),
                "param": None,
            }
        }
    )
