"""Responses over WebSocket: the upgrade on ``/backend-api/codex/responses`` and the turns of
one connection.

Each text message is a ``response.create``; its answer is the same event sequence as over
HTTP, one JSON text message per event. An error before the first event is an ``error`` event
(with ``status``, and ``headers`` for a usage limit) and the socket stays usable, except after
``websocket_connection_limit_reached``, which closes it. A ``response.processed`` message (the
client has handled a response) is counted and answered with nothing; any other type is
refused with an ``error`` event. Like the real backend with
``store: false``, a ``previous_response_id`` is only known to the connection that produced it
(``ConnectionStore``).

Keep-alive (``ws_ping_interval``, ``ws_ping_timeout``): like a server that pings its clients,
the mock pings each connection every ``ws_ping_interval`` seconds, between turns and during
them, and closes one whose pong does not come within ``ws_ping_timeout`` with 1011
(``keepalive ping timeout``); pings sent, pongs received and such closes are counted.
``POST /__mock__/websockets/close`` closes every open connection (``close_all``), as
upstream does now and then between turns."""

from __future__ import annotations

import collections
import functools
import itertools
import json
from typing import Any

import attrs
import trio

from trioproxy.harness.mock_upstream.accounts import MockAccount
from trioproxy.harness.mock_upstream.backend import MockBackend
from trioproxy.harness.mock_upstream.errors import Failure, invalid_request, prev_not_found
from trioproxy.harness.mock_upstream.faults import Fault
from trioproxy.harness.mock_upstream.recorder import RequestRecord
from trioproxy.harness.mock_upstream.transport import (
    Exchange,
    Request,
    WebSocket,
    WebSocketClosed,
    run_websocket,
)
from trioproxy.harness.mock_upstream.turns import before_stream, stream_events
from trioproxy.harness.mock_upstream.writers import WsAnswer, reply

WS_BETA = "responses_websockets=2026-02-06"
MAX_STORED_RESPONSES = 256


@attrs.define(eq=False)
class ConnectionStore:
    """Per-WebSocket ``previous_response_id`` state: response id -> (parent, input, output)."""

    entries: collections.OrderedDict[str, tuple[str | None, list[Any], list[Any]]] = attrs.field(
        factory=collections.OrderedDict
    )

    def context(self, response_id: str) -> list[Any] | None:
        """The conversation up to and including ``response_id``'s output (None: unknown)."""
        if response_id not in self.entries:
            return None
        chain: list[tuple[list[Any], list[Any]]] = []
        current: str | None = response_id
        while current is not None and current in self.entries:
            parent, inp, out = self.entries[current]
            chain.append((inp, out))
            current = parent
        items: list[Any] = []
        for inp, out in reversed(chain):
            items += inp
            items += out
        return items

    def remember(
        self, response_id: str, parent: str | None, inp: list[Any], out: list[Any]
    ) -> None:
        self.entries[response_id] = (parent, inp, out)
        while len(self.entries) > MAX_STORED_RESPONSES:
            self.entries.popitem(last=False)


async def websocket_session(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    """The WebSocket upgrade, then the connection's turns until it closes."""
    try:
        account = backend.authenticate(request)
        record.account = account.account_id
        backend.check_turn_state(account, request)
        mode = await _upgrade_fault(backend, exchange, record, account)
        beta = request.header("openai-beta") or ""
        if WS_BETA not in [t.strip() for t in beta.split(",")]:
            raise invalid_request(
                f"Responses over WebSocket need the header OpenAI-Beta: {WS_BETA}.",
                "invalid_beta_header",
            )
    except Failure as failure:
        await reply(exchange, record, failure.status, failure.body, failure.headers)
        return
    record.status = 101
    ws = await exchange.accept_websocket(backend.response_headers(account, request))
    backend.stats.ws_connections_total += 1
    backend.stats.ws_open += 1
    backend.websockets.add(ws)
    record.open = True
    session = WsSession(backend, ws, record, account, mode=mode)
    config = backend.config
    keepalive = None
    if config.ws_ping_interval > 0:
        keepalive = functools.partial(
            keep_alive, backend, config.ws_ping_interval, config.ws_ping_timeout
        )
    try:
        await run_websocket(ws, session.serve, keepalive)
    finally:
        backend.websockets.discard(ws)
        backend.stats.ws_open -= 1
        record.open = False
        record.close_code = ws.close_code


async def keep_alive(backend: MockBackend, interval: float, patience: float, ws: WebSocket) -> None:
    """Ping every ``interval`` seconds; a pong missing after ``patience`` seconds closes the
    connection with 1011, and this returns (see the module docstring)."""
    for number in itertools.count(1):
        await trio.sleep(interval)
        try:
            pong = await ws.ping(b"%d" % number)
        except WebSocketClosed:
            return
        backend.stats.ws_pings_sent += 1
        with trio.move_on_after(patience):
            await pong.wait()
            backend.stats.ws_pongs_received += 1
            continue
        backend.stats.ws_ping_timeouts += 1
        await ws.close(1011, "keepalive ping timeout")
        return


async def close_all(backend: MockBackend, code: int, reason: str) -> int:
    """Close every open WebSocket connection (a close frame; each reader finishes the
    handshake); how many."""
    sockets = list(backend.websockets)
    for ws in sockets:
        await ws.close(code, reason)
    backend.stats.ws_closed_by_control += len(sockets)
    return len(sockets)


async def _upgrade_fault(
    backend: MockBackend, exchange: Exchange, record: RequestRecord, account: MockAccount
) -> str | None:
    """Apply a fault at the upgrade; returns the segmentation a ``segmentation`` fault sets
    for every turn of the connection."""
    fault = backend.take_fault("upgrade", account.account_id, "ws")
    if fault is None:
        return None
    record.fault = fault.kind
    if fault.kind == "segmentation":
        return str(fault.params["mode"])
    if fault.kind == "stall":
        await exchange.pause(fault.params["seconds"])
    elif fault.kind in ("close_before_created", "close_after_created"):
        await exchange.abort()
    else:
        failure = backend.fault_failure(fault, account)
        if failure is not None:
            raise failure
    return None


def parse_create(message: str | bytes, record: RequestRecord) -> dict[str, Any]:
    """A ``response.create`` message's body (recorded as soon as it parses)."""
    if isinstance(message, bytes):
        raise invalid_request(
            "Binary frames are not supported; send JSON text frames.", "invalid_frame"
        )
    try:
        body = json.loads(message)
    except ValueError:
        raise invalid_request(
            "We could not parse the JSON body of your request.", "invalid_json"
        ) from None
    record.body = body
    if not isinstance(body, dict) or body.get("type") != "response.create":
        raise invalid_request(
            "Unsupported message type; expected response.create.", "invalid_message_type", "type"
        )
    return body


def processed(message: str | bytes) -> bool:
    """Whether a message is a ``response.processed`` (which gets no answer)."""
    if isinstance(message, bytes) or "response.processed" not in message[:200]:
        return False
    try:
        body = json.loads(message)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("type") == "response.processed"


@attrs.define(eq=False)
class WsSession:
    """One accepted connection: its account, the responses it produced, and the
    segmentation a fault at its upgrade set (None: the configured one)."""

    backend: MockBackend
    ws: WebSocket
    record: RequestRecord  # the upgrade's record, which holds the frames
    account: MockAccount
    store: ConnectionStore = attrs.field(factory=ConnectionStore)
    mode: str | None = None

    async def serve(self, ws: WebSocket) -> None:
        while True:
            message = await ws.receive()
            self.backend.stats.ws_messages += 1
            await self.turn(message)

    def answer(self, fault: Fault | None) -> WsAnswer:
        segmenter = self.backend.segmenter(fault, self.mode)
        return WsAnswer(self.ws, segmenter, self.backend.recorder, self.record)

    async def turn(self, message: str | bytes) -> None:
        """Answer one message: an ``error`` event, or a response's events (nothing for a
        ``response.processed``)."""
        if processed(message):
            self.backend.stats.processed_messages += 1
            self.backend.recorder.frame(self.record, "in", message)
            return
        record = self.backend.recorder.ws_message(self.record, message)
        fault: Fault | None = None
        context: list[Any] = []
        try:
            body = parse_create(message, record)
            fault = self.backend.take_fault("responses", self.account.account_id, "ws")
            if fault is not None:
                record.fault = fault.kind
            prev = body.get("previous_response_id")
            if prev and (fault is None or fault.kind != "previous_response_not_found"):
                found = self.store.context(str(prev))
                if found is None:
                    raise Failure(400, prev_not_found(str(prev)))
                context = found
            body = await before_stream(self.backend, body, self.account, fault, context, ws=self.ws)
        except Failure as failure:
            await self.error(record, failure, fault)
            return
        await self.respond(record, body, context, fault)

    async def error(self, record: RequestRecord, failure: Failure, fault: Fault | None) -> None:
        """The ``error`` event of a refused message; a connection limit closes the socket."""
        error = failure.body["error"]
        record.status = failure.status
        record.error_code = error.get("code") or error.get("type")
        event: dict[str, Any] = {"type": "error", "status": failure.status, "error": error}
        if failure.headers:
            event["headers"] = failure.headers
        limit = fault is not None and fault.kind == "connection_limit"
        if limit and fault is not None and not int(fault.params["status"]):
            del event["status"]  # (some upstream error events carry none)
        answer = self.answer(fault)
        await answer.send(
            event, multiline=limit and fault is not None and bool(fault.params["pretty"])
        )
        await answer.finish()
        if error.get("code") == "websocket_connection_limit_reached":
            await self.ws.close(1000, "connection limit reached")
            raise WebSocketClosed(1000)

    async def respond(
        self, record: RequestRecord, body: dict[str, Any], context: list[Any], fault: Fault | None
    ) -> None:
        """Stream the response's events; a completed one is remembered for later turns."""
        plan = self.backend.plan(body, context, self.account, fault)
        record.status = 200
        record.response_id = plan.events[0]["response"]["id"]
        answer = self.answer(fault)
        outcome = await stream_events(
            self.backend, plan, self.account, fault, answer.send, answer.drop, record
        )
        if outcome != "dropped":
            await answer.finish()
        if outcome == "completed":
            prev = body.get("previous_response_id")
            self.store.remember(
                record.response_id,
                str(prev) if prev else None,
                list(body.get("input") or []),
                plan.output,
            )
