"""Upstream's HTTP/1.1 answers parsed by httptools (llhttp, Node's parser): bytes in,
messages out, no I/O. The upstream transport (``transport.py``) feeds it what it reads from a
connection; the bench's load generator parses its answers with it too.

Why httptools rather than h11 here: h11 must first be told about each request (even one whose
head the proxy wrote itself), and it parses an answer head and each relayed chunk many times
more slowly than llhttp (docs/performance.md, section 3.2, gives the micro-benchmarks).

Resource handling: a parser holds its callbacks' bound methods, and the callbacks reach the
parser only while it is being fed, so the two form no reference cycle and go with their last
reference instead of waiting for the cycle collector, whose full collections stall every
stream of the process.

Error handling: an answer that cannot be parsed is :class:`httpx.RemoteProtocolError`, the
type the transport's callers expect; bytes that are no answer after a whole one leave the
answer standing and mark the parser ``spoiled`` (the connection is not used again).
"""

from __future__ import annotations

import httptools
import httpx

__all__ = ["ResponseMessage", "ResponseParser"]


class ResponseMessage:
    """One response as httptools parses it (its callbacks fill this in)."""

    __slots__ = ("body", "done", "head_done", "headers", "keep_alive", "status")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []  # names in lower case
        self.status = 0
        self.head_done = False
        self.body: list[bytes] = []
        self.done = False
        self.keep_alive = False  # the connection may carry another request after this

    def framed(self) -> bool:
        """The head gives the body's end (a length, or chunks); else the close ends it."""
        return any(name in (b"content-length", b"transfer-encoding") for name, _ in self.headers)


class _Callbacks:
    """httptools callbacks filling in ``messages``. The parser is reachable from here only
    while it is being fed (``parser``), so the parser, which holds these bound methods, and
    this object form no reference cycle: both go with the last reference, not with the
    cycle collector."""

    __slots__ = ("messages", "parser")

    def __init__(self, messages: list[ResponseMessage]) -> None:
        self.messages = messages
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        self.messages.append(ResponseMessage())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        message = self.messages[-1]
        message.status = self.parser.get_status_code()
        message.head_done = True
        # (read again at the message's end; a HEAD answer's body is never parsed)
        message.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body.append(body)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        message = self.messages[-1]
        message.done = True
        message.keep_alive = self.parser.should_keep_alive()  # (only valid in here)


class ResponseParser:
    """One request's answers as httptools parses them: normally one message; more when
    interim 1xx answers come first (or a server sends something after the answer)."""

    __slots__ = ("callbacks", "messages", "parser", "spoiled")

    def __init__(self) -> None:
        self.messages: list[ResponseMessage] = []
        self.callbacks = _Callbacks(self.messages)
        self.parser = httptools.HttpResponseParser(self.callbacks)
        self.spoiled = False  # bytes that are no answer came after a whole one

    def feed(self, data: bytes, request: httpx.Request | None) -> None:
        callbacks = self.callbacks
        callbacks.parser = self.parser
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            final = self.final()
            if final is not None and final.done:
                self.spoiled = True  # the answer stands; the connection is not used again
                return
            raise httpx.RemoteProtocolError(f"upstream answer: {exc}", request=request) from exc
        finally:
            callbacks.parser = None

    def final(self) -> ResponseMessage | None:
        """The answer (the first message with a head that is not an interim 1xx)."""
        for message in self.messages:
            if message.head_done and not 100 <= message.status < 200:
                return message
        return None
