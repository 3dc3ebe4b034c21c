"""The load generator's clients: a keep-alive HTTP/1.1 SSE client (httptools over a trio
stream) and a Responses-over-WebSocket client (the proxy's own wsproto client, which closes
its socket on every exit path).

Why not httpx for the load: httpx runs on trio through anyio, layers a parser driven directly
does not pay for on every chunk, and the generator shares the machine's CPUs with the proxy and
the mock, so what it spends is taken from what it measures. The clients parse only what a measurement needs: frame
boundaries, the event type (a regex on the frame), and the JSON of ``response.created`` and
of terminal events.

Resource handling: ``HttpClient`` owns at most one TCP stream; ``aclose()`` is idempotent and
shielded. A turn that is abandoned, fails or times out closes its connection (the next turn
opens a fresh one), so no half-read response is ever reused. WebSocket sessions are
``async with open_upstream_websocket(...)`` blocks in the scenarios.

Error handling: nothing raises out of a turn except cancellation; every failure becomes
``TurnOutcome.error`` (an error code from the envelope, ``http_<status>``, or a transport
code such as ``connect_error``, ``connection_lost``, ``ws_closed_1011``, ``incomplete``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol

import attrs
import httpx
import trio

from trioproxy.protocol.events import PREAMBLE
from trioproxy.upstream.transport import ResponseParser
from trioproxy.upstream.ws import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamWebSocket,
)

READ_SIZE = 65536
TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
_PARSED = TERMINAL | {"response.created"}
_TYPE = re.compile(rb'"type"\s*:\s*"([^"]+)"')
_TYPE_TEXT = re.compile(r'"type"\s*:\s*"([^"]+)"')
#: the Responses events that carry content: the first of them is what a translated front's
#: first content chunk is made from
CONTENT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
    }
)


class FrameReader(Protocol):
    """How a turn reads the SSE frames of a translated front (``fronts.py``): each whole
    frame (without its blank line) updates the outcome; a terminal frame sets
    ``outcome.terminal``."""

    def see_frame(self, outcome: TurnOutcome, frame: bytes) -> None: ...


@attrs.define(eq=False)
class TurnOutcome:
    """What one request/response turn did, as seen by the client."""

    started: float
    # seconds from send to the first output event: the first event past upstream's preamble
    # (response.created, response.in_progress, rate limits: ``PREAMBLE``), which a proxy may
    # hold back as its failover point; measured the same way direct and through a proxy
    ttfb: float | None = None
    ended: float | None = None
    status: int = 0
    events: int = 0
    nbytes: int = 0
    response_id: str | None = None
    terminal: dict[str, Any] | None = None
    error: str | None = None
    overload: bool = False  # 429 proxy_overloaded with x-trioproxy-overload
    abandoned: bool = False
    # seconds from send to the first event or frame of any kind (the first body bytes)
    first_frame: float | None = None
    # the event types that stop the ``ttfb`` clock (None: the first past the preamble);
    # ``CONTENT_DELTAS`` times a Responses turn at its first content delta, as the
    # translated fronts' turns are timed (``fronts.py``)
    ttfb_kinds: frozenset[str] | None = None
    # the terminal event type of a turn that completed (a front's: ``[DONE]``, ``message_stop``)
    success: str = "response.completed"

    @property
    def completed(self) -> bool:
        return (
            self.error is None
            and self.terminal is not None
            and self.terminal.get("type") == self.success
        )

    @property
    def latency(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    def see_event(self, kind: str | None, payload: bytes | str | None) -> None:
        self.events += 1
        if self.ttfb is None:
            if self.first_frame is None:
                self.first_frame = trio.current_time() - self.started
            if (kind not in PREAMBLE) if self.ttfb_kinds is None else (kind in self.ttfb_kinds):
                self.ttfb = trio.current_time() - self.started
        if kind not in _PARSED or payload is None:
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self.error = "bad_json"
            return
        if not isinstance(event, dict):
            return
        if kind == "response.created":
            response = event.get("response")
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.response_id = response["id"]
            return
        self.terminal = event
        if kind != "response.completed":
            self.error = event_error_code(event)


def event_error_code(event: dict[str, Any]) -> str:
    kind = event.get("type")
    if kind == "response.incomplete":
        return "response_incomplete"
    if kind == "response.failed":
        response = event.get("response") or {}
        err = response.get("error") if isinstance(response, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        return f"response_failed:{code or 'unknown'}"
    err = event.get("error")
    if isinstance(err, dict):
        return str(err.get("code") or err.get("type") or f"ws_error_{event.get('status')}")
    return "error_event"


def envelope_code(status: int, body: bytes | str) -> str:
    """The error code of an HTTP error answer (``error.code``, else ``error.type``)."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and (err.get("code") or err.get("type")):
        return str(err.get("code") or err.get("type"))
    return f"http_{status}"


@attrs.define(eq=False)
class HttpClient:
    """One keep-alive HTTP/1.1 connection to ``host:port``, opened on first use.

    Answers are parsed by the proxy's own upstream parser (``ResponseParser``: httptools,
    llhttp in C; the Codex CLI's parser is compiled too), so that a time to first event holds
    as little of the instrument's own parsing as possible. That matters because the two
    targets deliver the head differently: the mock sends it at once, while a proxy holds it
    until upstream's first event (it may still fail over), so through a proxy the head is
    parsed in the same step as the first event, and a slow parser would charge its time to
    the proxy."""

    host: str
    port: int
    headers: list[tuple[str, str]] = attrs.field(factory=list)
    stream: trio.SocketStream | None = None
    _reusable: bool = False  # the last answer was read whole and the server keeps the connection

    async def aclose(self) -> None:
        stream, self.stream, self._reusable = self.stream, None, False
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _connection(self) -> trio.SocketStream:
        if self.stream is None or not self._reusable:
            await self.aclose()
            self.stream = await trio.open_tcp_stream(self.host, self.port)
        self._reusable = False
        return self.stream

    @staticmethod
    async def _read(stream: trio.SocketStream, parser: ResponseParser) -> bool:
        """Read once and parse; False when the server closed the connection."""
        data = await stream.receive_some(READ_SIZE)
        if not data:
            return False
        parser.feed(data, None)
        return True

    def _request_bytes(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> bytes:
        lines = [
            f"POST {path} HTTP/1.1",
            f"host: {self.host}:{self.port}",
            "content-type: application/json",
            "accept: text/event-stream",
            f"content-length: {len(body)}",
            *(f"{k}: {v}" for k, v in (*self.headers, *headers)),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def sse_turn(
        self,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        *,
        abandon_after: int | None = None,
        limit: float = 60.0,
        ttfb_kinds: frozenset[str] | None = None,
        reader: FrameReader | None = None,
    ) -> TurnOutcome:
        """POST one Responses request and read its SSE stream to the terminal event (at most
        ``limit`` seconds).

        ``abandon_after``: close the connection once that many events arrived (0: right after
        the status line), like a client that goes away mid-stream. ``ttfb_kinds``: the event
        types that stop the TTFB clock (default: the first past the preamble). ``reader``:
        the stream is a translated front's (Chat Completions, Anthropic Messages), whose
        frames ``reader`` reads instead."""
        outcome = TurnOutcome(started=trio.current_time(), ttfb_kinds=ttfb_kinds)
        try:
            with trio.move_on_after(limit):
                if reader is None:
                    await self._sse_turn(outcome, path, body, headers, abandon_after)
                else:
                    await self._front_turn(outcome, path, body, headers, reader)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            outcome.error = outcome.error or (
                "connect_error"
                if outcome.status == 0 and self.stream is None
                else "connection_lost"
            )
            await self.aclose()
        except httpx.RemoteProtocolError:  # what the parser raises for a broken answer
            outcome.error = "http_protocol_error"
            await self.aclose()
        finally:
            if outcome.ended is None:
                outcome.ended = trio.current_time()
                if outcome.error is None and not outcome.abandoned and outcome.terminal is None:
                    outcome.error = "timeout"
                await self.aclose()
        return outcome

    async def _sse_turn(
        self,
        outcome: TurnOutcome,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        abandon_after: int | None,
    ) -> None:
        stream = await self._connection()
        out = self._request_bytes(path, body, headers)
        parser = ResponseParser()
        outcome.started = trio.current_time()
        await stream.send_all(out)
        while (answer := parser.final()) is None:
            if not await self._read(stream, parser):
                raise trio.BrokenResourceError("closed before the status line")
        outcome.status = answer.status
        if abandon_after == 0:
            outcome.abandoned = True
            outcome.ended = trio.current_time()
            await self.aclose()
            return
        if answer.status != 200:
            while not answer.done and await self._read(stream, parser):
                pass
            outcome.ended = trio.current_time()
            outcome.error = envelope_code(answer.status, b"".join(answer.body))
            outcome.overload = answer.status == 429 and any(
                k == b"x-trioproxy-overload" for k, _ in answer.headers
            )
            self._reusable = answer.done and answer.keep_alive and not parser.spoiled
            if not self._reusable:
                await self.aclose()
            return
        pending = b""
        while True:
            chunks = answer.body
            if chunks:
                answer.body = []
                for chunk in chunks:
                    outcome.nbytes += len(chunk)
                    pending += chunk
                if b"\n\n" in pending:
                    *frames, pending = pending.split(b"\n\n")
                    for frame in frames:
                        if b"data:" not in frame:
                            continue  # a comment (keep-alive) or an empty frame
                        match = _TYPE.search(frame)
                        kind = match.group(1).decode() if match else None
                        outcome.see_event(kind, _frame_data(frame) if kind in _PARSED else None)
                        if abandon_after is not None and outcome.events >= abandon_after:
                            outcome.abandoned = True
                            outcome.ended = trio.current_time()
                            await self.aclose()
                            return
            if answer.done:
                outcome.ended = trio.current_time()
                if outcome.terminal is None and outcome.error is None:
                    outcome.error = "incomplete"
                self._reusable = answer.keep_alive and not parser.spoiled
                if not self._reusable:
                    await self.aclose()
                return
            if not await self._read(stream, parser):
                outcome.ended = trio.current_time()
                if not answer.framed():
                    # the body's end is the connection's (a server that neither gives a
                    # length nor chunks); whether it was whole, the events say
                    if outcome.terminal is None and outcome.error is None:
                        outcome.error = "incomplete"
                else:
                    outcome.error = outcome.error or "connection_lost"
                await self.aclose()
                return

    async def _front_turn(
        self,
        outcome: TurnOutcome,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        reader: FrameReader,
    ) -> None:
        """``_sse_turn`` for a translated front: the frames (split across reads or several
        in one, ``\r\n`` line ends accepted) go to ``reader``, which says when the turn is
        over (its terminal frame) and what failed."""
        stream = await self._connection()
        out = self._request_bytes(path, body, headers)
        parser = ResponseParser()
        outcome.started = trio.current_time()
        await stream.send_all(out)
        while (answer := parser.final()) is None:
            if not await self._read(stream, parser):
                raise trio.BrokenResourceError("closed before the status line")
        outcome.status = answer.status
        if answer.status != 200:
            while not answer.done and await self._read(stream, parser):
                pass
            outcome.ended = trio.current_time()
            outcome.error = envelope_code(answer.status, b"".join(answer.body))
            outcome.overload = answer.status == 429 and any(
                k == b"x-trioproxy-overload" for k, _ in answer.headers
            )
            self._reusable = answer.done and answer.keep_alive and not parser.spoiled
            if not self._reusable:
                await self.aclose()
            return
        pending = b""
        while True:
            chunks = answer.body
            if chunks:
                answer.body = []
                for chunk in chunks:
                    outcome.nbytes += len(chunk)
                    pending += chunk
                if b"\r" in pending:
                    # a CR at the end may be the first half of a CRLF: keep it for later
                    head, cr = (pending[:-1], b"\r") if pending.endswith(b"\r") else (pending, b"")
                    pending = head.replace(b"\r\n", b"\n") + cr
                if b"\n\n" in pending:
                    *frames, pending = pending.split(b"\n\n")
                    for frame in frames:
                        if frame.strip():
                            reader.see_frame(outcome, frame)
            if answer.done:
                outcome.ended = trio.current_time()
                if outcome.terminal is None and outcome.error is None:
                    outcome.error = "incomplete"
                self._reusable = answer.keep_alive and not parser.spoiled
                if not self._reusable:
                    await self.aclose()
                return
            if not await self._read(stream, parser):
                outcome.ended = trio.current_time()
                if not answer.framed():
                    if outcome.terminal is None and outcome.error is None:
                        outcome.error = "incomplete"
                else:
                    outcome.error = outcome.error or "connection_lost"
                await self.aclose()
                return


def _frame_data(frame: bytes) -> bytes:
    lines = [line[5:].lstrip() for line in frame.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)


def rejected_code(exc: UpstreamRejected) -> tuple[str, bool]:
    """(error code, overload?) of a refused WebSocket upgrade."""
    overload = exc.status == 429 and any(k == "x-trioproxy-overload" for k, _ in exc.headers)
    return envelope_code(exc.status, exc.body), overload


async def ws_turn(
    ws: UpstreamWebSocket,
    body: dict[str, Any],
    *,
    abandon_after: int | None = None,
    limit: float = 60.0,
) -> TurnOutcome:
    """Send one ``response.create`` on an open socket and read to the terminal event.

    A turn that ends with the socket closed sets ``error`` (``ws_closed_<code>``); the caller
    then leaves its ``async with`` block, which closes the socket."""
    outcome = TurnOutcome(started=trio.current_time(), status=101)
    try:
        with trio.move_on_after(limit):
            await _ws_turn(ws, body, outcome, abandon_after)
    except UpstreamClosed as exc:
        outcome.error = f"ws_closed_{exc.code}"
    outcome.ended = trio.current_time()
    if outcome.error is None and not outcome.abandoned and outcome.terminal is None:
        outcome.error = "timeout"
    return outcome


async def _ws_turn(
    ws: UpstreamWebSocket, body: dict[str, Any], outcome: TurnOutcome, abandon_after: int | None
) -> None:
    await ws.send_text(json.dumps({"type": "response.create", **body}))
    while True:
        message = await ws.receive()
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        outcome.nbytes += len(text)
        match = _TYPE_TEXT.search(text)
        kind = match.group(1) if match else None
        outcome.see_event(kind, text)
        if outcome.terminal is not None:
            break
        if abandon_after is not None and outcome.events >= abandon_after:
            outcome.abandoned = True
            break


__all__ = [
    "CONTENT_DELTAS",
    "FrameReader",
    "HttpClient",
    "TurnOutcome",
    "UpstreamConnectError",
    "UpstreamRejected",
    "envelope_code",
    "rejected_code",
    "ws_turn",
]
