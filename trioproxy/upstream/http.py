"""Upstream HTTP: one shared connection pool, seen two ways.

httpx's defaults do not fit a proxy: a 5 s timeout cuts long reasoning,
and 100 pooled connections silently queue the 101st stream. Limits and timeouts are set
explicitly here; the read timeout is the longest upstream silence tolerated mid-stream.
The transport is :class:`~trioproxy.upstream.transport.LeanTransport` (httptools, with an
O(1) idle pool) rather than httpcore's, whose pool bookkeeping grows with the pool (see there).

:class:`UpstreamHTTP` holds both views of it: ``client``, an ``httpx.AsyncClient`` for the
occasional requests (models, usage polls, token refresh), and ``post_stream`` for Responses
turns, which goes to the transport directly (the hot path; see transport.py for why).
"""

from __future__ import annotations

import attrs
import httpx

from trioproxy.config import Settings
from trioproxy.upstream.transport import LeanTransport, StreamedResponse, Timeouts


@attrs.define(eq=False)
class UpstreamHTTP:
    client: httpx.AsyncClient
    transport: LeanTransport
    timeouts: Timeouts

    async def post_stream(
        self, url: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> StreamedResponse:
        """POST ``body`` and return the response with its body unread (the caller closes
        it). Failures raise the httpx exception types."""
        return await self.transport.stream("POST", url, headers, body, self.timeouts)

    async def aclose(self) -> None:
        await self.client.aclose()  # closes the transport's idle connections too

    async def __aenter__(self) -> UpstreamHTTP:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def make_upstream_http(settings: Settings) -> UpstreamHTTP:
    timeouts: Timeouts = {
        "connect": settings.upstream_connect_timeout,
        "read": settings.upstream_read_timeout,
        "write": 60.0,
        "pool": settings.upstream_connect_timeout,
    }
    # the connection limits live in the transport (httpx ignores `limits` with a transport)
    transport = LeanTransport(
        max_connections=settings.upstream_max_connections,
        max_idle_per_origin=min(200, settings.upstream_max_connections),
        keepalive_expiry=60.0,
    )
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(**timeouts),
        follow_redirects=False,
        trust_env=False,
        transport=transport,
    )
    return UpstreamHTTP(client, transport, timeouts)
