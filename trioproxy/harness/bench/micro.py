"""Micro-benchmarks behind the hot path's design choices (docs/performance.md, section 3):
h11 against what trioproxy uses instead, for the message heads and bodies of one turn.

``python -m trioproxy.harness.bench.micro`` prints microseconds per operation (the best of
five rounds, so that other work on the machine weighs as little as possible). The headers are
shaped like a Codex turn's: about 25 on the request, about 30 (rate limits, identifiers) on
the answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import h11
import httptools

from trioproxy.protocol import http1 as wire

REQUEST_HEADERS = [
    (b"host", b"chatgpt.com"),
    (b"content-type", b"application/json"),
    (b"accept", b"text/event-stream"),
    (b"content-length", b"2600"),
    *((f"x-codex-header-{i}".encode(), b"value-" * 5) for i in range(21)),
]
RESPONSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    *((f"x-codex-primary-{i}".encode(), b"12.5") for i in range(28)),
]
RESPONSE_HEAD = wire.response_head(
    200, b"OK", [*RESPONSE_HEADERS, (b"transfer-encoding", b"chunked")]
)
REQUEST = wire.request_head(b"POST", b"/backend-api/codex/responses", REQUEST_HEADERS)
REQUEST += b"x" * 2600
CHUNK = wire.chunk(b"event: response.output_text.delta\ndata: " + b"x" * 80 + b"\n\n")


def best_us(operation: Callable[[], object], count: int = 5000, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            operation()
        best = min(best, (time.perf_counter() - start) / count)
    return round(best * 1e6, 2)


def _h11_server() -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event()
    conn.next_event()
    return conn


def _h11_client_after_head() -> h11.Connection:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(RESPONSE_HEAD)
    conn.next_event()
    return conn


class _Sink:
    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_body(self, body: bytes) -> None:
        pass


def main() -> None:
    def h11_response_head() -> object:
        return _h11_server().send(h11.Response(status_code=200, headers=RESPONSE_HEADERS))

    def own_response_head() -> object:
        return wire.response_head(200, b"OK", RESPONSE_HEADERS)

    def h11_request_head() -> object:
        return h11.Connection(h11.CLIENT).send(
            h11.Request(
                method=b"POST", target=b"/backend-api/codex/responses", headers=REQUEST_HEADERS
            )
        )

    def own_request_head() -> object:
        return wire.request_head(b"POST", b"/backend-api/codex/responses", REQUEST_HEADERS)

    def h11_parse_request() -> object:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(REQUEST)
        return conn.next_event(), conn.next_event(), conn.next_event()

    def httptools_parse_request() -> object:
        parser = httptools.HttpRequestParser(_Sink())
        parser.feed_data(REQUEST)
        return parser

    def h11_parse_response_head() -> object:
        return _h11_client_after_head()

    def httptools_parse_response_head() -> object:
        parser = httptools.HttpResponseParser(_Sink())
        parser.feed_data(RESPONSE_HEAD)
        return parser

    h11_client = _h11_client_after_head()

    def h11_chunk() -> object:
        h11_client.receive_data(CHUNK)
        return h11_client.next_event(), h11_client.next_event()

    parser = httptools.HttpResponseParser(_Sink())
    parser.feed_data(RESPONSE_HEAD)

    def httptools_chunk() -> object:
        parser.feed_data(CHUNK)
        return parser

    rows = [
        ("write a response head (30 headers)", h11_response_head, own_response_head),
        ("write a request head (25 headers)", h11_request_head, own_request_head),
        ("parse a request (25 headers, 2.6 KB body)", h11_parse_request, httptools_parse_request),
        (
            "parse a response head (30 headers)",
            h11_parse_response_head,
            httptools_parse_response_head,
        ),
        ("parse one relayed chunk", h11_chunk, httptools_chunk),
    ]
    print(f"{'operation':44s} {'h11 us':>8s} {'trioproxy us':>13s}")
    for name, theirs, ours in rows:
        print(f"{name:44s} {best_us(theirs):8.2f} {best_us(ours):13.2f}")


if __name__ == "__main__":
    main()
