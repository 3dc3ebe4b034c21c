"""The HTTP bridge: HTTP turns served over a pooled upstream WebSocket.

Upstream keeps ``previous_response_id`` state per WebSocket connection only, so a plain HTTP
request that names an anchor cannot be served by upstream's HTTP endpoint. The bridge gives
HTTP clients (the OpenAI SDK, opencode, the Codex CLI over HTTP) what WebSocket clients have:

* A request that carries a conversation key (``session-id``, ``session_id``,
  ``conversation_id`` header or ``prompt_cache_key``), or whose ``previous_response_id`` was
  produced by a live bridge session, is served by that conversation's **bridge session**: a
  :class:`~trioproxy.sessions.conversation.Conversation` kept on an upstream WebSocket
  (affinity, response chain, re-anchoring, failover before the first event), owned by a task
  of the registry's nursery. That task holds, for exactly its own life, the session's lease
  on the ``bridge`` lane and runs its idle timer and the reader of the upstream socket
  between turns (``Conversation.keep_link``: pings answered, a close noticed); leaving it
  for any reason (idle TTL, eviction, drain, shutdown) closes the conversation, and with it
  the upstream socket.
* Each HTTP request runs its turn itself, in its own task, on the session's conversation:
  turns of one session run one at a time, in arrival order; at most ``bridge_queue_limit``
  wait (more is a local 429 ``proxy_overloaded`` on lane ``bridge_queue``). At most
  ``bridge_max_sessions`` sessions live; a new key evicts the least recently used idle one,
  never a session with a request waiting or in flight; when every session is busy the
  request is served over plain HTTP.
* A request of another client API (Chat Completions, Anthropic Messages) resends its whole
  history each time. When its input continues the last turn of a live session exactly
  (``protocol/continuation.py``: that turn's input and output, item for item), it is served
  on that session as a continuation: anchored on that turn's response, with only the new
  items (``continuation``). If the session is busy (a fork of the conversation, served
  beside it), or nothing matches, the request goes whole: on the session named by its
  conversation key, or, for such a client without one, on the session of its conversation's
  opening when it is a later turn and that session is free, else over plain HTTP.
* An HTTP client that leaves mid-turn abandons the turn: the conversation drops the upstream
  socket (a response cannot be cancelled on it), and the next turn is re-anchored from the
  chain on a new one.

What the client sees when the anchor cannot be used and the chain cannot rebuild it: a
self-contained request (a full resend that also names an anchor) goes without the anchor; a
short continuation is answered ``502 stream_incomplete``, never ``400
previous_response_not_found`` (see docs/continuity.md, rows B1-B7).
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import structlog
import trio

from trioproxy.accounts.pool import RequestInfo
from trioproxy.admission import Overloaded
from trioproxy.logs import get_logger
from trioproxy.protocol.continuation import History
from trioproxy.protocol.errors import ProxyError
from trioproxy.protocol.recent import RecentIds
from trioproxy.protocol.requests import TurnRequest
from trioproxy.reqlog import RequestRecord
from trioproxy.sessions.context import ProxyContext
from trioproxy.sessions.conversation import HTTP_LOST_ANCHOR, SESSION_GONE, Conversation
from trioproxy.sessions.idle import IdleTimer
from trioproxy.sessions.sinks import Sink

log = get_logger("trioproxy.bridge")

# request headers that describe the HTTP body, not the conversation
_BODY_HEADERS = frozenset(
    {"content-type", "content-length", "content-encoding", "accept", "accept-encoding"}
)


@attrs.define(eq=False)
class BridgeSession:
    registry: BridgeRegistry
    key: str
    conversation: Conversation
    lock: trio.Lock = attrs.field(factory=trio.Lock)  # one turn at a time, in arrival order
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ready: trio.Event = attrs.field(factory=trio.Event)  # holds its lease, or has ended
    refused: Overloaded | None = None  # the bridge lane had no slot for it
    waiting: int = 0  # requests queued for the session (not the one running its turn)
    closed: bool = False
    response_ids: RecentIds = attrs.field(factory=RecentIds)  # by which requests find it
    history: bytes | None = None  # the digest of its last turn, by which continuations find it

    @property
    def ctx(self) -> ProxyContext:
        return self.conversation.ctx

    @property
    def idle(self) -> IdleTimer:
        assert self.conversation.idle is not None
        return self.conversation.idle

    @property
    def busy(self) -> bool:
        """A request waits for this session or runs a turn on it."""
        return self.idle.busy_count > 0

    @asynccontextmanager
    async def turn_slot(self) -> AsyncIterator[None]:
        """Hold the session for one turn, after the turns queued before it. The session is
        busy from the call on (entering does not checkpoint before that), so neither the
        idle timer nor an eviction closes a session a request was just handed."""
        limit = self.ctx.settings.bridge_queue_limit
        if self.waiting >= limit:
            raise Overloaded("bridge_queue", limit, self.ctx.admission.retry_after)
        self.waiting += 1
        queued = True
        try:
            with self.idle.busy():
                if not self.ready.is_set():
                    await self.ready.wait()
                if self.refused is not None:
                    raise Overloaded(
                        self.refused.lane, self.refused.limit, self.refused.retry_after
                    )
                async with self.lock:
                    self.waiting -= 1
                    queued = False
                    if self.closed:
                        raise SESSION_GONE.copy()
                    yield
        finally:
            if queued:
                self.waiting -= 1

    def close(self, why: str) -> None:
        """Leave the session's scope (the socket, the timer and the lease go with it)."""
        if not self.closed:
            self.closed = True
            self.registry.forget(self)
            log.info("bridge session closed", why=why)
        self.cancel_scope.cancel(reason=why)

    async def run(self) -> None:
        """The session's owner task (see the module docstring)."""
        # this task was started by a request: it logs as the session, not as that request
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(bridge_session=f"{hash(self.key) & 0xFFFF:04x}")
        try:
            with self.cancel_scope:
                async with self.ctx.admission.lease("bridge"), trio.open_nursery() as nursery:
                    self.ready.set()
                    nursery.start_soon(self._close_on_drain)
                    nursery.start_soon(self.conversation.keep_link)
                    await self.idle.run(self._reap)
        except Overloaded as exc:
            self.refused = exc
        finally:
            self.close("ended")
            self.ready.set()
            await self.conversation.aclose()  # bounded and cancellation-safe

    async def _reap(self) -> None:
        self.ctx.counters["bridge_idle_closed"] += 1
        self.close("idle")

    async def _close_on_drain(self) -> None:
        await self.ctx.drain_started.wait()
        while self.busy:
            await self.idle.settled.wait()
        self.close("draining")

    def note_response(self, response_id: str | None) -> None:
        """A response this session's conversation produced: requests anchored on it find
        the session by it (the most recent ids only, see ``protocol/recent.py``)."""
        by_response = self.registry.by_response
        if response_id is None or response_id in by_response or self.closed:
            return
        forgotten = self.response_ids.add(response_id)
        if forgotten is not None and by_response.get(forgotten) is self:
            del by_response[forgotten]
        by_response[response_id] = self

    def note_history(self) -> None:
        """Index the session by the digest of its conversation's last turn (none when that
        turn left none, or the session is closed): a request whose resent history continues
        that turn finds the session by it."""
        by_history = self.registry.by_history
        if self.history is not None and by_history.get(self.history) is self:
            del by_history[self.history]
        history = None if self.closed else self.conversation.history
        self.history = history
        if history is not None:
            by_history[history] = self


@attrs.frozen
class BridgeStatistics:
    sessions: int  # live bridge sessions
    busy: int  # with a request waiting or in flight
    waiting: int  # requests queued behind a turn in progress
    response_ids: int  # ids by which anchored requests find their session
    conversation_bytes: int  # what their response chains are charged


@attrs.define(eq=False)
class BridgeRegistry:
    """The bridge sessions, each a task in this registry's nursery (see module docstring)."""

    ctx: ProxyContext
    sessions: collections.OrderedDict[str, BridgeSession] = attrs.field(
        factory=collections.OrderedDict
    )
    by_response: dict[str, BridgeSession] = attrs.field(factory=dict)
    # the digest of each session's last turn -> the session
    by_history: dict[bytes, BridgeSession] = attrs.field(factory=dict)
    nursery: trio.Nursery | None = None

    @property
    def enabled(self) -> bool:
        return self.nursery is not None and self.ctx.settings.bridge_max_sessions > 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the bridge sessions until cancelled (the app nursery's lifetime)."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.nursery = None

    def statistics(self) -> BridgeStatistics:
        sessions = list(self.sessions.values())
        return BridgeStatistics(
            sessions=len(sessions),
            busy=sum(s.busy for s in sessions),
            waiting=sum(s.waiting for s in sessions),
            response_ids=len(self.by_response),
            conversation_bytes=sum(
                s.conversation.chain.size for s in sessions if s.conversation.chain is not None
            ),
        )

    def forget(self, session: BridgeSession) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        for rid in session.response_ids:
            if self.by_response.get(rid) is session:
                del self.by_response[rid]
        session.response_ids.clear()
        session.note_history()  # (closed: it leaves the index)

    def session_for(
        self,
        key: str | None,
        anchor: str | None,
        client: str = "",
        accounts: frozenset[str] | None = None,
        *,
        wait: bool = True,
        routing: str | None = None,
    ) -> BridgeSession | None:
        """The live session of ``client`` (an API key id) that owns ``anchor``, else its
        session for ``key`` (created if need be, routed only to ``accounts`` when given);
        None when the request goes over plain HTTP, as it does, unless ``wait``, when the
        key's session is busy. A new session routes by ``routing`` (by the key when None).
        Sessions are never shared between clients."""
        if not self.enabled:
            return None
        scope = f"{client}/"
        if anchor:
            owner = self.by_response.get(anchor)
            if owner is not None and not owner.closed and owner.key.startswith(scope):
                self.sessions.move_to_end(owner.key)
                return owner
        if key is None:
            return None
        key = scope + key
        session = self.sessions.get(key)
        if session is not None and not session.closed:
            if not wait and session.busy:
                self.ctx.counters["bridge_busy_plain"] += 1
                return None
            self.sessions.move_to_end(key)
            return session
        if len(self.sessions) >= self.ctx.settings.bridge_max_sessions:
            victim = next((s for s in self.sessions.values() if not s.busy), None)
            if victim is None:
                self.ctx.counters["bridge_full"] += 1
                return None  # every session is busy: plain HTTP for this one
            self.ctx.counters["bridge_evicted"] += 1
            victim.close("evicted")
        return self._start(key, accounts, routing or f"session:{key}")

    def continuation(
        self, request: TurnRequest, history: History
    ) -> tuple[BridgeSession, TurnRequest] | None:
        """The free session whose last turn ``request`` continues, and the request as that
        turn's continuation (see the module docstring); None if there is none. (``history``
        is the request's input read by ``protocol/continuation.py``; its scope keeps
        clients and models apart.)"""
        if not self.enabled:
            return None
        length = history.longest(self.by_history)
        if length is None:
            return None
        session = self.by_history[history.marks[length]]
        anchor = session.conversation.last_response_id  # (the turn the digest is of)
        if anchor is None or session.closed or session.busy:
            self.ctx.counters["continuation_busy"] += 1
            return None
        self.sessions.move_to_end(session.key)
        self.ctx.counters["continued"] += 1
        return session, request.continued(anchor, length)

    def _start(self, key: str, accounts: frozenset[str] | None, routing: str) -> BridgeSession:
        assert self.nursery is not None
        ctx = self.ctx
        conversation = Conversation.over_websocket(
            ctx,
            RequestInfo(session_key=routing, accounts=accounts),
            HTTP_LOST_ANCHOR,
            (),
            ctx.settings.bridge_idle_ttl,
        )
        session = BridgeSession(self, key, conversation)
        self.sessions[key] = session
        ctx.counters["bridge_sessions"] += 1
        self.nursery.start_soon(session.run)
        return session

    async def serve(
        self,
        session: BridgeSession,
        request: TurnRequest,
        headers: Sequence[tuple[str, str]],
        sink: Sink,
        record: RequestRecord,
    ) -> None:
        """Run one HTTP request's turn on ``session`` (in the request's own task)."""
        record.transport = "bridge"
        try:
            async with session.turn_slot():
                conversation = session.conversation
                conversation.headers = [(k, v) for k, v in headers if k not in _BODY_HEADERS]
                await conversation.turn(request, sink, record)
                session.note_response(conversation.last_response_id)
                session.note_history()
        except Overloaded as exc:
            answer = ProxyError(429, exc.envelope(), exc.headers())
            record.fail(answer.status, answer.code)
            await sink.error(answer)
        except ProxyError as answer:
            record.fail(answer.status, answer.code)
            await sink.error(answer)
