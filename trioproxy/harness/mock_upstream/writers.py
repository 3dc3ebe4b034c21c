"""How the mock writes its answers: ``reply`` for a whole JSON answer, and the writing side of
one turn, its events encoded for the wire and written as the turn's ``Segmenter`` decides (one
write per event, the whole turn in one write, or events cut into pieces; see
``segmentation.py``).

Both turn writers offer ``send(event)``, ``drop(code)`` (write what is held, then cut the
connection) and ``finish()`` (write what is held; for HTTP, end the chunked body).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs
import h11

from trioproxy.harness.mock_upstream.recorder import Recorder, RequestRecord
from trioproxy.harness.mock_upstream.segmentation import Segmenter
from trioproxy.harness.mock_upstream.transport import Exchange, Headers, WebSocket, WebSocketClosed

_DUMP = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
JSON = [("content-type", "application/json")]


def dumps(obj: Any) -> str:
    """Compact JSON, as the backend writes it."""
    return _DUMP(obj)


async def reply(
    exchange: Exchange,
    record: RequestRecord,
    status: int,
    body: Any,
    headers: dict[str, str] | Iterable[tuple[str, str]] = (),
) -> None:
    """A whole JSON answer (recorded with its status, and its error code if it is one)."""
    record.status = status
    if isinstance(body, dict) and "error" in body and isinstance(body["error"], dict):
        record.error_code = body["error"].get("code") or body["error"].get("type")
    extra = list(headers.items()) if isinstance(headers, dict) else list(headers)
    await exchange.respond(status, [*JSON, *extra], dumps(body).encode())


def pretty(obj: Any) -> str:
    """Indented, multi-line JSON (as some upstream error events are written)."""
    return json.dumps(obj, indent=2, ensure_ascii=False)


def sse_event(event: dict[str, Any], *, multiline: bool = False) -> bytes:
    """One SSE event: its ``event:`` line, its ``data:`` JSON (one ``data:`` line per line of
    indented JSON with ``multiline``) and the blank line."""
    if multiline:
        data = "".join(f"data: {line}\n" for line in pretty(event).splitlines())
        return f"event: {event['type']}\n{data}\n".encode()
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


@attrs.define(eq=False)
class HttpAnswer:
    """An SSE answer on an HTTP exchange (chunked body)."""

    exchange: Exchange
    segmenter: Segmenter

    async def start(self, status: int, headers: Headers) -> None:
        head = self.exchange.encode_head(status, headers)
        await self.exchange.write(self.segmenter.head(head))

    async def send(self, event: dict[str, Any], *, multiline: bool = False) -> None:
        sse = sse_event(event, multiline=multiline)
        wire = self.exchange.encode(h11.Data(data=sse))
        await self.exchange.write(self.segmenter.event(wire, sse))

    async def drop(self, code: int) -> None:
        """Write what is held, then drop the connection (``ConnectionGone``)."""
        await self.exchange.write(self.segmenter.flush())
        await self.exchange.abort()

    async def finish(self) -> None:
        wire = self.exchange.encode(h11.EndOfMessage())
        await self.exchange.write(self.segmenter.end(wire))
        self.exchange.finished = True


@attrs.define(eq=False)
class WsAnswer:
    """One turn's events on a WebSocket, each a JSON text message (recorded as sent)."""

    ws: WebSocket
    segmenter: Segmenter
    recorder: Recorder
    record: RequestRecord  # the connection's record, which holds its frames

    async def send(self, event: dict[str, Any], *, multiline: bool = False) -> None:
        text = pretty(event) if multiline else dumps(event)
        self.recorder.frame(self.record, "out", text)
        writes = self.segmenter.message(text)
        if writes:
            await self.ws.write_frames(writes)

    async def drop(self, code: int) -> None:
        """Write what is held, then close the socket with ``code`` (``WebSocketClosed``)."""
        await self.finish()
        await self.ws.close(code, "injected close")
        raise WebSocketClosed(code)

    async def finish(self) -> None:
        writes = self.segmenter.flush_frames()
        if writes:
            await self.ws.write_frames(writes)
