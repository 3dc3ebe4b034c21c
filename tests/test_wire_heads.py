"""protocol/http1.py: the heads trioproxy writes itself parse back, with h11, into exactly the
messages meant; anything that could break a message is refused."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.protocol import http1 as wire

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.text(TOKEN_CHARS, min_size=1, max_size=20).map(str.encode)
# h11 strips a value's surrounding whitespace; inner spaces and tabs and obs-text are kept
values = st.builds(
    lambda inner: inner.strip(b" \t"),
    st.binary(max_size=40).map(
        lambda raw: bytes(b for b in raw if b == 9 or 32 <= b <= 126 or b >= 128)
    ),
)
headers = st.lists(
    st.tuples(names, values).filter(
        lambda h: h[0].lower() not in (b"content-length", b"transfer-encoding", b"connection")
    ),
    max_size=30,
)


@given(headers, st.sampled_from([200, 201, 404, 429, 500, 502]))
def test_a_response_head_parses_back_into_the_same_response(
    extra: list[tuple[bytes, bytes]], status: int
) -> None:
    fields = [*extra, (b"content-length", b"0")]
    data = wire.response_head(status, b"Whatever", fields)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    event = client.next_event()
    assert isinstance(event, h11.Response)
    assert event.status_code == status and event.reason == b"Whatever"
    assert list(event.headers) == [(n.lower(), v) for n, v in fields]
    assert isinstance(client.next_event(), h11.EndOfMessage)


@given(headers, st.binary(max_size=200))
def test_a_request_head_parses_back_into_the_same_request(
    extra: list[tuple[bytes, bytes]], body: bytes
) -> None:
    fields = [(b"host", b"upstream:443"), *extra, (b"content-length", str(len(body)).encode())]
    data = wire.request_head(b"POST", b"/backend-api/codex/responses?x=1", fields) + body
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    assert event.method == b"POST" and event.target == b"/backend-api/codex/responses?x=1"
    assert list(event.headers) == [(n.lower(), v) for n, v in fields]
    received = b""
    while isinstance(event := server.next_event(), h11.Data):
        received += event.data
    assert isinstance(event, h11.EndOfMessage) and received == body


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20))
def test_chunks_parse_back_into_the_same_body(pieces: list[bytes]) -> None:
    head = wire.response_head(200, b"OK", [(b"transfer-encoding", b"chunked")])
    data = head + b"".join(wire.chunk(p) for p in pieces) + wire.LAST_CHUNK
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    assert isinstance(client.next_event(), h11.Response)
    received = b""
    while isinstance(event := client.next_event(), h11.Data):
        received += event.data
    assert isinstance(event, h11.EndOfMessage) and received == b"".join(pieces)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-evil", b"a\r\nx-injected: 1"),
        (b"x-evil", b"a\nb"),
        (b"x-evil", b"a\x00b"),
        (b"x-evil", b"a\x7fb"),
        (b"bad name", b"v"),
        (b"bad:name", b"v"),
        (b"", b"v"),
        (b"x-\xc3\xa9", b"v"),
    ],
)
def test_a_header_that_could_break_the_message_is_refused(name: bytes, value: bytes) -> None:
    with pytest.raises(ValueError):
        wire.response_head(200, b"OK", [(name, value)])
    with pytest.raises(ValueError):
        wire.request_head(b"GET", b"/", [(name, value)])


def test_a_bad_request_line_is_refused() -> None:
    for method, target in ((b"GE T", b"/"), (b"GET", b"/a b"), (b"GET", b""), (b"GET", b"/\r\n")):
        with pytest.raises(ValueError):
            wire.request_head(method, target, [])
    with pytest.raises(ValueError):
        wire.response_head(200, b"OK\r\nx: y", [])
    with pytest.raises(ValueError):
        wire.response_head(42, b"OK", [])


def test_has_token_reads_comma_lists() -> None:
    assert wire.has_token(b"keep-alive, Close", b"close")
    assert not wire.has_token(b"closed", b"close")
