"""The HTTP bridge: HTTP turns served over a pooled upstream WebSocket.

Upstream keeps ``previous_response_id`` state per WebSocket connection only, so a plain HTTP
request that names an anchor cannot be served by upstream's HTTP endpoint. The bridge gives
HTTP clients (the OpenAI SDK, opencode, the Codex CLI over HTTP) what WebSocket clients have:

* A request that carries a session key (``session-id``, ``session_id``, ``conversation_id``
  header or ``prompt_cache_key``), or whose ``previous_response_id`` was produced by a live
  bridge session, is handed to that key's **bridge session**: one task in the registry's
  nursery, which owns, for exactly its own life, its upstream WebSocket, its idle timer and
  its lease on the ``bridge`` lane. Leaving it for any reason (idle TTL, eviction, drain,
  error, shutdown) closes the socket and frees the slot.
* Inside, a bridge session is a :class:`~trioproxy.sessions.ws_session.WsSession` (affinity,
  response chain, re-anchoring, failover before the first event) whose "client" is the HTTP
  request being served: its frames go to that request through a memory channel, and the
  request relays them as SSE (or aggregates them for ``stream: false``).
* Turns on one session run one at a time, in order; at most ``bridge_queue_limit`` wait
  (more is a local 429 ``proxy_overloaded`` on lane ``bridge_queue``). At most
  ``bridge_max_sessions`` sessions live; a new key evicts the least recently used idle one,
  never a session with a request queued or in flight; when every session is busy the request
  is served over plain HTTP.
* An HTTP client that leaves mid-turn abandons the turn: the upstream socket is closed (a
  response cannot be cancelled on it), and the next turn is re-anchored from the chain.

What the client sees when the anchor cannot be used and the chain cannot rebuild it: a
self-contained request (a full resend that also names an anchor) goes without the anchor; a
short continuation is answered ``502 stream_incomplete``, never ``400
previous_response_not_found`` (see docs/continuity.md, rows B1-B5).
"""

from __future__ import annotations

import collections
import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio

from trioproxy.accounts.pool import RequestInfo
from trioproxy.admission import Overloaded
from trioproxy.logs import get_logger
from trioproxy.protocol.chain import ResponseChain
from trioproxy.protocol.errors import error_envelope, ws_error_event
from trioproxy.protocol.headers import passthrough_response_headers
from trioproxy.protocol.upstream_errors import sanitize_envelope
from trioproxy.sessions.context import ProxyContext, ProxyError
from trioproxy.sessions.http_turn import SSE_HEADERS, STREAM_INCOMPLETE, unary_answer
from trioproxy.sessions.idle import IdleTimer
from trioproxy.sessions.ws_session import SessionOver, WsSession, peek_type
from trioproxy.web.asgi import Downstream

log = get_logger("trioproxy.bridge")

# request headers that describe the HTTP body, not the conversation
_BODY_HEADERS = frozenset(
    {"content-type", "content-length", "content-encoding", "accept", "accept-encoding"}
)
MAX_IDS_PER_SESSION = 4096
SESSION_GONE = error_envelope(
    "The bridge session ended before serving this request; retry.",
    "upstream_error",
    "upstream_unavailable",
)


@attrs.frozen
class UpstreamCut:
    """Upstream closed the socket after output had reached the client."""

    code: int


Item = str | UpstreamCut


class _ClientLeft(Exception):
    """The HTTP request a turn was serving is gone."""


@attrs.define(eq=False)
class BridgeJob:
    """One HTTP turn handed to a bridge session."""

    text: str
    record: dict[str, Any]
    headers: list[tuple[str, str]]
    events: trio.MemorySendChannel[Item]
    response_headers: list[tuple[str, str]] = attrs.field(factory=list)
    gone: bool = False


@attrs.define(eq=False)
class BridgeSession:
    registry: BridgeRegistry
    key: str
    ws: WsSession
    idle: IdleTimer
    inbox_send: trio.MemorySendChannel[BridgeJob]
    inbox: trio.MemoryReceiveChannel[BridgeJob]
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    closed: bool = False
    current: BridgeJob | None = None
    response_ids: collections.deque[str] = attrs.field(
        factory=lambda: collections.deque(maxlen=MAX_IDS_PER_SESSION)
    )

    @property
    def ctx(self) -> ProxyContext:
        return self.ws.ctx

    @property
    def busy(self) -> bool:
        return self.idle.busy_count > 0

    def submit(self, job: BridgeJob) -> None:
        """Queue a turn (synchronous: no checkpoint between lookup and queueing, so the idle
        timer cannot close a session a request was just handed to)."""
        try:
            self.inbox_send.send_nowait(job)
        except trio.WouldBlock:
            raise Overloaded(
                "bridge_queue",
                self.ctx.settings.bridge_queue_limit,
                self.ctx.admission.retry_after,
            ) from None
        self.idle.begin()

    def close(self, why: str) -> None:
        """Leave the session's scope (the socket, the timer and the lease go with it)."""
        if not self.closed:
            self.closed = True
            self.registry.forget(self)
            log.info("bridge session closed", why=why, key_hash=hash(self.key) & 0xFFFF)
        self.cancel_scope.cancel(reason=why)

    async def run(self) -> None:
        failure: list[Item] = []
        try:
            with self.cancel_scope:
                async with self.ctx.admission.lease("bridge"), trio.open_nursery() as nursery:
                    nursery.start_soon(self.idle.run, self._reap)
                    nursery.start_soon(self._close_on_drain)
                    async for job in self.inbox:
                        try:
                            await self._serve(job)
                        finally:
                            self.idle.end()
        except Overloaded as exc:
            event = ws_error_event(429, exc.envelope(), dict(exc.headers()))
            failure = [json.dumps(event)]
        except Exception:
            # a session is the failure boundary: a bug ends this conversation's session (its
            # queued turns get a retryable 502), never the registry or the server
            self.ctx.counters["bridge_session_errors"] += 1
            log.exception("bridge session failed")
        finally:
            self.close("ended")
            self.ws.chain.close()
            self.inbox_send.close()
            while True:  # turns still queued get an answer now, not a hang
                try:
                    job = self.inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                for item in failure:
                    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                        job.events.send_nowait(item)
                job.events.close()
            await self.ws.drop_upstream()  # bounded and cancellation-safe

    async def _reap(self) -> None:
        self.ctx.counters["bridge_idle_closed"] += 1
        self.close("idle")

    async def _close_on_drain(self) -> None:
        await self.ctx.drain_started.wait()
        while self.busy:
            await self.idle.settled.wait()
        self.close("draining")

    async def _serve(self, job: BridgeJob) -> None:
        async with job.events:
            if job.gone:
                return
            self.current = job
            self.ws.headers = job.headers
            try:
                await self.ws.turn(job.text, record=job.record)
            except (_ClientLeft, SessionOver):
                # abandoned or cut mid-turn: this socket's state is unknown; the next turn
                # goes on a new socket, re-anchored from the chain
                await self.ws.drop_upstream()
            finally:
                self.current = None
        rid = self.ws.last_response_id
        if rid is not None and rid not in self.registry.by_response:
            if len(self.response_ids) == self.response_ids.maxlen:
                self.registry.by_response.pop(self.response_ids[0], None)
            self.response_ids.append(rid)
            self.registry.by_response[rid] = self

    async def sink(self, message: MutableMapping[str, Any]) -> None:
        """The WsSession's ``send``: frames go to the HTTP request being served."""
        job = self.current
        if job is None:
            return
        item: Item
        if message["type"] == "websocket.send":
            item = message["text"]
            if not job.response_headers and self.ws.upstream is not None:
                job.response_headers = passthrough_response_headers(
                    self.ws.upstream.handshake_headers
                )
        elif message["type"] == "websocket.close":
            item = UpstreamCut(int(message.get("code", 1011)))
        else:
            return
        try:
            await job.events.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _ClientLeft() from None


@attrs.define(eq=False)
class BridgeRegistry:
    """The bridge sessions, each a task in this registry's nursery (see module docstring)."""

    ctx: ProxyContext
    sessions: collections.OrderedDict[str, BridgeSession] = attrs.field(
        factory=collections.OrderedDict
    )
    by_response: dict[str, BridgeSession] = attrs.field(factory=dict)
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

    def forget(self, session: BridgeSession) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        for rid in session.response_ids:
            if self.by_response.get(rid) is session:
                del self.by_response[rid]

    def session_for(self, key: str | None, anchor: str | None) -> BridgeSession | None:
        """The live session that owns ``anchor``, else the one for ``key`` (created if need
        be); None when the request goes over plain HTTP."""
        if not self.enabled:
            return None
        if anchor:
            owner = self.by_response.get(anchor)
            if owner is not None and not owner.closed:
                self.sessions.move_to_end(owner.key)
                return owner
        if key is None:
            return None
        session = self.sessions.get(key)
        if session is not None and not session.closed:
            self.sessions.move_to_end(key)
            return session
        if len(self.sessions) >= self.ctx.settings.bridge_max_sessions:
            victim = next((s for s in self.sessions.values() if not s.busy), None)
            if victim is None:
                self.ctx.counters["bridge_full"] += 1
                return None  # every session is busy: plain HTTP for this one
            self.ctx.counters["bridge_evicted"] += 1
            victim.close("evicted")
        return self._start(key)

    def _start(self, key: str) -> BridgeSession:
        assert self.nursery is not None
        settings = self.ctx.settings
        inbox_send, inbox = trio.open_memory_channel[BridgeJob](settings.bridge_queue_limit)
        session = BridgeSession(
            self,
            key,
            WsSession(
                self.ctx,
                {"type": "bridge", "path": "bridge"},
                _unset_send,
                [],
                RequestInfo(session_key=f"session:{key}"),
                "bridge",
                chain=ResponseChain(
                    max_bytes=settings.reanchor_max_bytes, budget=self.ctx.chain_budget
                ),
                lost_anchor=(502, STREAM_INCOMPLETE),
            ),
            IdleTimer(settings.bridge_idle_ttl),
            inbox_send,
            inbox,
        )
        session.ws.send = session.sink
        self.sessions[key] = session
        self.ctx.counters["bridge_sessions"] += 1
        self.nursery.start_soon(session.run)
        return session

    async def serve_http(
        self,
        session: BridgeSession,
        *,
        message: dict[str, Any],
        headers: list[tuple[str, str]],
        record: dict[str, Any],
        down: Downstream,
        request_id: str,
        streaming: bool,
        keepalive: Callable[[], Awaitable[None]] | None,
    ) -> None:
        """Serve one HTTP request through ``session`` (runs in the request's own scope)."""
        events_send, events = trio.open_memory_channel[Item](64)
        job = BridgeJob(
            json.dumps({**message, "type": "response.create"}, ensure_ascii=False),
            record,
            [(k, v) for k, v in headers if k not in _BODY_HEADERS],
            events_send,
        )
        record["transport"] = "bridge"
        try:
            session.submit(job)
        except Overloaded as exc:
            raise ProxyError(429, exc.envelope(), exc.headers()) from None
        try:
            with events:
                await _relay(job, events, down, request_id, streaming, keepalive)
        finally:
            job.gone = True


async def _relay(
    job: BridgeJob,
    events: trio.MemoryReceiveChannel[Item],
    down: Downstream,
    request_id: str,
    streaming: bool,
    keepalive: Callable[[], Awaitable[None]] | None,
) -> None:
    record = job.record
    first: Item | None = None
    async with trio.open_nursery() as waiting:
        if keepalive is not None:
            waiting.start_soon(keepalive)  # while queued, connecting, or upstream is silent
        try:
            first = await events.receive()
        except trio.EndOfChannel:
            first = None
        waiting.cancel_scope.cancel()
    if first is None:
        raise ProxyError(502, SESSION_GONE)
    completed: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None
    items: list[Any] = []
    output = False
    pending: list[Item] = [first]
    while True:
        if pending:
            item = pending.pop()
        else:
            try:
                item = await events.receive()
            except trio.EndOfChannel:
                break
        if isinstance(item, UpstreamCut):
            # output already reached the client: end the stream without response.completed,
            # as a broken HTTP stream would (the Codex CLI and the SDKs retry that)
            record["error_code"] = f"upstream_closed_{item.code}"
            break
        kind = peek_type(item)
        if kind == "codex.rate_limits":
            continue  # a WebSocket-only event; HTTP clients get rate limits as headers
        if not output and kind == "error":
            event = json.loads(item)
            if isinstance(event.get("status"), int):
                error_headers = event.get("headers")
                raise ProxyError(
                    event["status"],
                    sanitize_envelope({"error": event.get("error") or {}}),
                    list(error_headers.items()) if isinstance(error_headers, dict) else [],
                )
        if not output:
            output = True
            if streaming:
                await down.start(
                    200, [*SSE_HEADERS, ("x-request-id", request_id), *job.response_headers]
                )
        if streaming:
            if "\n" in item:
                item = json.dumps(json.loads(item), ensure_ascii=False)
            await down.body(f"event: {kind}\ndata: {item}\n\n".encode())
            continue
        if kind == "response.output_item.done":
            items.append(json.loads(item).get("item"))
        elif kind == "response.completed":
            completed = json.loads(item).get("response")
        elif kind in ("response.failed", "response.incomplete", "error"):
            failed = json.loads(item)
    if streaming:
        await down.finish()
        return
    status, value = unary_answer(completed, failed, items)
    record["status"] = status
    if status != 200:
        record["error_code"] = value["error"]["code"]
    await down.json(status, value, [("x-request-id", request_id), *job.response_headers])


async def _unset_send(message: MutableMapping[str, Any]) -> None:
    raise AssertionError("a bridge session's WsSession sends through BridgeSession.sink")
