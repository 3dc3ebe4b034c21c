"""The one shared httpx client for upstream HTTP (responses, models, usage, token refresh).

httpx's defaults do not fit a proxy (design.md, trap 3): a 5 s timeout cuts long reasoning,
and 100 pooled connections silently queue the 101st stream. Limits and timeouts are set
explicitly here; the read timeout is the longest upstream silence tolerated mid-stream.
"""

from __future__ import annotations

import httpx

from trioproxy.config import Settings


def make_upstream_client(settings: Settings) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=settings.upstream_max_connections,
        max_keepalive_connections=min(200, settings.upstream_max_connections),
        keepalive_expiry=60.0,
    )
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_read_timeout,
        write=60.0,
        pool=settings.upstream_connect_timeout,
    )
    return httpx.AsyncClient(
        limits=limits, timeout=timeout, follow_redirects=False, trust_env=False
    )
