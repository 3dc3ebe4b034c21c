"""The one shared httpx client for upstream HTTP (responses, models, usage, token refresh).

httpx's defaults do not fit a proxy (design.md, trap 3): a 5 s timeout cuts long reasoning,
and 100 pooled connections silently queue the 101st stream. Limits and timeouts are set
explicitly here; the read timeout is the longest upstream silence tolerated mid-stream.
The transport is :class:`~trioproxy.upstream.transport.LeanTransport` (h11 with an O(1)
idle pool) rather than httpcore's, whose pool bookkeeping grows with the pool (see there).
"""

from __future__ import annotations

import httpx

from trioproxy.config import Settings
from trioproxy.upstream.transport import LeanTransport


def make_upstream_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_read_timeout,
        write=60.0,
        pool=settings.upstream_connect_timeout,
    )
    # the connection limits live in the transport (httpx ignores `limits` with a transport)
    transport = LeanTransport(
        max_connections=settings.upstream_max_connections,
        max_idle_per_origin=min(200, settings.upstream_max_connections),
        keepalive_expiry=60.0,
    )
    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        transport=transport,
    )
