"""The proxy's edge: which requests it takes at all, and who sent them.

An ASGI middleware in front of the whole application (:func:`edge_app`), so every route, HTTP
and WebSocket, under either server, is held to the same rules:

* **Host.** A request must name this proxy: an IP address, a loopback name, the listen
  address, or a name in ``allowed_hosts`` (``*``: any). Any other name is a request for
  another site that resolved to this machine: DNS rebinding, where a web page the operator
  visits points its own name at 127.0.0.1 and, being same-origin with itself, could call the
  proxy. It is answered ``421 host_not_allowed``. (An IP address cannot be rebound: only a
  name can.) ``/health/*`` answers whatever the Host: load balancers and container probes
  address the proxy by IP or by a name of theirs.
* **Origin.** A browser says where the page that sent a request comes from. A request or a
  WebSocket upgrade whose ``Origin`` is neither the proxy's own (the scheme, host and port it
  was addressed by) nor in ``allowed_origins`` is refused with ``403 origin_not_allowed``: no
  web page can use the pool (cross-site request forgery, cross-site WebSocket hijacking).
  Clients that are not browsers (the Codex CLI, the SDKs, curl) send no ``Origin`` and pass.
* **Forwarded.** From a peer in ``trusted_proxies``, the client's address (``Forwarded:
  for=``, else ``X-Forwarded-For``: the rightmost hop that is not itself a trusted proxy) and
  scheme (``proto=``, ``X-Forwarded-Proto``) replace the peer's in the ASGI scope, so loopback
  trust, key audit and the logs see the real client. From any other peer these headers are
  not believed, and a loopback peer that sends them is a reverse proxy on the same host: its
  requests are marked forwarded (``scope["trioproxy.forwarded"]``) and never loopback-trusted.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence

import attrs

from trioproxy.config import Settings, split_list
from trioproxy.protocol.errors import ProxyError, json_bytes
from trioproxy.protocol.headers import response_headers
from trioproxy.web.asgi import ASGIApp, Receive, Scope, Send

FORWARDED = "trioproxy.forwarded"  # scope key: the request came through a reverse proxy
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class EdgePolicy:
    """The edge's rules, from the settings (see the module docstring)."""

    hosts: frozenset[str]  # names allowed in Host (lower case, no port); "*": any
    origins: frozenset[str]  # origins allowed besides the proxy's own; "*": any
    trusted: tuple[Network, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgePolicy:
        hosts = set(LOOPBACK_NAMES) | {h.lower() for h in split_list(settings.allowed_hosts)}
        if settings.host not in ("", "0.0.0.0", "::"):
            hosts.add(settings.host.lower())
        trusted = tuple(
            ipaddress.ip_network(n, strict=False) for n in split_list(settings.trusted_proxies)
        )
        origins = frozenset(o.rstrip("/").lower() for o in split_list(settings.allowed_origins))
        return cls(frozenset(hosts), origins, trusted)

    def host_allowed(self, host: str) -> bool:
        return "*" in self.hosts or host in self.hosts or _is_ip(host)

    def is_trusted(self, address: str | None) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.trusted)


@functools.lru_cache(maxsize=1024)
def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None


def _is_ip(host: str) -> bool:
    return _ip(host) is not None


def split_host(value: str) -> tuple[str, int | None]:
    """``host[:port]`` (``[v6]:port`` too) as a lower-case name and a port."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""
    return name.rstrip("."), int(port) if port.isdigit() else None


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A header's value; several lines of it joined with commas, in order (RFC 9110
    §5.3): a proxy may add its own ``X-Forwarded-For`` line rather than extend the client's."""
    values = [value.decode("latin-1") for key, value in headers if key == name]
    return ", ".join(values) if values else None


def _forwarded_client(
    headers: Sequence[tuple[bytes, bytes]], policy: EdgePolicy
) -> tuple[str | None, str | None]:
    """The original client's address and scheme from a trusted proxy's headers."""
    hops: list[str] = []
    proto = None
    forwarded = header(headers, b"forwarded")
    if forwarded:
        for element in forwarded.split(","):
            for pair in element.split(";"):
                key, _, value = pair.strip().partition("=")
                value = value.strip().strip('"')
                if key.lower() == "for":
                    hops.append(split_host(value)[0] if value.startswith("[") else value)
                elif key.lower() == "proto":
                    proto = value.lower()
    else:
        hops = [h.strip() for h in (header(headers, b"x-forwarded-for") or "").split(",")]
        proto = (header(headers, b"x-forwarded-proto") or "").strip().lower() or None
    for hop in reversed([h for h in hops if h]):
        if not policy.is_trusted(hop):
            return hop, proto
    return None, proto


def check(scope: Scope, policy: EdgePolicy) -> ProxyError | None:
    """Apply the rules to a request's scope (the client and scheme may be rewritten); the
    answer to refuse it with, or None."""
    headers = scope.get("headers", [])
    client = scope.get("client")
    peer = str(client[0]) if client else None
    if policy.trusted and policy.is_trusted(peer):
        original, proto = _forwarded_client(headers, policy)
        if original is not None:
            scope["client"] = (original, 0)
            scope[FORWARDED] = True
        if proto in ("http", "https"):
            secure = proto == "https"
            if scope["type"] == "websocket":
                scope["scheme"] = "wss" if secure else "ws"
            else:
                scope["scheme"] = proto
    elif any(key in FORWARDING_HEADERS for key, _ in headers):
        scope[FORWARDED] = True  # forwarded by a peer nobody vouched for
    if scope.get("path", "").startswith("/health/"):
        return None
    host_header = header(headers, b"host") or ""
    host, port = split_host(host_header)
    if not policy.host_allowed(host):
        return ProxyError.of(
            421,
            f"This proxy does not serve the host {host!r}; set allowed_hosts to serve it.",
            "host_not_allowed",
        )
    origin = header(headers, b"origin")
    if origin is not None and not _origin_allowed(origin, scope, host, port, policy):
        return ProxyError.of(
            403,
            f"Requests from the origin {origin!r} are not allowed; set allowed_origins to allow it.",
            "origin_not_allowed",
        )
    return None


def _origin_allowed(
    origin: str, scope: Scope, host: str, port: int | None, policy: EdgePolicy
) -> bool:
    origin = origin.strip().rstrip("/").lower()
    if "*" in policy.origins or origin in policy.origins:
        return True
    scheme, sep, rest = origin.partition("://")
    if not sep:
        return False  # "null" and other opaque origins
    own = scope.get("scheme", "http")
    own = {"ws": "http", "wss": "https"}.get(own, own)
    origin_host, origin_port = split_host(rest)
    default = DEFAULT_PORTS.get(scheme)
    return (
        scheme == own
        and origin_host == host
        and (origin_port or default) == (port or DEFAULT_PORTS.get(own))
    )


def edge_app(
    app: ASGIApp, policy: EdgePolicy, shape: Callable[[str, ProxyError], ProxyError] | None = None
) -> ASGIApp:
    """``app`` behind the edge's rules; a refusal is answered as ``shape`` has it for the
    request's path (another API's error shape on its routes)."""

    async def edge(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            refused = check(scope, policy)
            if refused is not None:
                if shape is not None:
                    refused = shape(scope.get("path", ""), refused)
                await refuse(scope, receive, send, refused)
                return
        await app(scope, receive, send)

    return edge


async def refuse(scope: Scope, receive: Receive, send: Send, error: ProxyError) -> None:
    """Answer ``error`` before the application sees the request."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
    await answer(scope, send, error, None)


async def answer(scope: Scope, send: Send, error: ProxyError, request_id: str | None) -> None:
    """An error answer of the proxy's own, the body unread (the connection closes after it):
    an HTTP answer, and for a WebSocket upgrade the same answer to the handshake (the ASGI
    denial extension), never an accepted socket."""
    data = json_bytes(error.body)
    head = response_headers(request_id, length=len(data), extra=error.headers, close=True)
    kind = "http"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        kind = "websocket.http"
    await send({"type": f"{kind}.response.start", "status": error.status, "headers": head})
    await send({"type": f"{kind}.response.body", "body": data})


def client_of(scope: Scope) -> tuple[str | None, bool]:
    """The client's address as the edge established it, and whether the request came
    through a reverse proxy."""
    client = scope.get("client")
    return (str(client[0]) if client else None), bool(scope.get(FORWARDED))
