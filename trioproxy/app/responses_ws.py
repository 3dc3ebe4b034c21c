"""The WebSocket front of the Responses API (``/backend-api/codex/responses`` and
``/v1/responses``).

An adapter onto the conversation core: a downstream WebSocket session is one nursery that
owns, for exactly its own life, its lane lease, its
:class:`~trioproxy.sessions.conversation.Conversation` (and with it the upstream WebSocket,
closed when the session leaves), the task reading the client, the conversation's idle timer,
the task reading the upstream socket between turns (``Conversation.keep_link``) and the
drain watcher. Leaving it for any reason (the client leaves, an error, idle, drain,
shutdown) releases all of them.

The upstream connection is opened before the client's handshake is accepted, so upstream's
handshake headers (turn state, rate limits, models etag) reach the client in its 101, and a
pool that cannot serve refuses the upgrade with an HTTP answer (429/503). Turns run one at a
time, in order (one ``response.create`` in flight per socket, as the Codex CLI does); each
turn's answer goes to the client through :class:`WsSink`. A notification (the Codex CLI's
``response.processed``) is no turn: the conversation relays or drops it
(``Conversation.notify``), nothing is answered, and the session goes on. Any other message
gets an ``invalid_message`` error event (upstream would refuse it too, and an answer of
upstream's outside a turn could not be told from the next turn's), and the session goes on.
"""

from __future__ import annotations

import json
import sys

import attrs
import structlog
import trio

from trioproxy.accounts.pool import RequestInfo
from trioproxy.admission import Overloaded
from trioproxy.app.edge import answer, client_of
from trioproxy.app.key_view import headers_for, sink_for
from trioproxy.app.request_memory import charge, request_memory
from trioproxy.app.responses_http import new_record, new_request_id
from trioproxy.keys.ring import Client
from trioproxy.protocol.errors import ProxyError
from trioproxy.protocol.events import Batch
from trioproxy.protocol.headers import RawHeaders, response_headers
from trioproxy.protocol.requests import (
    TurnRequest,
    conversation_key,
    normalized_input,
    parse_cost,
    routing_key,
)
from trioproxy.sessions.context import ProxyContext
from trioproxy.sessions.conversation import RELAYED_MESSAGES, WS_LOST_ANCHOR, Conversation
from trioproxy.sessions.sinks import Cut
from trioproxy.web.asgi import Receive, Scope, Send, scope_headers

INVALID_MESSAGE = ProxyError.of(
    400, "Send JSON text frames of type response.create.", "invalid_message"
)
INVALID_FRAME = ProxyError.of(
    400, "Binary frames are not supported; send JSON text frames.", "invalid_frame"
)


async def deny(scope: Scope, send: Send, error: ProxyError, request_id: str | None) -> None:
    """Refuse an upgrade with an HTTP answer (the ASGI WebSocket denial extension)."""
    await answer(scope, send, error, request_id)


@attrs.define(eq=False)
class WsSink:
    """A turn's answer as WebSocket messages: each event one text message, the proxy's own
    errors as ``error`` events; an upstream cut after output closes the client's socket
    the way upstream closed ours (the Codex CLI reconnects and resends)."""

    send: Send
    closed: bool = False

    async def text(self, text: str) -> None:
        await self.send({"type": "websocket.send", "text": text})

    async def commit(self, upstream_headers: RawHeaders) -> None:
        pass  # the handshake carried upstream's headers

    async def events(self, batch: Batch) -> None:
        for event in batch.events:
            await self.text(event.as_message())

    async def finish(self) -> None:
        pass

    async def cut(self, cut: Cut) -> None:
        code = 1011 if cut.code in (None, 1006, 1011) else cut.code
        self.closed = True
        await self.send({"type": "websocket.close", "code": code})

    async def error(self, error: ProxyError) -> None:
        await self.text(json.dumps(error.ws_event()))


async def handle_ws_responses(
    ctx: ProxyContext, scope: Scope, receive: Receive, send: Send
) -> None:
    """ASGI handler for a downstream WebSocket session."""
    request_id = new_request_id()
    structlog.contextvars.bind_contextvars(
        request_id=request_id, route=scope["path"], transport="ws", client=client_of(scope)[0]
    )
    try:
        if (await receive())["type"] != "websocket.connect":
            return
        headers = scope_headers(scope)
        try:
            ctx.refuse_if_draining()
            client = ctx.authorize(headers, *client_of(scope))
            client.check_budget(ctx.pool.clock.now())
        except ProxyError as exc:
            await deny(scope, send, exc, request_id)
            return
        accepted = False
        async with trio.open_nursery() as nursery:
            # until the handshake is accepted, a task waits for the client's disconnect (the
            # only message it can send then), so a client gone while its upgrade waits for
            # the lane, a token refresh or the upstream connect ends the attempt at once
            before_accept = trio.CancelScope()
            nursery.start_soon(_leave_on_disconnect, receive, before_accept, nursery.cancel_scope)
            try:
                async with ctx.admission.lease("proxy_websocket"), client.session_slot():
                    accepted = True
                    await _session(
                        ctx, client, scope, receive, send, headers, request_id, before_accept
                    )
            except Overloaded as exc:
                if accepted:
                    raise
                # a full lane refuses the upgrade with an HTTP answer, never an accepted socket
                await deny(scope, send, ProxyError(429, exc.envelope(), exc.headers()), request_id)
            nursery.cancel_scope.cancel(reason="upgrade handled")
    finally:
        structlog.contextvars.unbind_contextvars(
            "request_id", "route", "transport", "account", "client"
        )


async def _leave_on_disconnect(
    receive: Receive, watching: trio.CancelScope, attempt: trio.CancelScope
) -> None:
    with watching:  # cancelled right before the accept: the session's reader takes over
        while (await receive())["type"] != "websocket.disconnect":
            pass
        attempt.cancel(reason="client left before the handshake completed")


async def _session(
    ctx: ProxyContext,
    client: Client,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: list[tuple[str, str]],
    request_id: str,
    before_accept: trio.CancelScope,
) -> None:
    """One admitted session (see the module docstring). ``before_accept`` (the disconnect
    watcher of the handshake) is cancelled just before the accept."""
    ctx.counters["websocket_sessions"] += 1
    info = RequestInfo(
        session_key=routing_key(headers, conversation_key(headers, {})), accounts=client.accounts
    )
    conversation = Conversation.over_websocket(
        ctx, info, WS_LOST_ANCHOR, headers, ctx.settings.ws_idle_timeout
    )
    try:
        if not await _accept(ctx, client, conversation, scope, send, request_id, before_accept):
            return
        await _serve_turns(ctx, client, conversation, scope, receive, WsSink(send))
    finally:
        await conversation.aclose()


async def _accept(
    ctx: ProxyContext,
    client: Client,
    conversation: Conversation,
    scope: Scope,
    send: Send,
    request_id: str,
    before_accept: trio.CancelScope,
) -> bool:
    """Connect upstream, then answer the client's handshake: a 101 with upstream's headers,
    or the HTTP answer of a pool that cannot serve. (Its own frame: nothing of the handshake
    stays referenced for the session's life.)"""
    try:
        handshake = await conversation.connect(new_record(ctx, request_id, "connect", "ws"))
    except ProxyError as exc:
        await deny(scope, send, exc, request_id)
        return False
    before_accept.cancel()
    upstream = headers_for(client, handshake, ctx.pool.clock)
    head = response_headers(request_id, "upgrade", upstream=upstream)
    await send({"type": "websocket.accept", "headers": head})
    return True


async def _serve_turns(
    ctx: ProxyContext,
    client: Client,
    conversation: Conversation,
    scope: Scope,
    receive: Receive,
    sink: WsSink,
) -> None:
    """The accepted session: the client's messages, one turn at a time."""
    idle = conversation.idle
    assert idle is not None
    retry_after = ctx.settings.overload_retry_after
    inbox_send, inbox = trio.open_memory_channel[tuple[str, int]](4)
    # what the session's queued and running messages cost: each from the moment it is read
    # to the end of its turn (the server stops counting a message once it is handed over)
    with request_memory(scope) as memory, trio.CancelScope() as session:

        async def read_client() -> None:
            async with inbox_send:
                while True:
                    event = await receive()
                    if event["type"] == "websocket.disconnect":
                        session.cancel(reason="client disconnected")
                        return
                    text = event.get("text")
                    if text is None:
                        if event.get("bytes") is not None:
                            await sink.error(INVALID_FRAME.copy())
                        continue
                    if len(text) > ctx.settings.max_body_bytes:
                        await sink.send({"type": "websocket.close", "code": 1009})
                        session.cancel(reason="message too big")
                        return
                    cost = sys.getsizeof(text) + parse_cost(text)
                    try:
                        charge(memory, cost, retry_after)
                    except Overloaded as exc:
                        await sink.error(ProxyError(429, exc.envelope(), exc.headers()))
                        continue
                    except ProxyError as error:
                        await sink.error(error)
                        continue
                    idle.begin()  # pending from the moment it is read
                    await inbox_send.send((text, cost))

        async def reap() -> None:
            # 1000 between turns: the Codex CLI opens a new socket on its next turn
            ctx.counters["websocket_idle_closed"] += 1
            await sink.send({"type": "websocket.close", "code": 1000, "reason": "idle"})
            session.cancel(reason="idle")

        async def drain() -> None:
            # shutdown: an idle session closes now, a busy one right after its turn; 1001 is
            # a close the Codex CLI recovers from by reconnecting (elsewhere)
            await ctx.drain_started.wait()
            while idle.busy_count:
                await idle.settled.wait()
            await sink.send(
                {"type": "websocket.close", "code": 1001, "reason": "server shutting down"}
            )
            session.cancel(reason="draining")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_client)
            nursery.start_soon(idle.run, reap)
            nursery.start_soon(conversation.keep_link)  # the upstream socket between turns
            nursery.start_soon(drain)
            async for text, cost in inbox:
                try:
                    await _turn(ctx, client, conversation, scope, text, sink)
                finally:
                    idle.end()
                    if memory is not None:
                        memory.give_back(cost)  # the turn is done with the message
                if sink.closed:
                    break
            nursery.cancel_scope.cancel(reason="session over")


async def _turn(
    ctx: ProxyContext,
    client: Client,
    conversation: Conversation,
    scope: Scope,
    text: str,
    sink: WsSink,
) -> None:
    """One client message: a turn, with its own request-log record; a notification
    (``response.processed``) is the conversation's to relay or drop
    (``Conversation.notify``), with no answer and no record."""
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    kind = message.get("type") if isinstance(message, dict) else None
    if isinstance(message, dict) and kind in RELAYED_MESSAGES:
        await conversation.notify(message, text)
        return
    record = new_record(ctx, new_request_id(), scope["path"], "ws")
    record.client = client_of(scope)[0]
    record.key_id = client.key_id
    try:
        if not isinstance(message, dict) or kind != "response.create":
            error = INVALID_MESSAGE.copy()
            record.fail(error.status, error.code)
            await sink.error(error)
            return
        try:
            items = normalized_input(message)
            request = TurnRequest(message, items, ws_text=text).aliased(ctx.aliases)
            record.model = request.model
            record.prewarm = message.get("generate") is False
            client.check(request.model, request.effort, ctx.pool.clock.now())
            async with client.request_slot():
                await conversation.turn(request, sink_for(client, sink, ctx.pool.clock), record)
        except Overloaded as exc:
            error = ProxyError(429, exc.envelope(), exc.headers())
            record.fail(error.status, error.code)
            await sink.error(error)
        except ProxyError as error:
            record.fail(error.status, error.code)
            await sink.error(error)
    finally:
        record.end()
        ctx.finish(record)
