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


# -- response bodies ------------------------------------------------------------------------------
def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@given(
    st.lists(st.binary(min_size=1, max_size=200), max_size=12),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
    st.booleans(),
    st.booleans(),
)
def test_chunked_bodies_decode_like_h11_wherever_the_bytes_are_cut(
    pieces: list[bytes], cuts: list[int], extensions: bool, trailers: bool
) -> None:
    encoded = b"".join(
        b"%x%s\r\n%s\r\n" % (len(p), b";name=value" if extensions else b"", p) for p in pieces
    )
    encoded += b"0\r\n" + (b"x-trailer: 1\r\n" if trailers else b"") + b"\r\n"
    decoder = wire.BodyDecoder("chunked")
    out = b"".join(decoder.feed(part) for part in _splits(encoded, cuts))
    assert decoder.done and decoder.leftover == b""
    # the same bytes through h11
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + encoded)
    assert isinstance(client.next_event(), h11.Response)
    expected = b""
    while isinstance(event := client.next_event(), h11.Data):
        expected += event.data
    assert out == expected == b"".join(pieces)


@given(st.binary(max_size=500), st.lists(st.integers(min_value=0, max_value=600), max_size=6))
def test_length_bodies_stop_at_their_length(body: bytes, cuts: list[int]) -> None:
    decoder = wire.BodyDecoder("length", len(body))
    out = b"".join(decoder.feed(part) for part in _splits(body + b"EXTRA", cuts))
    assert out == body and decoder.done and decoder.leftover == b"EXTRA"


@pytest.mark.parametrize(
    "broken",
    [
        b"zz\r\nabc\r\n",  # not hex
        b"0x3\r\nabc\r\n",  # a prefix int() would take
        b"1_0\r\n",  # an underscore int() would take
        b"3\r\nabcXY",  # no CRLF after the data
        b"-3\r\nabc\r\n",
        b"1" * 5000,  # a size line that never ends
    ],
)
def test_broken_chunked_bodies_are_refused(broken: bytes) -> None:
    decoder = wire.BodyDecoder("chunked")
    with pytest.raises(wire.BodyError):
        decoder.feed(broken)


def test_a_body_cut_short_is_an_error_unless_the_close_delimits_it() -> None:
    for mode, length in (("chunked", 0), ("length", 10)):
        decoder = wire.BodyDecoder(mode, length)
        decoder.feed(b"5\r\nab" if mode == "chunked" else b"abc")
        with pytest.raises(wire.BodyError):
            decoder.feed_eof()
    until_close = wire.BodyDecoder("close")
    assert until_close.feed(b"anything") == b"anything"
    until_close.feed_eof()
    assert until_close.done


def test_body_framing_follows_the_head() -> None:
    assert wire.body_framing(200, b"GET", [(b"content-length", b"12")]) == ("length", 12)
    assert wire.body_framing(200, b"POST", [(b"transfer-encoding", b"chunked")]) == ("chunked", 0)
    assert wire.body_framing(200, b"GET", []) == ("close", 0)
    assert wire.body_framing(204, b"GET", []) == ("length", 0)
    assert wire.body_framing(200, b"HEAD", [(b"content-length", b"12")]) == ("length", 0)
    with pytest.raises(wire.BodyError):
        wire.body_framing(200, b"GET", [(b"transfer-encoding", b"gzip, chunked")])
