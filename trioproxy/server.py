"""The proxy process: the app nursery and the HTTP server: the project's own
(``web/serving.py``, the default) or hypercorn's trio worker (``serving_hypercorn.py``, with
TLS and HTTP/2), as ``settings.server`` says. Both serve the same ASGI app, start and drain
the same way, and run in the app nursery.

The app nursery owns, for the life of the server: the HTTP server, the request-log writer,
the quota services (usage poller, model registry, alert watcher and sender, quota saver),
the login registry (logins started through ``POST /api/logins``, each a task of its
nursery with a deadline of its own), and the store watcher (accounts imported or removed by the CLI while the server runs, API
keys created or revoked). Leaving it (shutdown, a fatal error) stops all of them; the
request-log writer drains what is queued before it returns.

Guards of the server (``web/``; hypercorn's are in ``serving_hypercorn.py``):
* ``TCP_USER_TIMEOUT`` on the listening sockets, under either server (accepted sockets inherit
  it): a client that stops reading but keeps its socket open is cut off by the kernel after
  ``stalled_client_timeout``, and the write that waits for it fails.
* An exception escaping one connection is logged and closes that connection only; a
  connection its client closed is released at once (``web/serving.py``).
* Limits that fit Codex traffic: request bodies and WebSocket messages up to
  ``max_body_bytes``, request heads up to 1 MiB, no response timeout on streams.
"""

from __future__ import annotations

import ipaddress
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig

from trioproxy.accounts.importing import Imported, import_auth_jsons
from trioproxy.accounts.logins import LoginRegistry
from trioproxy.accounts.pool import Pool
from trioproxy.accounts.refresh import TokenManager
from trioproxy.accounts.services import MODELS_DOCUMENT, QuotaServices
from trioproxy.accounts.store_watch import watch_store
from trioproxy.app.routes import create_app, server_error
from trioproxy.config import ConfigError, Settings
from trioproxy.keys.prices import PriceTable
from trioproxy.keys.ring import KeyRing
from trioproxy.logs import get_logger
from trioproxy.reqlog import RequestLog
from trioproxy.serving_hypercorn import hypercorn_config, serve_hypercorn
from trioproxy.sessions.bridge import BridgeRegistry
from trioproxy.sessions.context import ProxyContext, build_admission, is_loopback
from trioproxy.sessions.durable import DurableChains
from trioproxy.store import Store
from trioproxy.upstream.http import UpstreamHTTP, make_upstream_http
from trioproxy.web.asgi import ASGIApp
from trioproxy.web.budget import default_limit
from trioproxy.web.serving import Server, open_listeners, serve_asgi
from trioproxy.web.state import ServerConfig

log = get_logger("trioproxy.server")
STORE_POLL_SECONDS = 2.0
LISTEN_BACKLOG = 4096


def _is_loopback_bind(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_config(settings: Settings) -> ServerConfig:
    return ServerConfig(
        head_timeout=settings.head_timeout,
        body_min_rate=settings.body_min_rate,
        body_min_rate_grace=settings.body_min_rate_grace,
        max_header_count=settings.max_header_count,
        max_body_bytes=settings.max_body_bytes,
        max_ws_message_bytes=settings.max_body_bytes,
        request_memory_limit=settings.request_memory_limit or default_limit(),
        overload_retry_after=settings.overload_retry_after,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        graceful_timeout=settings.drain_timeout,
        error_shape=server_error,
    )


def _refuse_open_without_keys(settings: Settings, keys: int) -> None:
    if settings.trusted_proxies and keys == 0:
        # behind a reverse proxy every client arrives from the proxy's address: without keys
        # nothing would tell the operator's own requests from anybody's
        raise ConfigError(
            "refusing to start with trusted_proxies and no API key: every request comes through "
            "the reverse proxy, so loopback trust cannot apply. Create a key with "
            "`trioproxy keys create NAME`."
        )
    if (
        not _is_loopback_bind(settings.host)
        and keys == 0
        and not settings.allow_remote_without_keys
    ):
        raise ConfigError(
            f"refusing to listen on {settings.host} with no API key: anyone could use your accounts. "
            "Create a key with `trioproxy keys create NAME`, or set TRIOPROXY_ALLOW_REMOTE_WITHOUT_KEYS=true."
        )


async def _start_core(
    settings: Settings, store: Store, upstream: UpstreamHTTP, app_nursery: trio.Nursery
) -> tuple[ProxyContext, BridgeRegistry, QuotaServices]:
    """The proxy's long-lived parts, each started in the app nursery: the token manager
    (its refresh flights), the request-log writer, the bridge registry, the store watcher
    and the quota services (usage poller, model registry, alerts, quota saver)."""
    pool = Pool(strategy=settings.routing_strategy)
    pool.sync(await store.run(store.list_accounts))
    admission = build_admission(settings)
    tokens = TokenManager(
        pool,
        store,
        upstream.client,
        settings.auth_base_url,
        admission,
        cooldown=settings.refresh_cooldown,
    )
    await app_nursery.start(tokens.run)
    reqlog = RequestLog(store)
    try:
        prices = PriceTable.with_overrides(settings.prices)
    except ValueError as exc:
        raise ConfigError(f"option prices: {exc}") from None
    shared = store.engine.dialect.name == "postgresql"
    keys = KeyRing(
        store,
        pool.clock,
        prices,
        flush_interval=settings.usage_flush_interval,
        # one SQLite store has one server: its counters keep the name they always had
        replica=settings.resolved_replica_name if shared else "default",
    )
    if shared:  # new budgets start from the stored usage in the lease holder only
        keys.seeds_budgets = lambda: False  # (set below, once the lease exists)
    await keys.load()
    durable = DurableChains.build(settings, store)
    ctx = ProxyContext(
        settings,
        store,
        pool,
        tokens,
        upstream,
        reqlog,
        admission,
        keys,
        nursery=app_nursery,
        durable=durable,
    )
    await app_nursery.start(reqlog.run)
    await app_nursery.start(keys.run)
    if settings.request_log_retention_days > 0:
        app_nursery.start_soon(reqlog.prune, settings.request_log_retention_days * 86400)
    if durable is not None:  # durable chains (PostgreSQL): their writer and pruner
        await app_nursery.start(durable.run)
        app_nursery.start_soon(durable.prune)
    bridges = BridgeRegistry(ctx)
    await app_nursery.start(bridges.run)
    pool.restore_quota(await store.run(store.load_quota))
    services = QuotaServices.build(settings, pool, tokens, upstream.client, store)
    if shared:
        keys.seeds_budgets = lambda: services.lease.held
    await services.start(app_nursery, pool, store)
    watch = partial(
        watch_store,
        pool,
        store,
        poll_interval=STORE_POLL_SECONDS,
        documents={MODELS_DOCUMENT: services.registry.absorb},
    )
    await app_nursery.start(watch)
    return ctx, bridges, services


def login_registry(ctx: ProxyContext) -> LoginRegistry:
    """The registry of logins started through the management API; a finished login is
    stored as ``POST /api/accounts`` stores an import."""

    async def adopt(data: dict[str, object], now: float) -> Imported:
        (imported,) = await import_auth_jsons(ctx.store, ctx.pool, [data], now=now)
        return imported

    settings = ctx.settings
    return LoginRegistry(
        ctx.upstream_http.client,
        settings.auth_base_url,
        adopt,
        callback_port=settings.login_callback_port,
        timeout=settings.login_timeout,
    )


async def _serve_http(
    ctx: ProxyContext,
    app: ASGIApp,
    hypercorn: HypercornConfig | None,
    shutdown: trio.Event,
    app_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``app`` on the listeners until shutdown, served by hypercorn when its configuration
    is given, else by the own server: readiness goes false first, then after
    ``drain_grace`` (requests still served meanwhile) new requests are refused, the
    listeners close and in-flight requests get ``drain_timeout``. The
    server stopping for any reason stops the app."""
    settings = ctx.settings
    listener_closing = trio.Event()

    async def stop_when_asked() -> None:
        await shutdown.wait()
        # readiness goes false first; for ``drain_grace`` everything is served as before,
        # while load balancers notice and send new work elsewhere; then new requests get
        # 503, sessions close after their turn and the listener closes
        ctx.stop_ready()
        log.info("draining", grace=settings.drain_grace, deadline=settings.drain_timeout)
        await trio.sleep(settings.drain_grace)
        ctx.start_draining()
        listener_closing.set()

    app_nursery.start_soon(stop_when_asked)
    try:
        listeners = await open_listeners(
            settings.host,
            settings.port,
            backlog=LISTEN_BACKLOG,
            user_timeout_ms=int(settings.stalled_client_timeout * 1000),
        )
        if hypercorn is not None:
            await serve_hypercorn(
                app,
                hypercorn,
                listeners,
                shutdown_trigger=listener_closing.wait,
                task_status=task_status,
            )
        else:
            server = Server(app, server_config(settings))
            await serve_asgi(
                server, listeners, shutdown_trigger=listener_closing.wait, task_status=task_status
            )
    finally:
        app_nursery.cancel_scope.cancel(reason="server stopped")


def _log_started(settings: Settings, port: int, accounts: int, keys: int) -> None:
    scheme = "https" if settings.certfile else "http"
    log.info(
        "serving",
        url=f"{scheme}://{settings.host}:{port}",
        server=settings.server,
        data_dir=str(settings.data_dir),
        accounts=accounts,
        api_keys=keys,
    )
    if not accounts:
        log.warning(
            "no accounts yet",
            hint="import a Codex auth.json: `trioproxy accounts import ~/.codex/auth.json` (or POST it to /api/accounts)",
        )
    if keys == 0 and is_loopback(settings.host):
        log.info(
            "no API key: serving loopback clients only",
            hint="`trioproxy keys create NAME` to require keys",
        )


async def serve_proxy(
    settings: Settings,
    *,
    shutdown_event: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until ``shutdown_event`` is set (or cancelled); report the bound port."""
    store = Store.open(
        settings.resolved_database_url, data_dir=settings.data_dir, secret_key=settings.secret_key
    )
    try:
        keys = store.active_api_key_count()
        _refuse_open_without_keys(settings, keys)
        hypercorn = hypercorn_config(settings) if settings.server == "hypercorn" else None
        shutdown = shutdown_event if shutdown_event is not None else trio.Event()
        async with make_upstream_http(settings) as upstream, trio.open_nursery() as app_nursery:
            ctx, bridges, services = await _start_core(settings, store, upstream, app_nursery)
            logins = login_registry(ctx)
            await app_nursery.start(logins.run)
            app = create_app(ctx, services, bridges, logins)
            bound: list[tuple[str, int]] = await app_nursery.start(
                _serve_http, ctx, app, hypercorn, shutdown, app_nursery
            )
            _log_started(settings, bound[0][1], len(ctx.pool.accounts), keys)
            task_status.started(bound[0][1])
    finally:
        store.close()
