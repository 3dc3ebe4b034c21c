"""The state a server's connections share: its limits and its drain state."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from trioproxy.web.asgi import ASGIApp


@attrs.frozen
class ServerConfig:
    """Limits of the HTTP server (server.py sets them from the proxy's settings)."""

    keep_alive_timeout: float = 75.0  # idle keep-alive connection, or an unfinished head
    body_timeout: float = 60.0  # longest silence while a request body is being read
    max_head_bytes: int = 1024 * 1024  # request line and headers
    max_ws_message_bytes: int = 16 * 1024 * 1024
    # bytes a client may send ahead (pipelined requests, early frames) while it is served
    max_pipelined_bytes: int = 1024 * 1024
    ws_close_timeout: float = 1.0  # wait for the peer's close frame after ours
    graceful_timeout: float = 30.0  # drain: in-flight requests get this long
    lifespan_timeout: float = 30.0
    linger: float = 1.0  # after our FIN, how long a client may take to close its side


@attrs.frozen
class ServerStatistics:
    connections_open: int
    connections_total: int
    requests_total: int
    websockets_open: int
    draining: bool


@attrs.define(eq=False)
class ServerState:
    """The state shared by every connection of one ``serve_asgi`` call."""

    app: ASGIApp
    config: ServerConfig
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
