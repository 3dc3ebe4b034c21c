"""The transport edge: a turn opened upstream over HTTP/SSE or on an upstream WebSocket.

Both ways give the conversation core the same thing, a :class:`TurnStream`: the upstream
headers a client reads, the batches read before the turn could be committed (``held``: up to
and including upstream's first output event), and ``relay`` for the rest. Opening reads up to
the first event that is not part of the preamble (``codex.rate_limits``,
``response.created``, ``response.in_progress``, ``response.metadata``: ``PREAMBLE`` of
``protocol/events.py``), because until then nothing the client could act on was said and the
proxy may still try another account: an upstream refusal in any form (an HTTP error answer,
a refused handshake, an ``error`` or ``response.failed`` event that comes instead of output,
with or without a status, a connection that fails or closes) is raised as the
:class:`~trioproxy.protocol.failures.UpstreamFailure` it is, and what was held of that
attempt is dropped. After the first output event an error event is relayed as it came.
The preamble is held for at most :func:`preamble_hold` after its first event (half the SSE
keep-alive interval): a turn whose output is slower than that is committed with it, so a
client is never kept waiting on keep-alives while the proxy holds upstream's own events, and
an error that comes later is relayed as it came.
This module is the one place where transport errors (httpx's, the WebSocket client's) become
those failures; after the first output event, a broken stream is a
:class:`~trioproxy.sessions.sinks.Cut`.

Echoed state (``protocol/echoed.py``): the ``x-codex-turn-state`` of an answer or handshake
reaches the client marked with the account that issued it, and a client's echo of it goes
upstream only to that account, with upstream's own value.

Resource handling: an :class:`SSETurn` owns its upstream response (closed by ``aclose``,
shielded and bounded; a failed open closes it itself). A :class:`WsLink` is one upstream
WebSocket, owned by the conversation that opened it, which closes it; a :class:`WsTurn`
only reads and writes it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import attrs
import httpx
import trio

from trioproxy.accounts.pool import Account
from trioproxy.protocol import echoed
from trioproxy.protocol.errors import error_envelope
from trioproxy.protocol.events import PREAMBLE, TERMINAL, Batch, Event, SSEEvents
from trioproxy.protocol.failures import (
    Kind,
    UpstreamFailure,
    classify,
    classify_event,
    failure,
    parse_body,
    transport_failure,
)
from trioproxy.protocol.headers import (
    RawHeaders,
    codex_headers,
    encode_headers,
    upstream_http_headers,
    upstream_request_id,
    upstream_ws_headers,
)
from trioproxy.protocol.recent import RecentIds
from trioproxy.reqlog import RequestRecord
from trioproxy.sessions.context import ProxyContext
from trioproxy.sessions.sinks import Cut
from trioproxy.upstream.transport import StreamedResponse
from trioproxy.upstream.ws import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamWebSocket,
    connect_upstream_websocket,
)

MAX_ERROR_BODY = 1024 * 1024
See = Callable[[Batch], None]
Forward = Callable[[Batch], Awaitable[None]]


class TurnStream(Protocol):
    headers: RawHeaders  # upstream headers a client reads (filtered when the answer is built)
    held: list[Batch]  # read before the turn was committed; upstream's first event is in them

    async def relay(self, see: See, forward: Forward) -> None:
        """Hand every further batch to ``see`` and then to ``forward``, until the turn's
        end; raise :class:`~trioproxy.sessions.sinks.Cut` if upstream breaks off."""

    async def aclose(self) -> None:
        """Done with the turn (an SSE turn closes its response)."""


def preamble_hold(ctx: ProxyContext) -> float:
    """How long the preamble is held, at most, from its first event (see the module
    docstring): ``preamble_hold``, and at most half the keep-alive interval, so the turn is
    committed before a keep-alive would be due."""
    hold, interval = ctx.settings.preamble_hold, ctx.settings.keepalive_interval
    return min(hold, interval / 2) if interval > 0 else hold


def first_failure(event: Event) -> UpstreamFailure | None:
    """The failure upstream's first output event is, if it is one the proxy acts on before
    committing the turn (``classify_event``: an ``error`` event with a status or a code the
    proxy knows, a ``response.failed`` for a usage limit, an overload, a server error)."""
    if event.kind not in ("error", "response.failed"):
        return None
    value = event.json()
    return classify_event(value) if value is not None else None


# -- HTTP / SSE ------------------------------------------------------------------------------


@attrs.define(eq=False)
class SSETurn:
    """A turn answered over HTTP: an SSE stream (see the module docstring)."""

    ctx: ProxyContext
    account: Account
    response: StreamedResponse
    headers: RawHeaders
    held: list[Batch] = attrs.field(factory=list)
    events: SSEEvents = attrs.field(factory=SSEEvents)
    learned: bool = False

    def learn_headers(self) -> None:
        """Fold the answer's rate-limit headers into the account's quota, once. A turn
        being served does it after its first bytes went to the client: the figures are for
        the next routing decisions, not for this turn."""
        if not self.learned:
            self.learned = True
            learn_headers(self.ctx, self.account, self.response.raw_headers)

    async def read_first(self) -> None:
        """Read until upstream's first output event (past the ``PREAMBLE``, held for at
        most ``preamble_hold``)."""
        chunks: AsyncIterator[bytes] = self.response.aiter_raw()
        with trio.CancelScope() as holding:  # (the body reads on after a cancelled read)
            try:
                async for chunk in chunks:
                    batch = self.events.feed(chunk)
                    self.held.append(batch)
                    for index, kind in enumerate(batch.kinds):
                        if kind in PREAMBLE:
                            if holding.deadline == math.inf:
                                holding.deadline = trio.current_time() + preamble_hold(self.ctx)
                            continue
                        if kind in ("error", "response.failed"):
                            found = first_failure(batch.events[index])
                            if found is not None:
                                raise found
                        return
            except httpx.HTTPError as exc:
                raise transport_failure(f"upstream stream failed ({type(exc).__name__})") from None
            except ValueError:  # a frame larger than the splitter takes
                raise transport_failure("upstream sent an oversized SSE frame") from None
        if holding.cancelled_caught:
            return  # held long enough: committed with its preamble
        raise transport_failure("upstream closed the stream before response.created")

    async def relay(self, see: See, forward: Forward) -> None:
        self.learn_headers()
        feed = self.events.feed

        async def each(chunk: bytes) -> None:  # (every read of every stream comes here)
            batch = feed(chunk)
            see(batch)
            await forward(batch)

        try:
            await self.response.body.relay(each)
        except (httpx.HTTPError, ValueError):
            raise Cut(None) from None

    async def aclose(self) -> None:
        self.learn_headers()
        await self.response.aclose()


async def open_sse(
    ctx: ProxyContext,
    account: Account,
    token: str,
    body: bytes,
    client_headers: RawHeaders,
    record: RequestRecord,
) -> SSETurn:
    """POST a turn upstream and read up to its first event (see the module docstring)."""
    sent = echoed.outgoing_raw(account.account_id, client_headers)
    headers = upstream_http_headers(sent, token, account.account_id)
    url = f"{ctx.upstream}/codex/responses"
    try:
        response = await ctx.upstream_http.post_stream(url, headers, body)
    except httpx.HTTPError as exc:
        raise transport_failure(f"upstream connection failed ({type(exc).__name__})") from None
    client_view = echoed.for_client(account.account_id, response.raw_headers)
    turn = SSETurn(ctx, account, response, client_view)
    record.upstream_request_id = upstream_request_id(response.raw_headers)
    try:
        if response.status_code != 200:
            turn.learn_headers()
            raw = await _error_body(response)
            raise classify(response.status_code, parse_body(raw), tuple(response.headers))
        await turn.read_first()
    except BaseException:
        await turn.aclose()
        raise
    return turn


async def _error_body(response: StreamedResponse) -> bytes:
    raw = b""
    try:
        async for piece in response.aiter_raw():
            raw += piece
            if len(raw) > MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    return raw


def learn_headers(ctx: ProxyContext, account: Account, headers: RawHeaders) -> None:
    """Fold an answer's ``x-codex-*`` rate-limit headers into the account's quota."""
    ctx.pool.learn_codex_headers(account.account_id, codex_headers(headers))


# -- WebSocket -------------------------------------------------------------------------------


@attrs.define(eq=False)
class WsLink:
    """One upstream WebSocket on one account, and what it holds of the conversation."""

    socket: UpstreamWebSocket
    account_id: str
    token: str
    owned: RecentIds = attrs.field(factory=RecentIds)  # recent response ids it holds

    @property
    def headers(self) -> RawHeaders:
        """The handshake's headers as a client gets them (encoded when asked: a session
        keeps only the socket's)."""
        return echoed.for_client(self.account_id, encode_headers(self.socket.handshake_headers))

    @property
    def opened_at(self) -> float:
        return self.socket.opened_at

    async def aclose(self) -> None:
        await self.socket.aclose()


async def connect_ws(
    ctx: ProxyContext,
    account: Account,
    token: str,
    client_headers: list[tuple[str, str]],
    record: RequestRecord,
) -> WsLink:
    """Open an upstream WebSocket on ``account`` (a refusal raised as its failure)."""
    sent = echoed.outgoing_text(account.account_id, client_headers)
    headers = upstream_ws_headers(sent, token, account.account_id)
    try:
        async with ctx.admission.work("connect"):
            socket = await connect_upstream_websocket(
                ctx.ws_upstream_url(),
                headers,
                connect_timeout=ctx.settings.upstream_connect_timeout,
                max_message=ctx.settings.max_body_bytes,
            )
    except UpstreamRejected as rejected:
        ctx.pool.learn_headers(account.account_id, rejected.headers)
        raise classify(
            rejected.status, parse_body(rejected.body), tuple(rejected.headers)
        ) from None
    except UpstreamConnectError as exc:
        raise failure(
            Kind.TRANSPORT, 502, error_envelope(str(exc), "upstream_error", "upstream_unavailable")
        ) from None
    ctx.pool.learn_headers(account.account_id, socket.handshake_headers)
    link = WsLink(socket, account.account_id, token)
    record.upstream_request_id = upstream_request_id(link.headers)
    return link


def closed_failure(code: int) -> UpstreamFailure:
    return transport_failure(f"upstream closed ({code}) before response.created")


@attrs.define(eq=False)
class WsTurn:
    """A turn on an upstream WebSocket: one message each way per event."""

    ctx: ProxyContext
    link: WsLink
    headers: RawHeaders
    held: list[Batch] = attrs.field(factory=list)
    ended: bool = False  # its terminal event was read (the socket can carry the next turn)

    async def send(self, text: str) -> None:
        """Send the turn's message and read until upstream's first output event (past the
        ``PREAMBLE``, held for at most ``preamble_hold``)."""
        try:
            await self.link.socket.send_text(text)
        except UpstreamClosed as closed:
            raise closed_failure(closed.code) from None
        with trio.CancelScope() as holding:  # (the socket reads on after a cancelled read)
            while True:
                event = await self._next(before_output=True)
                if event is None:
                    continue
                self.held.append(Batch.of(event))
                if event.kind in PREAMBLE:
                    if holding.deadline == math.inf:
                        holding.deadline = trio.current_time() + preamble_hold(self.ctx)
                    continue
                found = first_failure(event)
                if found is not None:
                    raise found
                self.ended = event.kind in TERMINAL
                return

    async def _next(self, *, before_output: bool) -> Event | None:
        try:
            data = await self.link.socket.receive()
        except UpstreamClosed as closed:
            if before_output:
                raise closed_failure(closed.code) from None
            raise Cut(closed.code) from None
        if isinstance(data, bytes):
            return None  # upstream sends no binary frames in a turn; ignore any
        return Event.from_message(data)

    async def relay(self, see: See, forward: Forward) -> None:
        while not self.ended:
            event = await self._next(before_output=False)
            if event is None:
                continue
            self.ended = event.kind in TERMINAL
            batch = Batch.of(event)
            see(batch)
            await forward(batch)

    async def aclose(self) -> None:
        pass  # the socket is the conversation's
