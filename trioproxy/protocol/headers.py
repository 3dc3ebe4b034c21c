"""Header hygiene for requests the proxy sends upstream, and for responses it passes back.

Upstream sees only what it should: hop-by-hop and HTTP-framing headers, cookies and the
client's own credentials are dropped (the pool account's ``authorization`` and
``chatgpt-account-id`` replace them). A WebSocket handshake also loses the client's
``accept*``, ``content-*`` and ``sec-websocket-*`` headers, and its ``OpenAI-Beta`` always
carries ``responses_websockets=2026-02-06`` (an HTTP-only ``responses=experimental`` token is
not forwarded there). Other beta tokens pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

WS_BETA = "responses_websockets=2026-02-06"
HTTP_ONLY_BETA = "responses=experimental"

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "trailers",
        "upgrade",
        "host",
        "content-length",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "cookie",
        "authorization",
        "chatgpt-account-id",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "forwarded",
        "x-real-ip",
    }
)
WS_HANDSHAKE_DROP = frozenset({"accept", "accept-encoding", "content-type", "content-encoding"})

# Upstream response headers a Codex client reads and the proxy passes through.
PASSTHROUGH_RESPONSE = frozenset(
    {
        "x-codex-turn-state",
        "openai-model",
        "x-models-etag",
        "x-reasoning-included",
        "x-oai-request-id",
        "etag",
    }
)

Headers = list[tuple[str, str]]


def _drop(name: str) -> bool:
    return name in HOP_BY_HOP or name.startswith("proxy-")


def account_headers(access_token: str, account_id: str) -> Headers:
    return [("authorization", f"Bearer {access_token}"), ("chatgpt-account-id", account_id)]


def _connection_listed(client: Sequence[tuple[str, str]]) -> frozenset[str]:
    """Header names the client's ``Connection`` header marks as hop-by-hop (RFC 9110 7.6.1)."""
    listed: set[str] = set()
    for key, value in client:
        if key.lower() == "connection":
            listed.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(listed)


_HOP_BY_HOP_RAW = frozenset(name.encode() for name in HOP_BY_HOP)
RawHeaders = list[tuple[bytes, bytes]]


def upstream_http_headers(
    client: Sequence[tuple[bytes, bytes]], access_token: str, account_id: str
) -> RawHeaders:
    """Headers for an upstream HTTP request: the client's (raw, as the server parsed them),
    cleaned, plus the account's, asking for an uncompressed answer (the proxy reads the
    events it relays). Bytes on the way through: they were parsed as bytes and go out as
    bytes, and this runs on every turn."""
    listed: set[bytes] = set()
    for key, value in client:
        if key.lower() == b"connection":
            listed.update(t.strip().lower() for t in value.split(b",") if t.strip())
    out: RawHeaders = []
    for key, value in client:
        name = key.lower()
        if (
            name in _HOP_BY_HOP_RAW
            or name.startswith(b"proxy-")
            or name in listed
            or name == b"accept-encoding"
        ):
            continue
        out.append((name, value))
    out.append((b"authorization", b"Bearer " + access_token.encode("latin-1")))
    out.append((b"chatgpt-account-id", account_id.encode("latin-1")))
    out.append((b"accept-encoding", b"identity"))
    return out


def merge_beta(values: Sequence[str], *, websocket: bool) -> str | None:
    """One ``OpenAI-Beta`` value from the client's (comma lists allowed)."""
    tokens: list[str] = []
    for value in values:
        for token in (t.strip() for t in value.split(",")):
            if not token or token in tokens:
                continue
            if websocket and (token == HTTP_ONLY_BETA or token.startswith("responses_websockets=")):
                continue
            tokens.append(token)
    if websocket:
        tokens.insert(0, WS_BETA)
    return ", ".join(tokens) or None


def upstream_ws_headers(
    client: Sequence[tuple[str, str]], access_token: str, account_id: str
) -> Headers:
    """Headers for an upstream WebSocket handshake (the client library adds its own
    ``host``/``upgrade``/``sec-websocket-*``)."""
    listed = _connection_listed(client)
    betas: list[str] = []
    out: Headers = []
    for key, value in client:
        name = key.lower()
        if (
            _drop(name)
            or name in listed
            or name in WS_HANDSHAKE_DROP
            or name.startswith("sec-websocket-")
        ):
            continue
        if name == "openai-beta":
            betas.append(value)
            continue
        out.append((name, value))
    beta = merge_beta(betas, websocket=True)
    if beta:
        out.append(("openai-beta", beta))
    return out + account_headers(access_token, account_id)


_PASSTHROUGH_RAW = frozenset(name.encode() for name in PASSTHROUGH_RESPONSE)


def passthrough_raw_headers(upstream: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream response headers a client reads (rate limits, turn state, model), from
    raw headers whose names are lower case: no decoding on the way."""
    return [
        (name, value)
        for name, value in upstream
        if name in _PASSTHROUGH_RAW
        or name.startswith(b"x-codex-")
        or (name.startswith(b"x-") and b"-primary-" in name)
    ]


def codex_headers(upstream: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The ``x-codex-*`` headers of raw lower-case headers, as text (rate limits, turn
    state): what quota tracking reads."""
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in upstream
        if name.startswith(b"x-codex-")
    }


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


SSE_HEADERS: RawHeaders = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
JSON_HEADERS: RawHeaders = [(b"content-type", b"application/json")]


def response_headers(
    request_id: str | None,
    kind: Literal["json", "sse", "upgrade"] = "json",
    *,
    length: int | None = None,
    upstream: Iterable[tuple[bytes, bytes]] = (),
    extra: Iterable[tuple[str, str]] = (),
    close: bool = False,
) -> RawHeaders:
    """The head of every answer the proxy writes: a JSON body of ``length`` bytes, an SSE
    stream, or a WebSocket handshake's 101; the proxy's ``x-request-id`` (the only one); the
    upstream headers a client reads (``upstream``, raw, filtered here); and ``extra`` ones
    (``Retry-After``, ``x-trioproxy-overload``, ...)."""
    out = list(SSE_HEADERS if kind == "sse" else JSON_HEADERS if kind == "json" else ())
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    if close:
        out.append((b"connection", b"close"))
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]
    if request_id is not None:
        out.append((b"x-request-id", request_id.encode("latin-1")))
    out += passthrough_raw_headers(upstream)
    return out


def upstream_request_id(upstream: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Upstream's id of an answer (``x-request-id``, else ``x-oai-request-id``), for the
    request log."""
    found = None
    for name, value in upstream:
        if name == b"x-request-id":
            return value.decode("latin-1")
        if name == b"x-oai-request-id":
            found = value.decode("latin-1")
    return found


def encode_headers(headers: Iterable[tuple[str, str]]) -> RawHeaders:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
