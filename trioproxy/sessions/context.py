"""What every request handler shares: settings, store, pool, tokens, upstream client, log."""

from __future__ import annotations

import collections
import functools
import hashlib
import ipaddress
from collections.abc import Callable

import attrs
import structlog
import trio

from trioproxy.accounts.pool import Pool
from trioproxy.accounts.refresh import TokenManager
from trioproxy.admission import LANE_NAMES, AccountCaps, Admission
from trioproxy.config import Settings
from trioproxy.logs import get_logger
from trioproxy.protocol.chain import ChainBudget
from trioproxy.protocol.errors import ProxyError
from trioproxy.reqlog import RequestLog
from trioproxy.store import Store
from trioproxy.upstream.http import UpstreamHTTP

log = get_logger("trioproxy.proxy")

KEY_CACHE_SECONDS = 30.0
UNCAPPED = 1_000_000  # an account cap of 0 in the settings: in effect none


def build_admission(settings: Settings) -> Admission:
    """The admission lanes (request lanes, work limits, per-account caps) from the settings."""
    lanes = {
        name: (getattr(settings, f"lane_{name}_limit"), getattr(settings, f"lane_{name}_wait"))
        for name in LANE_NAMES
    }
    work = {
        "refresh": settings.work_refresh_limit,
        "connect": settings.work_connect_limit,
        "create": settings.work_create_limit,
    }
    lanes["bridge"] = (max(1, settings.bridge_max_sessions), 5.0)
    return Admission(
        lanes=lanes,
        account_caps=AccountCaps(
            streams=settings.account_max_streams or UNCAPPED,
            creates=settings.account_max_creates or UNCAPPED,
            wait=settings.account_cap_wait,
            fail_fast=settings.account_cap_wait <= 0,
        ),
        work=work,
        retry_after=settings.overload_retry_after,
    )


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


@attrs.define(eq=False)
class ProxyContext:
    settings: Settings
    store: Store
    pool: Pool
    tokens: TokenManager
    upstream_http: UpstreamHTTP  # Responses turns go out through its post_stream
    reqlog: RequestLog
    admission: Admission
    nursery: trio.Nursery | None = None  # the app nursery, for store writes off the hot path
    chain_budget: ChainBudget = attrs.field(init=False)  # every session's re-anchoring memory
    draining: bool = False
    drain_started: trio.Event = attrs.field(factory=trio.Event)
    active_keys: int = 0
    counters: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _key_cache: dict[str, tuple[str, float]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.chain_budget = ChainBudget(self.settings.reanchor_total_max_bytes)

    @property
    def upstream(self) -> str:
        return self.settings.upstream_base_url.rstrip("/")

    def ws_upstream_url(self) -> str:
        base = self.upstream
        if base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        return f"{base}/codex/responses"

    async def authorize(
        self, headers: list[tuple[str, str]], client_host: str | None, forwarded: bool = False
    ) -> str | None:
        """The API key id that authorized the request (``"loopback"`` without keys: a
        loopback client that did not come through a reverse proxy).

        Raises ProxyError(401) otherwise."""
        if self.active_keys == 0:
            if is_loopback(client_host) and not forwarded:
                return "loopback"
            raise ProxyError.of(
                401,
                "This trioproxy has no API key yet and only serves loopback clients. Create one with `trioproxy keys create NAME`.",
                "api_key_required",
            )
        presented = None
        for key, value in headers:
            if key == "authorization" and value[:7].lower() == "bearer ":
                presented = value[7:].strip()
        if not presented:
            raise ProxyError.of(
                401,
                "Missing API key: send Authorization: Bearer <trioproxy key>.",
                "missing_api_key",
            )
        digest = hashlib.sha256(presented.encode()).hexdigest()
        now = trio.current_time()
        cached = self._key_cache.get(digest)
        if cached and cached[1] > now:
            return cached[0]
        record = await self.store.run(self.store.verify_api_key, presented)
        if record is None:
            raise ProxyError.of(401, "Invalid or revoked API key.", "invalid_api_key")
        if len(self._key_cache) > 10000:
            self._key_cache.clear()
        self._key_cache[digest] = (record.key_id, now + KEY_CACHE_SECONDS)
        return str(record.key_id)

    def start_draining(self) -> None:
        """Readiness goes false; new requests are refused; sessions close after their turn."""
        self.draining = True
        self.drain_started.set()

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ProxyError.of(
                503,
                "trioproxy is shutting down; retry (another replica will answer).",
                "draining",
                headers=[("retry-after", "1"), ("connection", "close")],
            )

    def store_later(self, job: Callable[[], object]) -> None:
        """Run a store write in the app nursery (the request does not wait for it)."""
        if self.nursery is not None:
            self.nursery.start_soon(self._store_job, job)

    async def _store_job(self, job: Callable[[], object]) -> None:
        # started from a request's task: it logs as the proxy's, not as that request's
        structlog.contextvars.clear_contextvars()
        try:
            await self.store.run(job)
        except Exception:
            log.exception("background store write failed")

    def forget_keys(self) -> None:
        self._key_cache.clear()
