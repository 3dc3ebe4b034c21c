"""Downstream WebSocket sessions (``/backend-api/codex/responses`` and ``/v1/responses``).

A session is one nursery that owns, for exactly its own life: the upstream WebSocket, the
task reading the client, and the per-turn relay. Leaving it for any reason (the client
leaves, an error, shutdown) closes the upstream socket in the ``finally`` of ``serve``.

The upstream connection is opened before the client's handshake is accepted, so the
upstream's handshake headers (turn state, rate limits, models etag) reach the client in its
101, and a pool that cannot serve refuses the upgrade with an HTTP answer (429/503).

Per turn (one ``response.create`` in flight per socket, as the Codex CLI does): the message
goes upstream, events come back as they arrive. Before ``response.created``, an
account-level failure (usage limit, auth, overload, a close) of a request that does not name
a ``previous_response_id`` is absorbed: the upstream socket is replaced by one on the next
account and the same message is sent again. A request that names an anchor stays on its
connection and account (the anchor lives nowhere else; issue 4 adds re-anchoring).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import structlog
import trio

from trioproxy.accounts.pool import Account, RequestInfo
from trioproxy.accounts.refresh import RefreshError
from trioproxy.logs import get_logger
from trioproxy.protocol.errors import error_envelope, ws_error_event
from trioproxy.protocol.headers import passthrough_response_headers, upstream_ws_headers
from trioproxy.protocol.upstream_errors import (
    UpstreamFailure,
    classify,
    classify_failed_event,
    parse_body,
    sanitize_envelope,
)
from trioproxy.sessions.context import ProxyContext, ProxyError
from trioproxy.sessions.http_turn import new_request_id, session_key
from trioproxy.sessions.upstream_turn import (
    apply_failure,
    exhausted_answer,
    json_bytes,
    no_account_answer,
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
                        *(headers or []),
                    ]
                ),
            }
        )
        await send({"type": "websocket.http.response.body", "body": data})
    else:
        await send({"type": "websocket.close", "code": 1008})


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

    # -- upstream connection --------------------------------------------------------------
    async def connect(self, excluded: dict[str, str], *, stay_on: Account | None = None) -> None:
        """Open an upstream socket (replacing any), trying accounts until one accepts."""
        await self.drop_upstream()
        url = self.ctx.ws_upstream_url()
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
                self.account = account
                structlog.contextvars.bind_contextvars(account=account.account_id)
                return
            except ProxyError:
                raise
            except _AccountFailed as failed:
                last = failed.failure
                excluded[account.account_id] = last.kind
                if stay_on is not None or not last.failover:
                    break
        if self.ctx.pool.all_usage_limited():
            raise exhausted_answer(self.ctx)
        if (
            last is not None
            and not last.failover
            and last.kind not in ("reauth", "unauthorized", "deactivated", "forbidden")
        ):
            raise ProxyError(last.status, sanitize_envelope(last.body))
        if last is not None and last.kind in ("transport", "server_error", "overloaded"):
            raise ProxyError(
                last.status if last.status >= 500 else 502, sanitize_envelope(last.body)
            )
        raise no_account_answer(decision, self.ctx)

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
        if self.upstream is not None:
            socket, self.upstream = self.upstream, None
            await socket.aclose()

    # -- turns ----------------------------------------------------------------------------
    async def client_send(self, text: str) -> None:
        await self.send({"type": "websocket.send", "text": text})

    async def turn(self, text: str) -> None:
        """Relay one client message and its events; failover while nothing was sent back."""
        record: dict[str, Any] = {
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
                record.update(status=400, error_code="invalid_message")
                await self.client_send(
                    json.dumps(
                        ws_error_event(
                            400,
                            error_envelope(
                                "Send JSON text frames of type response.create.",
                                "invalid_request_error",
                                "invalid_message",
                            ),
                        )
                    )
                )
                return
            record["model"] = (
                message.get("model") if isinstance(message.get("model"), str) else None
            )
            anchored = bool(message.get("previous_response_id"))
            excluded: dict[str, str] = {}
            for _ in range(self.ctx.settings.max_failover_attempts + 1):
                if self.upstream is None:
                    try:
                        await self.connect(excluded, stay_on=self.account if anchored else None)
                    except ProxyError as exc:
                        record.update(
                            status=exc.status, error_code=exc.body.get("error", {}).get("code")
                        )
                        await self.client_send(
                            json.dumps(ws_error_event(exc.status, exc.body, dict(exc.headers)))
                        )
                        return
                assert self.upstream is not None and self.account is not None
                record["account_id"] = self.account.account_id
                try:
                    await self._relay(text, anchored, record, started)
                    return
                except TurnRetry as retry:
                    excluded[self.account.account_id] = retry.failure.kind
                    apply_failure(self.ctx, self.account, retry.failure)
                    await self.drop_upstream()
                    if anchored:
                        # the anchor lives only on that connection: tell the client (it resends in full)
                        body = sanitize_envelope(retry.failure.body)
                        await self.client_send(
                            json.dumps(ws_error_event(retry.failure.status, body))
                        )
                        record.update(status=retry.failure.status, error_code=retry.failure.code)
                        return
        finally:
            record["duration_ms"] = round((trio.current_time() - started) * 1000, 1)
            record.setdefault("status", 499)
            self.ctx.reqlog.emit(record)

    async def _relay(
        self, text: str, anchored: bool, record: dict[str, Any], started: float
    ) -> None:
        assert self.upstream is not None and self.account is not None
        upstream, account = self.upstream, self.account
        try:
            await upstream.send_text(text)
        except UpstreamClosed as closed:
            raise TurnRetry(
                UpstreamFailure(
                    "transport",
                    502,
                    error_envelope(
                        f"upstream closed ({closed.code})", "upstream_error", "upstream_unavailable"
                    ),
                )
            ) from None
        output_started = False
        held: str | None = None  # a codex.rate_limits frame waiting for the turn to commit
        account.in_flight += 1
        try:
            while True:
                try:
                    data = await upstream.receive()
                except UpstreamClosed as closed:
                    await self.drop_upstream()
                    if not output_started:
                        raise TurnRetry(
                            UpstreamFailure(
                                "transport",
                                502,
                                error_envelope(
                                    f"upstream closed ({closed.code}) before response.created",
                                    "upstream_error",
                                    "upstream_unavailable",
                                ),
                            )
                        ) from None
                    # output reached the client: close it the way upstream closed us; the
                    # Codex CLI reconnects and resends in full
                    record.update(status=502, error_code=f"upstream_closed_{closed.code}")
                    await self.send(
                        {
                            "type": "websocket.close",
                            "code": 1011 if closed.code in (1006, 1011) else closed.code,
                        }
                    )
                    raise _SessionOver() from None
                if isinstance(data, bytes):
                    continue
                kind = _peek_type(data)
                if kind == "codex.rate_limits":
                    event = json.loads(data)
                    self.ctx.pool.learn_event(account.account_id, event)
                    if output_started:
                        await self.client_send(data)
                    else:
                        held = data
                    continue
                if kind in TERMINAL or (not output_started and kind == "error"):
                    event = json.loads(data)
                    if not output_started:
                        failure = classify_failed_event(event)
                        if failure is not None and failure.failover and not anchored:
                            raise TurnRetry(failure)
                    _note_terminal(record, event)
                    if kind == "error":
                        data = json.dumps(
                            {
                                **event,
                                "error": sanitize_envelope({"error": event.get("error") or {}})[
                                    "error"
                                ],
                            }
                        )
                    if held is not None:
                        await self.client_send(held)
                    await self.client_send(data)
                    record.setdefault("status", 200)
                    return
                if not output_started:
                    output_started = True
                    record["ttfb_ms"] = round((trio.current_time() - started) * 1000, 1)
                    if held is not None:
                        await self.client_send(held)
                        held = None
                await self.client_send(data)
        finally:
            account.in_flight -= 1


class _AccountFailed(Exception):
    def __init__(self, failure: UpstreamFailure) -> None:
        super().__init__(failure.kind)
        self.failure = failure


class _SessionOver(Exception):
    """The session must end (the downstream socket was closed)."""


def _peek_type(text: str) -> str | None:
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
        await ctx.authorize(headers, client_host(scope))
    except ProxyError as exc:
        await deny(scope, send, exc.status, exc.body, exc.headers)
        return
    session = WsSession(
        ctx, scope, send, headers, RequestInfo(session_key=session_key(headers, {})), request_id
    )
    try:
        try:
            await session.connect({})
        except ProxyError as exc:
            await deny(scope, send, exc.status, exc.body, exc.headers)
            return
        assert session.upstream is not None
        await send(
            {
                "type": "websocket.accept",
                "headers": _encode(
                    passthrough_response_headers(session.upstream.handshake_headers)
                ),
            }
        )
        inbox_send, inbox = trio.open_memory_channel[str](4)
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
                            await inbox_send.send(text)

            nursery.start_soon(read_client)
            try:
                async for text in inbox:
                    await session.turn(text)
            except _SessionOver:
                pass
            nursery.cancel_scope.cancel(reason="session over")
    finally:
        await session.drop_upstream()
        structlog.contextvars.unbind_contextvars("request_id", "route", "transport", "account")
