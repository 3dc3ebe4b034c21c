"""The state a server's connections share: its limits, its request-memory budget and its
drain state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio

from trioproxy.web.asgi import ASGIApp
from trioproxy.web.budget import GIB, ByteBudget

MIB = 1024 * 1024

#: the answer (status, JSON body) to a request target for one of the server's own errors
#: (status, message, code, type), when the application shapes them for that target
ErrorShape = Callable[[bytes, int, str, str, "str | None"], tuple[int, bytes]]


@attrs.frozen
class ServerConfig:
    """Limits of the HTTP server (server.py sets them from the proxy's settings)."""

    keep_alive_timeout: float = 75.0  # idle keep-alive connection between requests
    # a whole request head (a WebSocket handshake too), from its first byte; a new
    # connection's first head from the accept
    head_timeout: float = 10.0
    body_timeout: float = 60.0  # longest silence while a request body is being read
    # slowest body accepted: after body_min_rate_grace seconds a body must have come at this
    # many bytes per second on average (0: no floor)
    body_min_rate: int = 1024
    body_min_rate_grace: float = 10.0
    max_head_bytes: int = MIB  # request line and headers
    max_header_count: int = 100
    max_body_bytes: int = 128 * MIB
    max_ws_message_bytes: int = 16 * MIB
    # what a client may send ahead (pipelined requests, early frames) while it is served:
    # bytes of memory they take (parsed requests counted at what they cost), and requests
    max_pipelined_bytes: int = MIB
    max_pipelined_requests: int = 16
    request_memory_limit: int = GIB  # the server's ByteBudget, unless one is given
    overload_retry_after: int = 2  # Retry-After of a 429 when the budget is spent
    ws_ping_interval: float = 20.0  # ping a WebSocket silent this long (0: never)
    ws_ping_timeout: float = 20.0  # and close it if nothing comes back this long after
    ws_close_timeout: float = 1.0  # wait for the peer's close frame after ours
    graceful_timeout: float = 30.0  # drain: in-flight requests get this long
    lifespan_timeout: float = 30.0
    linger: float = 1.0  # after our FIN, how long a client may take to close its side
    # the application's shape of the server's own answers for a request target (another
    # API's error shape on its routes); None: the proxy's envelope everywhere
    error_shape: ErrorShape | None = None

    @property
    def largest_body(self) -> int:
        """The largest body that can be served: within ``max_body_bytes`` and within the
        request-memory budget (a larger one could never be held)."""
        return min(self.max_body_bytes, self.request_memory_limit)


@attrs.frozen
class ServerStatistics:
    connections_open: int
    connections_total: int
    requests_total: int
    websockets_open: int
    draining: bool


@attrs.define(eq=False)
class ServerState:
    """The state shared by every connection of one ``serve_asgi`` call. ``budget`` holds
    request bodies and WebSocket messages; the app reaches it in every scope (see
    ``web/budget.py``)."""

    app: ASGIApp
    config: ServerConfig
    budget: ByteBudget = attrs.field(
        default=attrs.Factory(
            lambda self: ByteBudget(self.config.request_memory_limit), takes_self=True
        )
    )
    state: dict[str, Any] = attrs.field(factory=dict)  # the lifespan state (ASGI "state")
    draining: bool = False
    idle_waits: set[trio.CancelScope] = attrs.field(factory=set)  # connections between requests
    connections_open: int = 0
    connections_total: int = 0
    requests_total: int = 0
    websockets_open: int = 0

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            connections_open=self.connections_open,
            connections_total=self.connections_total,
            requests_total=self.requests_total,
            websockets_open=self.websockets_open,
            draining=self.draining,
        )

    def start_draining(self) -> None:
        """New requests are no longer read; idle keep-alive connections close now."""
        self.draining = True
        for scope in self.idle_waits:
            scope.cancel(reason="server draining")
