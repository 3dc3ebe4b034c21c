"""HTTP/1.1 message heads as bytes: the request the proxy sends upstream, the responses
its server sends, and the server's own error envelopes.

Why not h11's writer: h11 checks every header against a regular expression each time it
builds an event, and a response of unknown length three times over (the event, then two
rewrites to set its framing headers). A Codex answer carries about thirty rate-limit and
identification headers, and writing such a head is on every turn's path; here it costs a
fraction of h11's (docs/performance.md). Parsing is httptools' (llhttp), on both sides.

What is checked, and why that is enough: a header name must be a token (RFC 9110 5.1; names
seen once are remembered), a value must hold no control character but HTAB (so no CR, LF or
NUL: nothing can end a line or the head early). Values are not otherwise parsed; the headers
written here are either the proxy's own or ones llhttp already validated when it parsed them.
"""

from __future__ import annotations

import functools
import http
import re
from collections.abc import Iterable
from email.utils import formatdate

from trioproxy.protocol.errors import ProxyError, json_bytes


@functools.lru_cache(maxsize=128)
def reason(status: int) -> bytes:
    """The reason phrase of a status code (empty for an unknown one)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def error_body(status: int, message: str, code: str, type_: str | None = None) -> bytes:
    """The JSON error envelope of an answer the server gives on its own (a request it cannot
    parse, an app that failed): the same shape as every error that leaves trioproxy."""
    return json_bytes(ProxyError.of(status, message, code, type_=type_).body)


_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_known_names: set[bytes] = set()
_MAX_KNOWN = 4096

Headers = Iterable[tuple[bytes, bytes]]


def _check_name(name: bytes) -> None:
    if name not in _known_names:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"illegal header name {name!r}")
        if len(_known_names) >= _MAX_KNOWN:
            _known_names.clear()
        _known_names.add(name)


def _header_lines(headers: Headers) -> bytes:
    """The header lines; ``ValueError`` for a header that could break the message. The values
    are checked in one search over all of them (joined by a tab, which a value may hold): a
    response head on the relay's path has about thirty."""
    pairs = headers if isinstance(headers, list) else list(headers)
    for name, _ in pairs:
        _check_name(name)
    if _BAD_VALUE.search(b"\t".join([value for _, value in pairs])):
        bad = next(name for name, value in pairs if _BAD_VALUE.search(value))
        raise ValueError(f"illegal character in the value of header {bad!r}")
    return b"".join([b"%s: %s\r\n" % pair for pair in pairs])


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """``HTTP/1.1 <status> <reason>`` and the header lines, through the blank line."""
    if not 100 <= status <= 999:
        raise ValueError(f"illegal status code {status}")
    if _BAD_VALUE.search(reason):
        raise ValueError("illegal character in the reason phrase")
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, _header_lines(headers))


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """``<method> <target> HTTP/1.1`` and the header lines, through the blank line."""
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"illegal method {method!r}")
    if not target or _BAD_TARGET.search(target):
        raise ValueError(f"illegal request target {target!r}")
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, _header_lines(headers))


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (``data`` not empty: an empty chunk ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def has_token(value: bytes, token: bytes) -> bool:
    """Whether a comma-separated header value (``Connection``) lists ``token``."""
    return any(part.strip().lower() == token for part in value.split(b","))


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode("ascii")


def http_date(now: float) -> bytes:
    """The ``Date`` header value (RFC 9110 6.6.1, IMF-fixdate) for the Unix time ``now``;
    made once per second, as every response of that second carries the same one."""
    return _http_date(int(now))


def absolute_authority(target: bytes) -> bytes | None:
    """The authority (``host[:port]``, without userinfo) of an absolute-form request
    target (``http://host/path``, RFC 9112 3.2.2); ``None`` for any other form, ``b""`` for
    an absolute form without one."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or not scheme or scheme.startswith(b"/"):
        return None
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    return rest[:end].rpartition(b"@")[2]
