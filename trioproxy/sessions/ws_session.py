"""Downstream WebSocket sessions (``/backend-api/codex/responses`` and ``/v1/responses``).

A session is one nursery that owns, for exactly its own life: the upstream WebSocket, the
task reading the client, and the per-turn relay. Leaving it for any reason (the client
leaves, an error, shutdown) closes the upstream socket in the ``finally`` of ``serve``.

The upstream connection is opened before the client's handshake is accepted, so the
upstream's handshake headers (turn state, rate limits, models etag) reach the client in its
101, and a pool that cannot serve refuses the upgrade with an HTTP answer (429/503).

Per turn (one ``response.create`` in flight per socket, as the Codex CLI does): the message
goes upstream, events come back as they arrive. Nothing reaches the client before upstream's
first real event, so until then the proxy may absorb a failure and try again:

* the session's affinity (``protocol/affinity.py``) says where a new upstream connection may
  go: a hard-affinity session reconnects to its account; an account-level failure (usage
  limit, 401 after refresh, deactivated, 402/403) resets the pin;
* the session's response chain (``protocol/chain.py``) re-anchors a request whose
  ``previous_response_id`` is not known to the current upstream connection (it was replaced,
  the pin was reset, upstream answered ``previous_response_not_found``): the proxy sends the
  whole input instead, and the client sees an ordinary turn. When the chain is not fully
  known, the client gets ``previous_response_not_found`` (without any upstream id), after
  which the Codex CLI reconnects and resends the full history.

Once output has reached the client nothing is retried; a close then reaches the client as
1011, which the Codex CLI also recovers from by reconnecting.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import structlog
import trio

from trioproxy.accounts.pool import Account, RequestInfo
from trioproxy.accounts.refresh import RefreshError
from trioproxy.admission import Overloaded
from trioproxy.logs import get_logger
from trioproxy.protocol.affinity import Affinity, Event, step
from trioproxy.protocol.chain import ResponseChain
from trioproxy.protocol.errors import error_envelope, ws_error_event
from trioproxy.protocol.headers import passthrough_response_headers, upstream_ws_headers
from trioproxy.protocol.upstream_errors import (
    ACCOUNT_LEVEL,
    UpstreamFailure,
    classify,
    classify_failed_event,
    parse_body,
    sanitize_envelope,
)
from trioproxy.sessions.context import ProxyContext, ProxyError
from trioproxy.sessions.http_turn import (
    bridge_key,
    new_request_id,
    self_contained,
    session_key,
)
from trioproxy.sessions.idle import IdleTimer
from trioproxy.sessions.upstream_turn import (
    apply_failure,
    give_up,
    json_bytes,
    record_usage,
)
from trioproxy.upstream.ws import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamWebSocket,
    connect_upstream_websocket,
)
from trioproxy.web.asgi import Receive, Scope, Send, client_host, scope_headers

log = get_logger("trioproxy.ws")
TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


class TurnRetry(Exception):
    """Replace the upstream socket and send the message again."""

    def __init__(self, failure: UpstreamFailure) -> None:
        super().__init__(failure.kind)
        self.failure = failure


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def deny(
    scope: Scope,
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[str, str]] | None = None,
) -> None:
    """Refuse an upgrade with an HTTP answer (the ASGI WebSocket denial extension)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        data = json_bytes(body)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": _encode(
                    [
                        ("content-type", "application/json"),
                        ("content-length", str(len(data))),
                        ("connection", "close"),  # the server closes after a denial
                        *(headers or []),
                    ]
                ),
            }
        )
        await send({"type": "websocket.http.response.body", "body": data})
    else:
        await send({"type": "websocket.close", "code": 1008})


RESEND_ENVELOPE = error_envelope(
    "The conversation state for previous_response_id is no longer available; resend the full input.",
    "invalid_request_error",
    "previous_response_not_found",
    "previous_response_id",
)


@attrs.define(eq=False)
class Outcome:
    """What one relayed turn produced (for the chain)."""

    response_id: str | None = None
    output: list[Any] = attrs.field(factory=list)
    size: int = 0
    completed: bool = False


@attrs.define(eq=False)
class WsSession:
    ctx: ProxyContext
    scope: Scope
    send: Send
    headers: list[tuple[str, str]]
    info: RequestInfo
    request_id: str
    upstream: UpstreamWebSocket | None = None
    account: Account | None = None
    affinity: Affinity = attrs.field(factory=Affinity)
    chain: ResponseChain = attrs.field(factory=ResponseChain)
    owned: set[str] = attrs.field(factory=set)  # response ids the current upstream connection knows
    # the answer when an anchor can be neither used nor rebuilt (the WebSocket client's own
    # recovery signal by default; the HTTP bridge answers 502 stream_incomplete)
    lost_anchor: tuple[int, dict[str, Any]] = (400, RESEND_ENVELOPE)
    last_response_id: str | None = None

    # -- upstream connection --------------------------------------------------------------
    async def connect(self, excluded: dict[str, str]) -> None:
        """Open an upstream socket (replacing any): on the pinned account if the affinity is
        hard, else on the account routing picks, trying the next one on failure."""
        await self.drop_upstream()
        url = self.ctx.ws_upstream_url()
        pinned = self.affinity.pinned_to()
        stay_on = self.ctx.pool.accounts.get(pinned) if pinned else None
        if pinned and stay_on is None:
            self.affinity = step(self.affinity, Event.ACCOUNT_FAILURE)  # the account was removed
        last: UpstreamFailure | None = None
        decision = None
        for _ in range(self.ctx.settings.max_failover_attempts):
            if stay_on is not None:
                account = stay_on
            else:
                decision = self.ctx.pool.select(self.info, excluded)
                if decision.chosen is None:
                    break
                account = self.ctx.pool.accounts[decision.chosen]
            try:
                self.upstream = await self._connect_account(url, account)
            except _AccountFailed as failed:
                last = failed.failure
                excluded[account.account_id] = last.kind
                if last.kind in ACCOUNT_LEVEL and stay_on is not None:
                    self.affinity = step(self.affinity, Event.ACCOUNT_FAILURE)
                    stay_on = None  # pin reset: the conversation will be re-anchored elsewhere
                    continue
                if stay_on is not None or not last.failover:
                    break
                continue
            self.account = account
            self.affinity = step(self.affinity, Event.BIND, account.account_id)
            structlog.contextvars.bind_contextvars(account=account.account_id)
            return
        raise give_up(self.ctx, last, decision)

    async def _connect_account(self, url: str, account: Account) -> UpstreamWebSocket:
        try:
            token = await self.ctx.tokens.token_for(account)
        except RefreshError as exc:
            raise _AccountFailed(
                UpstreamFailure(
                    "reauth",
                    401,
                    error_envelope(exc.reason, "upstream_error", "token_refresh_failed"),
                )
            ) from None
        for second_try in (False, True):
            headers = upstream_ws_headers(self.headers, token, account.account_id)
            try:
                async with self.ctx.admission.work("connect"):
                    socket = await connect_upstream_websocket(
                        url,
                        headers,
                        connect_timeout=self.ctx.settings.upstream_connect_timeout,
                        max_message=self.ctx.settings.max_body_bytes,
                    )
            except UpstreamRejected as rejected:
                failure = classify(
                    rejected.status, parse_body(rejected.body), tuple(rejected.headers)
                )
                self.ctx.pool.learn_headers(account.account_id, rejected.headers)
                if failure.kind == "unauthorized" and not second_try:
                    try:
                        token = await self.ctx.tokens.refresh_after_401(account, token)
                    except RefreshError:
                        raise _AccountFailed(failure) from None
                    continue
                apply_failure(self.ctx, account, failure)
                raise _AccountFailed(failure) from None
            except UpstreamConnectError as exc:
                raise _AccountFailed(
                    UpstreamFailure(
                        "transport",
                        502,
                        error_envelope(str(exc), "upstream_error", "upstream_unavailable"),
                    )
                ) from None
            self.ctx.pool.learn_headers(account.account_id, socket.handshake_headers)
            return socket
        raise AssertionError("unreachable")

    async def drop_upstream(self) -> None:
        self.owned = set()
        if self.upstream is not None:
            socket, self.upstream = self.upstream, None
            await socket.aclose()

    # -- turns ----------------------------------------------------------------------------
    async def client_send(self, text: str) -> None:
        await self.send({"type": "websocket.send", "text": text})

    async def client_error(
        self,
        status: int,
        body: dict[str, Any],
        record: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        record.update(status=status, error_code=body.get("error", {}).get("code"))
        await self.client_send(json.dumps(ws_error_event(status, sanitize_envelope(body), headers)))

    async def turn(self, text: str, record: dict[str, Any] | None = None) -> None:
        """Relay one client message and its events (see the module docstring).

        The turn's request-log record is emitted here unless the caller passes its own."""
        own_record = record is None
        if record is None:
            record = {
                "time": self.ctx.pool.clock.now(),
                "request_id": new_request_id(),
                "route": self.scope["path"],
                "transport": "ws",
            }
        started = trio.current_time()
        try:
            try:
                message = json.loads(text)
            except ValueError:
                message = None
            if not isinstance(message, dict) or message.get("type") != "response.create":
                await self.client_error(
                    400,
                    error_envelope(
                        "Send JSON text frames of type response.create.",
                        "invalid_request_error",
                        "invalid_message",
                    ),
                    record,
                )
                return
            record["model"] = (
                message.get("model") if isinstance(message.get("model"), str) else None
            )
            anchor = message.get("previous_response_id") or None
            raw_input = message.get("input")
            client_input: list[Any] = raw_input if isinstance(raw_input, list) else []
            if anchor is None:
                self.affinity = step(self.affinity, Event.UNANCHORED_REQUEST)
            excluded: dict[str, str] = {}
            overloaded: Overloaded | None = None
            if (
                self.upstream is not None
                and trio.current_time() - self.upstream.opened_at
                > self.ctx.settings.upstream_ws_max_age
            ):
                # rotate before upstream's own age limit cuts a turn: same account (the
                # affinity is kept), and the anchor is re-anchored on the new connection
                self.ctx.counters["upstream_rotated"] += 1
                await self.drop_upstream()
            for _ in range(self.ctx.settings.max_failover_attempts + 2):
                if self.upstream is None:
                    try:
                        await self.connect(excluded)
                    except ProxyError as exc:
                        answer = exc
                        if overloaded is not None and not self.ctx.pool.all_usage_limited():
                            answer = ProxyError(429, overloaded.envelope(), overloaded.headers())
                        await self.client_error(
                            answer.status, answer.body, record, dict(answer.headers)
                        )
                        return
                assert self.upstream is not None and self.account is not None
                record["account_id"] = self.account.account_id
                outgoing = text
                parent = anchor
                if anchor is not None and anchor not in self.owned:
                    full = self.chain.full_input(anchor, client_input, self.account.account_id)
                    if full is None and self_contained(client_input):
                        # a full resend that also names the lost anchor: send it without
                        parent = None
                        outgoing = json.dumps(
                            {k: v for k, v in message.items() if k != "previous_response_id"}
                        )
                        self.ctx.counters["anchor_dropped"] += 1
                    elif full is None:
                        # not re-anchorable: the client's own recovery signal (the Codex CLI
                        # reconnects and resends in full; a bridged HTTP client gets a 502)
                        await self.client_error(*self.lost_anchor, record)
                        return
                    else:
                        outgoing = json.dumps(
                            {
                                **{k: v for k, v in message.items() if k != "previous_response_id"},
                                "input": full,
                            }
                        )
                        self.ctx.counters["reanchored"] += 1
                        log.info("re-anchored", items=len(full), account=self.account.account_id)
                try:
                    outcome = await self._relay(
                        outgoing,
                        anchored=outgoing is text and anchor is not None,
                        record=record,
                        started=started,
                    )
                except TurnRetry as retry:
                    await self._absorb(retry.failure, anchor, excluded)
                    continue
                except AtCapacity as full:
                    overloaded = full.overloaded
                    if not self.affinity.may_move:  # a pinned conversation waits its turn
                        await self.client_error(
                            429, overloaded.envelope(), record, dict(overloaded.headers())
                        )
                        return
                    excluded[self.account.account_id] = "at_capacity"
                    await self.drop_upstream()  # a soft session moves to a free account
                    continue
                if outcome.response_id:
                    self.last_response_id = outcome.response_id
                if outcome.completed and outcome.response_id:
                    self.affinity = step(self.affinity, Event.CREATED)
                    self.owned.add(outcome.response_id)
                    self.chain.remember(
                        outcome.response_id,
                        parent,
                        client_input,
                        outcome.output,
                        self.account.account_id,
                        len(text) + outcome.size,
                    )
                elif outcome.response_id:
                    self.owned.add(outcome.response_id)
                return
            await self.client_error(
                502,
                error_envelope(
                    "Upstream kept failing before the response started.",
                    "upstream_error",
                    "upstream_unavailable",
                ),
                record,
            )
        finally:
            record["duration_ms"] = round((trio.current_time() - started) * 1000, 1)
            record.setdefault("status", 499)
            if own_record:
                self.ctx.reqlog.emit(record)

    async def _absorb(
        self, failure: UpstreamFailure, anchor: str | None, excluded: dict[str, str]
    ) -> None:
        """A failure before any output: decide how the next attempt goes."""
        assert self.account is not None
        if failure.kind == "continuity":
            if anchor is not None:
                self.owned.discard(anchor)  # upstream forgot it: re-anchor on this connection
            return
        await self.drop_upstream()
        if failure.kind in ACCOUNT_LEVEL:
            apply_failure(self.ctx, self.account, failure)
            excluded[self.account.account_id] = failure.kind
            self.affinity = step(self.affinity, Event.ACCOUNT_FAILURE)
        else:
            # closes, 1011, transport errors, 5xx: a hard session reconnects to its account
            if self.affinity.may_move:
                excluded[self.account.account_id] = failure.kind
            self.affinity = step(self.affinity, Event.CLOSED_BEFORE_CREATED)

    async def _relay(
        self, text: str, *, anchored: bool, record: dict[str, Any], started: float
    ) -> Outcome:
        """Send one message and relay its events. The account's ``stream`` slot is held for
        the whole turn, its ``create`` slot until the first output event."""
        assert self.upstream is not None and self.account is not None
        account = self.account
        admission = self.ctx.admission
        turn = _Turn(anchored, record, started)
        admitted = False
        try:
            async with admission.account_slot(account.account_id, "stream"):
                account.in_flight += 1
                try:
                    async with (
                        admission.account_slot(account.account_id, "create"),
                        admission.work("create"),
                    ):
                        admitted = True
                        try:
                            await self.upstream.send_text(text)
                        except UpstreamClosed as closed:
                            raise TurnRetry(_closed_failure(closed.code)) from None
                        while not (turn.output_started or turn.done):
                            await self._step(turn)
                    while not turn.done:
                        await self._step(turn)
                finally:
                    account.in_flight -= 1
        except Overloaded as exc:
            if admitted:
                raise
            raise AtCapacity(exc) from None
        return turn.outcome

    async def _step(self, turn: _Turn) -> None:
        """Relay one upstream frame of the turn in flight."""
        assert self.upstream is not None and self.account is not None
        upstream, account, record = self.upstream, self.account, turn.record
        try:
            data = await upstream.receive()
        except UpstreamClosed as closed:
            await self.drop_upstream()
            if not turn.output_started:
                raise TurnRetry(_closed_failure(closed.code)) from None
            # output reached the client: close it the way upstream closed us; the Codex CLI
            # reconnects and resends in full
            record.update(status=502, error_code=f"upstream_closed_{closed.code}")
            await self.send(
                {
                    "type": "websocket.close",
                    "code": 1011 if closed.code in (1006, 1011) else closed.code,
                }
            )
            raise SessionOver() from None
        if isinstance(data, bytes):
            return
        kind = peek_type(data)
        if kind == "codex.rate_limits":
            self.ctx.pool.learn_event(account.account_id, json.loads(data))
            if turn.output_started:
                await self.client_send(data)
            else:
                turn.held = data  # waits for the turn to commit
            return
        if not turn.output_started and kind in ("error", "response.failed"):
            event = json.loads(data)
            failure = classify_failed_event(event)
            if failure is not None and (
                failure.failover or (failure.kind == "continuity" and turn.anchored)
            ):
                raise TurnRetry(failure)
            if failure is not None and failure.kind == "request":
                self.affinity = step(self.affinity, Event.REQUEST_FAILURE)
        outcome = turn.outcome
        if kind in TERMINAL:
            event = json.loads(data)
            _note_terminal(record, event)
            if kind == "error":
                data = json.dumps(
                    {
                        **event,
                        "error": sanitize_envelope({"error": event.get("error") or {}})["error"],
                    }
                )
            if turn.held is not None:
                await self.client_send(turn.held)
            await self.client_send(data)
            record.setdefault("status", 200)
            outcome.completed = kind == "response.completed"
            turn.done = True
            return
        if kind == "response.created" and outcome.response_id is None:
            response = json.loads(data).get("response") or {}
            outcome.response_id = response.get("id") if isinstance(response, dict) else None
        elif kind == "response.output_item.done":
            outcome.output.append(json.loads(data).get("item"))
            outcome.size += len(data)
        if not turn.output_started:
            turn.output_started = True
            record["ttfb_ms"] = round((trio.current_time() - turn.started) * 1000, 1)
            if turn.held is not None:
                await self.client_send(turn.held)
                turn.held = None
        await self.client_send(data)


@attrs.define(eq=False)
class _Turn:
    """The state of the turn being relayed."""

    anchored: bool
    record: dict[str, Any]
    started: float
    outcome: Outcome = attrs.field(factory=Outcome)
    output_started: bool = False
    done: bool = False
    held: str | None = None  # a codex.rate_limits frame waiting for the turn to commit


class AtCapacity(Exception):
    """The account's per-account slots are all taken (after the configured wait)."""

    def __init__(self, overloaded: Overloaded) -> None:
        super().__init__(overloaded.lane)
        self.overloaded = overloaded


def _closed_failure(code: int) -> UpstreamFailure:
    return UpstreamFailure(
        "transport",
        502,
        error_envelope(
            f"upstream closed ({code}) before response.created",
            "upstream_error",
            "upstream_unavailable",
        ),
    )


class _AccountFailed(Exception):
    def __init__(self, failure: UpstreamFailure) -> None:
        super().__init__(failure.kind)
        self.failure = failure


class SessionOver(Exception):
    """The session must end (the downstream socket was closed)."""


def peek_type(text: str) -> str | None:
    at = text.find('"type":"')
    if at == -1 or at > 200:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value.get("type") if isinstance(value, dict) else None
    end = text.find('"', at + 8)
    return text[at + 8 : end] if end != -1 else None


def _note_terminal(record: dict[str, Any], event: dict[str, Any]) -> None:
    kind = event.get("type")
    response = record_usage(record, event)
    if kind == "response.completed":
        record["status"] = 200
    elif kind == "error":
        record["status"] = event.get("status") or 400
        error = event.get("error") or {}
        record["error_code"] = (
            error.get("code") or error.get("type") if isinstance(error, dict) else "error"
        )
    else:
        error = response.get("error") or {}
        record["status"] = 200
        record["error_code"] = (error.get("code") if isinstance(error, dict) else None) or kind


async def handle_ws_responses(
    ctx: ProxyContext, scope: Scope, receive: Receive, send: Send
) -> None:
    """ASGI handler for a downstream WebSocket session."""
    request_id = new_request_id()
    structlog.contextvars.bind_contextvars(
        request_id=request_id, route=scope["path"], transport="ws"
    )
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    headers = scope_headers(scope)
    try:
        ctx.refuse_if_draining()
        await ctx.authorize(headers, client_host(scope))
    except ProxyError as exc:
        await deny(scope, send, exc.status, exc.body, exc.headers)
        return
    accepted = False
    async with trio.open_nursery() as nursery:
        # hypercorn never cancels the app: until the handshake is accepted, a task waits for
        # the client's disconnect (the only message it can send then), so a client gone while
        # its upgrade waits for the lane, a token refresh or the upstream connect ends the
        # attempt at once instead of holding the slots until that step is done
        before_accept = trio.CancelScope()
        nursery.start_soon(_leave_on_disconnect, receive, before_accept, nursery.cancel_scope)
        try:
            async with ctx.admission.lease("proxy_websocket"):
                accepted = True
                await _session(ctx, scope, receive, send, headers, request_id, before_accept)
        except Overloaded as exc:
            if accepted:
                raise
            # a full lane refuses the upgrade with an HTTP answer, never an accepted socket
            await deny(scope, send, 429, exc.envelope(), exc.headers())
        nursery.cancel_scope.cancel(reason="upgrade handled")


async def _leave_on_disconnect(
    receive: Receive, watching: trio.CancelScope, attempt: trio.CancelScope
) -> None:
    with watching:  # cancelled right before the accept: the session's reader takes over
        while (await receive())["type"] != "websocket.disconnect":
            pass
        attempt.cancel(reason="client left before the handshake completed")


async def _session(
    ctx: ProxyContext,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: list[tuple[str, str]],
    request_id: str,
    before_accept: trio.CancelScope,
) -> None:
    """One admitted WebSocket session: a nursery owning the upstream socket (closed in the
    ``finally``), the client reader and the idle timer. ``before_accept`` (the disconnect
    watcher of the handshake) is cancelled just before the accept."""
    ctx.counters["websocket_sessions"] += 1
    session = WsSession(
        ctx,
        scope,
        send,
        headers,
        RequestInfo(session_key=session_key(headers, bridge_key(headers, {}))),
        request_id,
        chain=ResponseChain(max_bytes=ctx.settings.reanchor_max_bytes, budget=ctx.chain_budget),
    )
    try:
        try:
            await session.connect({})
        except ProxyError as exc:
            await deny(scope, send, exc.status, exc.body, exc.headers)
            return
        assert session.upstream is not None
        before_accept.cancel()
        await send(
            {
                "type": "websocket.accept",
                "headers": _encode(
                    passthrough_response_headers(session.upstream.handshake_headers)
                ),
            }
        )
        inbox_send, inbox = trio.open_memory_channel[str](4)
        idle = IdleTimer(ctx.settings.ws_idle_timeout)
        async with trio.open_nursery() as nursery:

            async def read_client() -> None:
                async with inbox_send:
                    while True:
                        event = await receive()
                        if event["type"] == "websocket.disconnect":
                            nursery.cancel_scope.cancel(reason="client disconnected")
                            return
                        text = event.get("text")
                        if text is None and event.get("bytes") is not None:
                            await send(
                                {
                                    "type": "websocket.send",
                                    "text": json.dumps(
                                        ws_error_event(
                                            400,
                                            error_envelope(
                                                "Binary frames are not supported; send JSON text frames.",
                                                "invalid_request_error",
                                                "invalid_frame",
                                            ),
                                        )
                                    ),
                                }
                            )
                            continue
                        if text is not None and len(text) > ctx.settings.max_body_bytes:
                            await send({"type": "websocket.close", "code": 1009})
                            nursery.cancel_scope.cancel(reason="message too big")
                            return
                        if text is not None:
                            idle.begin()  # pending from the moment it is read
                            await inbox_send.send(text)

            async def reap() -> None:
                # 1000 between turns: the Codex CLI opens a new socket on its next turn
                ctx.counters["websocket_idle_closed"] += 1
                await send({"type": "websocket.close", "code": 1000, "reason": "idle"})
                nursery.cancel_scope.cancel(reason="idle")

            async def drain() -> None:
                # shutdown: an idle session closes now, a busy one right after its turn;
                # 1001 is a close the Codex CLI recovers from by reconnecting (elsewhere)
                await ctx.drain_started.wait()
                while idle.busy_count:
                    await idle.settled.wait()
                await send(
                    {"type": "websocket.close", "code": 1001, "reason": "server shutting down"}
                )
                nursery.cancel_scope.cancel(reason="draining")

            nursery.start_soon(read_client)
            nursery.start_soon(idle.run, reap)
            nursery.start_soon(drain)
            try:
                async for text in inbox:
                    try:
                        await session.turn(text)
                    finally:
                        idle.end()
            except SessionOver:
                pass
            nursery.cancel_scope.cancel(reason="session over")
    finally:
        session.chain.close()
        await session.drop_upstream()
        structlog.contextvars.unbind_contextvars("request_id", "route", "transport", "account")
