"""The conversation core: one conversation's turns, whichever client front they come from.

A :class:`Conversation` is what the proxy knows of one conversation upstream:

* its routing: the session key and the affinity (``protocol/affinity.py``) that says
  whether a new upstream connection may go to another account;
* for a conversation served over an upstream WebSocket (a downstream WebSocket session, an
  HTTP bridge session): that socket (:class:`~trioproxy.sessions.links.WsLink`), the response
  ids it holds, the response chain (``protocol/chain.py``) that can rebuild a turn whose
  anchor the socket does not hold, and the idle timer of its owner;
* for a plain HTTP turn: nothing kept; each request is a conversation of one turn.

``turn(request, sink, record)`` runs one turn through the failover engine
(``sessions/failover.py``) and writes its answer to ``sink`` (``sessions/sinks.py``):
whatever happens, the sink gets the turn's events or one error, and the method returns.

Re-anchoring: a turn whose ``previous_response_id`` the upstream connection at hand does not
hold (the socket was replaced, the pin was reset, upstream answered
``previous_response_not_found``) is sent without it, with its whole input rebuilt from the
chain, and the client sees an ordinary turn. When the chain cannot rebuild it, a request that
carries its own history goes without the anchor, and any other gets ``lost_anchor``: the
WebSocket client's recovery signal (``400 previous_response_not_found``), or ``502
stream_incomplete`` for HTTP clients (see docs/continuity.md).

Continuations: a request whose resent history continues the conversation's last turn
(``protocol/continuation.py``; the HTTP bridge finds them, ``sessions/bridge.py``) comes as
that turn's continuation, anchored on its response with only the new items, and carries the
client's whole request (``TurnRequest.whole``). When the anchor cannot be used, the whole
request is sent instead, without anchor: never re-anchored from the chain, never an error.
A turn whose request carries a history digest leaves the digest of its input and output
(``history``) for the next request to be matched against.

Durable chains (``sessions/durable.py``, with PostgreSQL): a conversation kept on an upstream
WebSocket also hands every turn it remembers to the database's writer, under its
``durable_id``. A turn whose anchor neither the socket nor the local chain knows first asks
the database (``recall``, once per turn, bounded in time): the turns found are added to the
local chain (a plain HTTP turn gets a chain of its own for that turn), the conversation takes
the stored conversation's id, so its next turns extend it, and the turn is rebuilt as any
other. Nothing found, or the database failing, leaves the turn as it would be without.

Client notifications (``RELAYED_MESSAGES``: a WebSocket client's ``response.processed``, which
says it has handled a response) are no turns and go to :meth:`Conversation.notify`: one about
a response the upstream socket at hand holds is relayed on it (upstream answers nothing); one
about a response of a socket since replaced is dropped. Nothing is answered to the client
either way, and the session goes on.

Between turns (``keep_link``): the upstream socket is read by a task of the owner's nursery,
so upstream's pings are answered (a server that closes sockets that stop answering keeps
this one) and an upstream close is noticed at once: the socket is dropped, and the next turn
opens a new one and re-anchors. A turn (and ``connect``) takes the socket from that reader:
it cancels the reader's read and waits until the reader has stopped (``_taken``); the reader
resumes when the turn gives the socket back. Nothing is lost in the handover (the socket's
reads are cancellation-safe, ``upstream/ws.py``). A message upstream sends between turns
(none is expected) is kept for the next turn to read, and the socket is not read again until
then, so such messages cannot pile up.

Resource handling: the conversation's owner (a WebSocket session's nursery, a bridge
session's task) runs its idle timer and its between-turns reader, and calls ``aclose()`` when
it leaves, whatever the reason; that closes the upstream socket. A turn interrupted while its
response is in flight (the client left, a cancellation) drops the socket at once: its state
is unknown, and the next turn re-anchors on a new one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import attrs
import trio

from trioproxy.accounts.pool import Account, RequestInfo
from trioproxy.logs import get_logger
from trioproxy.protocol import continuation, echoed
from trioproxy.protocol.affinity import Event
from trioproxy.protocol.chain import Node, ResponseChain
from trioproxy.protocol.errors import ProxyError
from trioproxy.protocol.failures import Kind, UpstreamFailure
from trioproxy.protocol.headers import RawHeaders
from trioproxy.protocol.requests import TurnRequest, self_contained
from trioproxy.reqlog import RequestRecord
from trioproxy.sessions import failover
from trioproxy.sessions.context import ProxyContext
from trioproxy.sessions.delivery import TurnObserver, deliver
from trioproxy.sessions.failover import Access, Routing
from trioproxy.sessions.idle import IdleTimer
from trioproxy.sessions.links import TurnStream, WsLink, WsTurn, connect_ws, open_sse
from trioproxy.sessions.sinks import Sink
from trioproxy.upstream.ws import UpstreamClosed

log = get_logger("trioproxy.conversation")

#: what a client gets when a turn's anchor can be neither used nor rebuilt: a WebSocket
#: client (the Codex CLI) reconnects and resends its history on this error; an HTTP client
#: gets a retryable 502 instead of an error that names an upstream id
WS_LOST_ANCHOR = ProxyError.of(
    400,
    "The conversation state for previous_response_id is no longer available; resend the full input.",
    "previous_response_not_found",
    param="previous_response_id",
)
HTTP_LOST_ANCHOR = ProxyError.of(
    502,
    "The conversation state for previous_response_id is not available; resend the full input.",
    "stream_incomplete",
    type_="upstream_error",
)
#: client messages relayed upstream when the socket at hand holds the response they name
RELAYED_MESSAGES = frozenset({"response.processed"})
SESSION_GONE = ProxyError.of(
    502,
    "The session ended before serving this request; retry.",
    "upstream_unavailable",
    type_="upstream_error",
)


@attrs.define(eq=False)
class Conversation:
    """One conversation upstream (see the module docstring)."""

    ctx: ProxyContext
    routing: Routing
    lost_anchor: ProxyError  # the answer when an anchor can be neither used nor rebuilt
    headers: Sequence[tuple[str, str]] = ()  # client headers for an upstream handshake
    websocket: bool = False  # turns go over an upstream WebSocket (else over HTTP)
    chain: ResponseChain | None = None
    idle: IdleTimer | None = None
    link: WsLink | None = None
    closed: bool = False
    last_response_id: str | None = None
    durable_id: str | None = None  # its chain's name in the database (made when first written)
    # the running digest of the last completed turn's whole input and output, when its
    # request had one (``protocol/continuation.py``): what a resent history continues
    history: bytes | None = None
    # the socket's handover between the between-turns reader and the turns (keep_link)
    _reading: trio.CancelScope | None = attrs.field(default=None, init=False)  # its read
    _takers: int = attrs.field(default=0, init=False)  # turns holding or awaiting the socket
    _reader: trio.Lock = attrs.field(factory=trio.Lock, init=False)  # held while it reads
    _given_back: trio.Event = attrs.field(factory=trio.Event, init=False)  # it may read again

    @classmethod
    def over_http(cls, ctx: ProxyContext, info: RequestInfo, lost_anchor: ProxyError) -> Self:
        """A plain HTTP turn: a conversation of one turn, keeping nothing."""
        return cls(ctx, Routing(info), lost_anchor)

    @classmethod
    def over_websocket(
        cls,
        ctx: ProxyContext,
        info: RequestInfo,
        lost_anchor: ProxyError,
        headers: Sequence[tuple[str, str]],
        idle_timeout: float,
    ) -> Self:
        """A conversation kept on an upstream WebSocket, with its history for re-anchoring."""
        chain = ResponseChain(max_bytes=ctx.settings.reanchor_max_bytes, budget=ctx.chain_budget)
        return cls(
            ctx,
            Routing(info),
            lost_anchor,
            headers,
            websocket=True,
            chain=chain,
            idle=IdleTimer(idle_timeout),
        )

    async def connect(self, record: RequestRecord) -> RawHeaders:
        """Open the upstream socket now (a WebSocket session does, before it answers its
        client's handshake); its handshake headers. Raises :class:`ProxyError` with the
        answer when no account can serve."""
        prefer = self.issuer(self.headers)
        attempt = _Connect(self, record)
        async with self._taken():
            await failover.run(self.ctx, self.routing, attempt, record, slots=False, prefer=prefer)
        assert self.link is not None
        return self.link.headers

    async def turn(self, request: TurnRequest, sink: Sink, record: RequestRecord) -> None:
        """Run one turn; its answer goes to ``sink`` (see the module docstring)."""
        async with self._taken():
            await self._turn(request, sink, record)

    async def _turn(self, request: TurnRequest, sink: Sink, record: RequestRecord) -> None:
        record.model = request.model
        if request.anchor is None:
            self.routing.step(Event.UNANCHORED_REQUEST)
        await self._rotate_if_old()
        attempt = _Turn(self, request, sink, record)
        try:
            if self.closed:
                raise SESSION_GONE.copy()
            info = self.routing.for_model(request.model)
            prefer = self.issuer(self.headers if self.websocket else request.http_headers)
            await failover.run(self.ctx, self.routing, attempt, record, info=info, prefer=prefer)
        except ProxyError as answer:
            record.fail(answer.status, answer.code)
            await sink.error(answer)
        finally:
            if attempt.on_socket is not None and not attempt.on_socket.ended:
                await self.drop_link()  # a response is in flight on it: its state is unknown

    def issuer(
        self, headers: Sequence[tuple[str, str]] | Sequence[tuple[bytes, bytes]]
    ) -> str | None:
        """The account that issued the turn state ``headers`` echo, if the proxy marked it
        and the account is in the pool (``protocol/echoed.py``)."""
        tag = echoed.issuer_tag(headers)
        if tag is None:
            return None
        return next((a for a in self.ctx.pool.accounts if echoed.account_tag(a) == tag), None)

    async def notify(self, message: dict[str, Any], text: str) -> bool:
        """A client message that is not a turn (see the module docstring); whether it went
        upstream."""
        link = self.link
        kind = message.get("type")
        rid = message.get("response_id")
        if (
            link is None
            or kind not in RELAYED_MESSAGES
            or not isinstance(rid, str)
            or rid not in link.owned
        ):
            self.ctx.counters["client_messages_dropped"] += 1
            log.info("client message not relayed", type=str(kind)[:64])
            return False
        try:
            await link.socket.send_text(text)  # (a write: the between-turns reader reads on)
        except UpstreamClosed:
            async with self._taken():
                if self.link is link:
                    await self.drop_link()  # the next turn opens a new one
            return False
        self.ctx.counters["client_messages_relayed"] += 1
        return True

    async def _rotate_if_old(self) -> None:
        """Replace the upstream socket between turns before upstream's own age limit cuts a
        turn (the same account: the affinity is kept; the next turn re-anchors)."""
        link = self.link
        if link is None:
            return
        if trio.current_time() - link.opened_at > self.ctx.settings.upstream_ws_max_age:
            self.ctx.counters["upstream_rotated"] += 1
            await self.drop_link()

    @asynccontextmanager
    async def _taken(self) -> AsyncIterator[None]:
        """Hold the upstream socket, taken from the between-turns reader: its read is
        cancelled and this waits until it has stopped; the reader reads on when every
        holder has given the socket back (see the module docstring)."""
        if not self.websocket:
            yield
            return
        self._takers += 1
        try:
            if self._reading is not None:
                self._reading.cancel()
            async with self._reader:
                yield
        finally:
            self._takers -= 1
            if not self._takers:
                self._given_back.set()
                self._given_back = trio.Event()

    async def keep_link(self) -> None:
        """The between-turns reader (see the module docstring): a task of the owner's
        nursery, for the owner's life."""
        while not self.closed:
            link = self.link
            if link is None or self._takers or link.socket.holding:
                await self._given_back.wait()  # a turn is due, or has the socket
                continue
            async with self._reader:
                if self._takers or self.link is not link:
                    continue  # a turn came while the lock was being taken: it goes first
                with trio.CancelScope() as reading:
                    self._reading = reading
                    try:
                        await link.socket.wait_message()
                    except UpstreamClosed as closed:
                        self.ctx.counters["upstream_closed_between_turns"] += 1
                        log.info("upstream closed between turns", code=closed.code)
                        if self.link is link:
                            await self.drop_link()  # the next turn opens a new one
                    else:
                        self.ctx.counters["upstream_messages_between_turns"] += 1
                        log.info("upstream message between turns, kept for the next turn")
                    finally:
                        self._reading = None

    async def drop_link(self) -> None:
        """Close the upstream socket (bounded, cancellation-safe); the next turn opens one."""
        link, self.link = self.link, None
        if link is not None:
            await link.aclose()

    async def aclose(self) -> None:
        """The owner leaves: the socket closes and the history leaves the memory budget."""
        self.closed = True
        if self.chain is not None:
            self.chain.close()
        await self.drop_link()

    async def ensure_link(self, account: Account, access: Access, record: RequestRecord) -> WsLink:
        """The upstream socket on ``account``: the one at hand, or a new one."""
        link = self.link
        if link is not None and link.account_id != account.account_id:
            await self.drop_link()
            link = None
        if link is None:
            token = await access.token()
            link = await connect_ws(self.ctx, account, token, list(self.headers), record)
            if self.closed:  # the owner left meanwhile: nobody would close it
                await link.aclose()
                raise SESSION_GONE.copy()
            self.link = link
        else:
            access.used = link.token
        return link

    def remember(self, request: TurnRequest, parent: str | None, observer: TurnObserver) -> None:
        """What a served turn leaves behind: its response id, held by the socket, and (when
        it completed) a link of the response chain and the digest of its history."""
        rid = observer.response_id
        self.history = None
        if rid is None:
            return
        self.last_response_id = rid
        link = self.link
        if link is None:
            return
        link.owned.add(rid)
        if observer.completed and request.history is not None:
            self.history = continuation.extend(request.history, observer.output_items())
        if observer.completed and self.chain is not None:
            self.routing.step(Event.CREATED)
            node = Node.of(parent, observer.account_id, request.input, observer.output)
            self.chain.remember(rid, node)
            durable = self.ctx.durable
            if durable is not None:
                if self.durable_id is None:
                    self.durable_id = uuid.uuid4().hex
                durable.save(self.durable_id, rid, node)

    async def recall(self, anchor: str) -> None:
        """The anchor's turns read from the database into the local chain, when durable
        chains are on and the local chain does not know the anchor (see the module
        docstring)."""
        durable = self.ctx.durable
        if durable is None or (self.chain is not None and self.chain.knows(anchor)):
            return
        found = await durable.lookup(anchor)
        if found is None:
            self.ctx.counters["durable_chain_missed"] += 1
            return
        if self.chain is None:  # a plain HTTP turn: a chain for this turn only
            self.chain = ResponseChain(max_bytes=self.ctx.settings.reanchor_max_bytes)
        for response_id, node in found.nodes:
            self.chain.remember(response_id, node)
        self.durable_id = found.conversation
        self.ctx.counters["durable_chain_recalled"] += 1
        log.info("durable chain recalled", turns=len(found.nodes))


@attrs.define(eq=False)
class _Turn:
    """One turn's attempts (the failover engine's :class:`~failover.Attempt`)."""

    conversation: Conversation
    request: TurnRequest
    sink: Sink
    record: RequestRecord
    anchor_refused: bool = False  # upstream said it does not hold the anchor
    recalled: bool = False  # the database was asked for the anchor's chain
    parent: str | None = None  # the turn's place in the chain (None: it starts the chain)
    sent: TurnRequest | None = None  # what went upstream, when not ``request`` itself
    on_socket: WsTurn | None = None

    async def open(self, account: Account, access: Access) -> TurnStream:
        conversation, request = self.conversation, self.request
        ctx = conversation.ctx
        if not conversation.websocket:
            token = await access.token()
            await self.recall(not self.anchor_refused)
            body, headers = request.encode_http(self.outgoing(account, not self.anchor_refused))
            return await open_sse(ctx, account, token, body, headers, self.record)
        link = await conversation.ensure_link(account, access, self.record)
        anchor = request.anchor
        usable = anchor is not None and anchor in link.owned and not self.anchor_refused
        await self.recall(usable)
        text = request.encode_ws(self.outgoing(account, usable))
        self.on_socket = turn = WsTurn(ctx, link, link.headers)
        await turn.send(text)
        return turn

    async def recall(self, anchor_usable: bool) -> None:
        """Before the anchor is rebuilt: the database asked for it, once per turn."""
        anchor = self.request.anchor
        if self.request.whole is not None:
            return  # the proxy's own continuation: the client's request is at hand
        if anchor is not None and not anchor_usable and not self.recalled:
            self.recalled = True
            await self.conversation.recall(anchor)

    def outgoing(self, account: Account, anchor_usable: bool) -> dict[str, Any] | None:
        """The body to send on ``account`` (None: the request as it came): re-anchored, or
        without its anchor, when the anchor cannot be used (see the module docstring)."""
        conversation, request = self.conversation, self.request
        anchor = request.anchor
        self.parent = anchor  # a re-anchored turn still continues the anchor's chain
        self.sent = None
        if anchor is None or anchor_usable:
            return None
        ctx = conversation.ctx
        if request.whole is not None:  # the proxy's own continuation: the client's request
            self.parent, self.sent = None, request.whole
            ctx.counters["continuation_resent"] += 1
            return request.whole.body
        chain = conversation.chain
        full = chain.full_input(anchor, request.input, account.account_id) if chain else None
        if full is None:
            if not self_contained(request.input):
                raise conversation.lost_anchor.copy()
            self.parent = None  # the request carries its whole history itself
            ctx.counters["anchor_dropped"] += 1
            return request.without_anchor()
        ctx.counters["reanchored"] += 1
        log.info("re-anchored", items=len(full), account=account.account_id)
        return request.without_anchor(full)

    async def serve(self, account: Account, opened: TurnStream) -> None:
        conversation = self.conversation
        observer = TurnObserver(
            conversation.ctx, account.account_id, self.record, conversation.chain is not None
        )
        try:
            await deliver(opened, self.sink, observer, self.record)
        finally:
            await opened.aclose()
        conversation.remember(self.sent or self.request, self.parent, observer)

    async def failed(self, failure: UpstreamFailure) -> None:
        conversation = self.conversation
        self.on_socket = None  # whatever it was, that attempt is over
        if failure.kind is Kind.CONTINUITY:
            anchor = self.request.anchor
            if anchor is None or self.anchor_refused:
                raise failure.answer()
            self.anchor_refused = True  # the next attempt re-anchors (or gives lost_anchor)
            if conversation.link is not None:
                conversation.link.owned.discard(anchor)
            return
        if failure.kind is not Kind.REQUEST:
            await conversation.drop_link()


@attrs.define(eq=False)
class _Connect:
    """The upstream connect of a WebSocket session before its handshake is answered."""

    conversation: Conversation
    record: RequestRecord

    async def open(self, account: Account, access: Access) -> WsLink:
        return await self.conversation.ensure_link(account, access, self.record)

    async def serve(self, account: Account, opened: WsLink) -> None:
        pass

    async def failed(self, failure: UpstreamFailure) -> None:
        await self.conversation.drop_link()
