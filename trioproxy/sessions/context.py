"""What every request handler shares: settings, store, pool, tokens, upstream client, log."""

from __future__ import annotations

import collections
import functools
import ipaddress
from collections.abc import Callable

import attrs
import structlog
import trio

from trioproxy.accounts.pool import Pool
from trioproxy.accounts.refresh import TokenManager
from trioproxy.admission import LANE_NAMES, AccountCaps, Admission
from trioproxy.config import Settings
from trioproxy.keys.ring import LOOPBACK_CLIENT, Client, KeyRing
from trioproxy.logs import get_logger
from trioproxy.protocol.chain import ChainBudget
from trioproxy.protocol.errors import ProxyError
from trioproxy.protocol.requests import Aliases, parse_aliases
from trioproxy.reqlog import RequestLog, RequestRecord
from trioproxy.sessions.durable import DurableChains
from trioproxy.store import Store
from trioproxy.upstream.http import UpstreamHTTP

log = get_logger("trioproxy.proxy")

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
    keys: KeyRing
    nursery: trio.Nursery | None = None  # the app nursery, for store writes off the hot path
    durable: DurableChains | None = None  # the chains kept in the database (PostgreSQL)
    chain_budget: ChainBudget = attrs.field(init=False)  # every session's re-anchoring memory
    aliases: Aliases = attrs.field(init=False)  # the operator's model names (``model_aliases``)
    #: readiness (``/health/ready``): false from the moment a drain is asked for
    ready: bool = True
    draining: bool = False
    drain_started: trio.Event = attrs.field(factory=trio.Event)
    counters: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def __attrs_post_init__(self) -> None:
        self.chain_budget = ChainBudget(self.settings.reanchor_total_max_bytes)
        self.aliases = parse_aliases(self.settings.model_aliases)

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

    def authorize(
        self, headers: list[tuple[str, str]], client_host: str | None, forwarded: bool = False
    ) -> Client:
        """Who the request is (``KeyRing.authenticate``); ``loopback`` without keys: a
        loopback client that did not come through a reverse proxy.

        Raises ProxyError(401/403) otherwise."""
        if self.keys.active == 0:
            if is_loopback(client_host) and not forwarded:
                return LOOPBACK_CLIENT
            raise ProxyError.of(
                401,
                "This trioproxy has no API key yet and only serves loopback clients. Create one with `trioproxy keys create NAME`.",
                "api_key_required",
            )
        presented = None
        for key, value in headers:
            if key == "authorization" and value[:7].lower() == "bearer ":
                presented = value[7:].strip()
            elif key == "x-api-key" and presented is None:
                presented = value.strip()
        if not presented:
            raise ProxyError.of(
                401,
                "Missing API key: send Authorization: Bearer <trioproxy key>.",
                "missing_api_key",
            )
        return self.keys.authenticate(presented)

    def finish(self, record: RequestRecord) -> None:
        """A request (or WebSocket turn) ended: charge its usage to its key and account,
        and log it. Synchronous: safe in a ``finally`` that is already cancelled."""
        self.keys.charge(record)
        self.reqlog.emit(record)

    def stop_ready(self) -> None:
        """Readiness goes false (load balancers stop sending new work); everything else goes
        on as before until :meth:`start_draining`."""
        self.ready = False

    def start_draining(self) -> None:
        """Readiness goes false; new requests are refused; sessions close after their turn."""
        self.ready = False
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
