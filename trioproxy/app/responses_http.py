"""The HTTP front of the Responses API: ``POST .../responses`` and ``.../responses/compact``.

An adapter onto the conversation core: it admits the request, checks and parses it, and runs
its turn on a :class:`~trioproxy.sessions.conversation.Conversation` (a bridge session's
when the request belongs to one, else a plain HTTP conversation of one turn), rendering the
answer with an SSE or a JSON sink (``app/downstream.py``).

Routes:
  codex         ``POST /backend-api/codex/responses``: the body is forwarded byte for byte
                (zstd stays zstd), the SSE stream relayed as it arrives.
  v1            ``POST /v1/responses``: OpenAI-style; ``stream: false`` (the default) is
                answered with the ``response`` object of ``response.completed``; the upstream
                request always streams (the Codex backend needs it) and has ``store: false``.
  compact       ``POST .../responses/compact``: upstream no longer serves the legacy endpoint
                reliably, so the proxy sends a normal streamed request whose input ends with
                ``{"type": "compaction_trigger"}`` and answers the unary ``{"output": [...]}``:
                the request's user messages followed by the compaction item.

Other client APIs (``app/fronts.py``: Chat Completions, Anthropic Messages) come through the
same handler with a :class:`~trioproxy.app.fronts.Front` that translates their request into
a Responses request, renders the answer in their format with a sink of its own and shapes
the proxy's errors as their clients expect; admission, keys, routing, failover and
accounting are this handler's and the core's, the same for every front.

A request is checked (drain, API key, content type), read and parsed before it takes a slot
of its lane, so a client that trickles its body never holds one (the server cuts it at
``body_min_rate``). What parsing costs (``protocol.requests.parse_cost``) is charged to the
server's request-memory budget for as long as the request runs: ``429 proxy_overloaded``
(``x-trioproxy-overload: memory``) when the budget cannot take it now, 413 when it never could.

Resource handling: the memory reservation wraps the whole request and the lane lease its
turn; the request's nursery (the client watcher, the turn) lives inside both: leaving for
any reason gives back the memory and frees the slot.
"""

from __future__ import annotations

import secrets
from typing import Any

import attrs
import structlog
import trio

from trioproxy.accounts.pool import RequestInfo
from trioproxy.admission import Overloaded
from trioproxy.app.downstream import (
    ClientGone,
    Downstream,
    KeepAlive,
    SSESink,
    UnarySink,
    read_body,
    watch_client,
)
from trioproxy.app.edge import client_of
from trioproxy.app.fronts import Front
from trioproxy.app.key_view import sink_for
from trioproxy.app.request_memory import charge, request_memory
from trioproxy.keys.ring import Client
from trioproxy.protocol.continuation import History, scope_mark
from trioproxy.protocol.errors import ProxyError
from trioproxy.protocol.headers import Headers, header
from trioproxy.protocol.requests import (
    TurnRequest,
    conversation_key,
    decode_json_body,
    normalized_input,
    routing_key,
)
from trioproxy.reqlog import RequestRecord
from trioproxy.sessions.bridge import BridgeRegistry, BridgeSession
from trioproxy.sessions.context import ProxyContext
from trioproxy.sessions.conversation import HTTP_LOST_ANCHOR, Conversation
from trioproxy.sessions.sinks import Sink
from trioproxy.web.asgi import Message, Receive, Scope, Send, scope_headers
from trioproxy.web.budget import Reservation

# client messages read ahead while a request waits for its lane (its body has been read: only
# the disconnect can come)
RELAYED_MESSAGES = 1


def is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` is ``application/json`` (with any parameters). Nothing
    else is taken as JSON: a browser may send ``text/plain`` (even ``text/plain;
    charset=json``) across origins without asking first."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def new_record(ctx: ProxyContext, request_id: str, route: str, transport: str) -> RequestRecord:
    return RequestRecord(
        ctx.pool.clock.now(), request_id, route, transport, started=trio.current_time()
    )


async def handle_http_responses(
    ctx: ProxyContext,
    bridges: BridgeRegistry | None,
    scope: Scope,
    receive: Receive,
    send: Send,
    route: str,
    front: Front | None = None,
) -> None:
    """ASGI handler for the HTTP routes (see module docstring); ``front`` translates another
    client API onto the Responses API.

    The server reads the socket only when the app calls ``receive()``. So when the request
    must wait for its lane, a task of an outer nursery reads the client's messages (relayed
    to the request through a small channel) and cancels everything when the client goes
    away: a client that leaves while its request waits for a lane leaves the queue at once.
    A request admitted at once reads its messages itself (no relay hop before its first
    byte)."""
    request_id = new_request_id()
    down = Downstream(send, request_id)
    record = new_record(ctx, request_id, scope["path"], "http")
    record.client = client_of(scope)[0]
    structlog.contextvars.bind_contextvars(
        request_id=request_id, route=scope["path"], client=record.client
    )
    lane = "compact" if route == "compact" else "proxy_http"
    overloaded: Overloaded | None = None  # (unset when the client left while queued)

    exchange = _Exchange(ctx, bridges, scope, route, down, record, front)
    shape = front.shape if front is not None else _as_is

    async def admitted(client: Receive, prepared: _Prepared) -> Overloaded | None:
        try:
            async with ctx.admission.lease(lane), prepared.client.request_slot():
                await exchange.run(client, prepared)
        except Overloaded as exc:
            return exc
        return None

    try:
        with request_memory(scope) as memory:
            try:
                prepared = await exchange.prepare(receive, memory)
            except ProxyError as exc:
                record.fail(exc.status, exc.code)
                await down.error(shape(exc))
                return
            except Overloaded as exc:
                overloaded = exc
            except ClientGone:
                record.note_error("client_disconnected")
                return
            else:
                if ctx.admission.lane(lane).has_room:
                    # the slot is taken at once (nothing between this check and the lease
                    # yields)
                    overloaded = await admitted(receive, prepared)
                else:
                    async with trio.open_nursery() as nursery:
                        relay, relayed = trio.open_memory_channel[Message](RELAYED_MESSAGES)
                        nursery.start_soon(_relay_client, receive, relay, nursery.cancel_scope)
                        overloaded = await admitted(relayed.receive, prepared)
                        nursery.cancel_scope.cancel(reason="request handled")
                    if nursery.cancel_scope.cancelled_caught and not down.finished:
                        record.note_error("client_disconnected")
        if overloaded is not None:
            record.fail(429, overloaded.code)
            refusal = shape(ProxyError(429, overloaded.envelope(), overloaded.headers()))
            await down.json(refusal.status, refusal.body, refusal.headers)
    finally:
        if record.status is None and down.status is not None:
            record.status = down.status
        record.end()
        ctx.finish(record)
        structlog.contextvars.unbind_contextvars("request_id", "route", "account", "client")


def _as_is(error: ProxyError) -> ProxyError:
    return error


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


@attrs.frozen
class _Prepared:
    """A request read and parsed, ready for its turn."""

    headers: Headers
    body: dict[str, Any]
    request: TurnRequest
    client: Client


@attrs.define(eq=False)
class _Exchange:
    """One admitted request: its nursery owns the client watcher and the turn."""

    ctx: ProxyContext
    bridges: BridgeRegistry | None
    scope: Scope
    route: str
    down: Downstream
    record: RequestRecord
    front: Front | None = None

    async def prepare(self, receive: Receive, memory: Reservation | None) -> _Prepared:
        """The request checked, read and parsed, before it takes a slot of its lane: a client
        that trickles its body holds no slot (the server cuts it at ``body_min_rate``), and
        the parse is charged to ``memory`` (``Overloaded`` when the budget cannot take it,
        413 when it never could)."""
        ctx, scope, route, record = self.ctx, self.scope, self.route, self.record
        ctx.refuse_if_draining()
        headers = scope_headers(scope)
        client = ctx.authorize(headers, *client_of(scope))
        record.key_id = client.key_id
        if not is_json(header(headers, "content-type")):
            raise ProxyError.of(
                415, "Send the request body as application/json.", "unsupported_media_type"
            )
        limit = ctx.settings.max_body_bytes
        raw = await read_body(receive, limit)

        def charge_parse(cost: int) -> None:
            charge(memory, cost, ctx.settings.overload_retry_after)

        body = decode_json_body(raw, header(headers, "content-encoding"), limit, charge_parse)
        if self.front is not None:
            request = translated_request(self.front, body, scope["headers"])
        else:
            request = turn_request(route, body, raw, scope["headers"])
        request = request.aliased(ctx.aliases)
        record.model = request.model
        record.prewarm = body.get("generate") is False
        client.check(request.model, request.effort, ctx.pool.clock.now())
        return _Prepared(headers, body, request, client)

    async def run(self, receive: Receive, prepared: _Prepared) -> None:
        down, record = self.down, self.record
        async with trio.open_nursery() as nursery:
            try:
                await self.serve(receive, prepared, nursery)
            except ProxyError as exc:  # refused before its turn (the turn answers on its own)
                record.fail(exc.status, exc.code)
                await down.error(self.front.shape(exc) if self.front is not None else exc)
            except ClientGone:
                record.note_error("client_disconnected")
            nursery.cancel_scope.cancel()
        if nursery.cancel_scope.cancelled_caught and not down.finished:
            record.note_error("client_disconnected")

    async def serve(self, receive: Receive, prepared: _Prepared, nursery: trio.Nursery) -> None:
        ctx, route, down, record = self.ctx, self.route, self.down, self.record
        headers, body, request = prepared.headers, prepared.body, prepared.request
        front = self.front
        if front is not None:
            streaming = front.streams(body)
        else:
            streaming = route == "codex" or (route == "v1" and body.get("stream") is True)
        keepalive = KeepAlive(down, ctx.settings.keepalive_interval) if streaming else None
        sink: Sink
        if front is not None:
            sink = front.sink(down, keepalive, streaming, body, request.body)
        elif streaming:
            sink = SSESink(down, keepalive)
        else:
            sink = UnarySink(down, request.input if route == "compact" else None)
        nursery.start_soon(watch_client, receive, nursery.cancel_scope, keepalive)
        client = prepared.client
        bridges = self.bridges
        session: BridgeSession | None
        key: str | None
        if front is not None:
            session, request, key = self.translated_conversation(request, headers, client)
        else:
            key = conversation_key(headers, body)
            session = (
                bridges.session_for(key, request.anchor, client.key_id, client.accounts)
                if bridges is not None and route != "compact"
                else None
            )
        view = sink_for(client, sink, ctx.pool.clock)
        if bridges is not None and session is not None:
            await bridges.serve(session, request, headers, view, record)
        else:
            info = RequestInfo(
                session_key=routing_key(headers, key), model=request.model, accounts=client.accounts
            )
            await Conversation.over_http(ctx, info, HTTP_LOST_ANCHOR).turn(request, view, record)
        answered = getattr(sink, "answered", None)  # a one-answer sink: the status it gave
        if answered is not None and answered[0] != 200:
            record.fail(*answered)

    def translated_conversation(
        self, request: TurnRequest, headers: Headers, client: Client
    ) -> tuple[BridgeSession | None, TurnRequest, str | None]:
        """Where another API's request (its whole history, resent) is served: as the
        continuation of a bridge session's last turn when it continues one, else whole on
        the session of its conversation key (a ``session-id`` header) or, when it is a later
        turn of a conversation, of its opening, if that session is free; else over plain
        HTTP (``sessions/bridge.py``). Also the request with the digest of its history (for
        the turn it starts to be continued) and with a ``prompt_cache_key`` when it has
        none (its conversation's opening: the same on every turn); and the key routing
        goes by (the ``prompt_cache_key``, so every turn of the conversation prefers one
        account, over plain HTTP and the bridge alike)."""
        history = History.of(scope_mark(client.key_id, request.model), request.input)
        opening = history.key()
        request.history = history.whole
        if not isinstance(request.body.get("prompt_cache_key"), str):
            request.body["prompt_cache_key"] = f"trioproxy-{opening}"
        key = conversation_key(headers, request.body)
        bridges = self.bridges
        if bridges is None or request.anchor is not None:
            return None, request, key
        found = bridges.continuation(request, history)
        if found is not None:
            return found[0], found[1], key
        named = conversation_key(headers, {})
        if named is None and not history.continues:
            return None, request, key  # a first turn: nothing to continue yet
        session = bridges.session_for(
            named or opening,
            None,
            client.key_id,
            client.accounts,
            wait=named is not None,
            routing=routing_key(headers, key),
        )
        return session, request, key


def translated_request(
    front: Front, body: dict[str, Any], raw_headers: list[tuple[bytes, bytes]]
) -> TurnRequest:
    """Another client API's request as the core takes it: translated by its front into the
    streamed Responses request upstream needs."""
    translated = {**front.translate(body), "stream": True, "store": False}
    items = normalized_input(translated)
    return TurnRequest({**translated, "input": items}, items, None, raw_headers)


def turn_request(
    route: str, body: dict[str, Any], raw: bytes, raw_headers: list[tuple[bytes, bytes]]
) -> TurnRequest:
    """The route's request as the core takes it: a Codex request as it came (forwarded byte
    for byte), an OpenAI-style or compaction one rewritten as the streamed request upstream
    needs."""
    items = normalized_input(body)
    if route == "codex":
        return TurnRequest(body, items, raw, raw_headers)
    rewritten = {**body, "stream": True, "store": False, "input": items}
    if route == "compact":
        rewritten["input"] = [*items, {"type": "compaction_trigger"}]
    return TurnRequest(rewritten, items, None, raw_headers)
