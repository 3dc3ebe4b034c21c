"""The proxy process: the app nursery and hypercorn's trio worker, with the guards of
design.md section 6.

The app nursery owns, for the life of the server: the HTTP server, the request-log writer,
the quota services (usage poller, model registry, alert watcher and sender, quota saver),
and the store watcher (accounts imported or removed by the CLI while the server runs, API
keys created or revoked). Leaving it (shutdown, a fatal error) stops all of them; the
request-log writer drains what is queued before it returns.

Guards:
* ``TCP_USER_TIMEOUT`` on the listening sockets (accepted sockets inherit it): hypercorn's
  trio worker shields socket writes, so a client that stops reading but keeps its socket
  open would pin its handler and its upstream forever; the kernel now gives up on it after
  ``stalled_client_timeout`` and the write fails.
* Every hypercorn connection handler is guarded: an exception escaping one connection
  (hypercorn issue #225: one malformed WebSocket upgrade) is logged and closes that
  connection instead of the whole process; and a connection whose client closed it is
  released at once, not after the keep-alive timeout (``web/hypercorn_worker.py``, which
  also takes fewer trips through the scheduler on the way to a first byte).
* Limits raised where the defaults cut Codex traffic: WebSocket messages, request bodies,
  no response timeout on streams.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from trioproxy.accounts.pool import Pool
from trioproxy.accounts.refresh import TokenManager
from trioproxy.accounts.services import QuotaServices
from trioproxy.config import ConfigError, Settings
from trioproxy.logs import get_logger
from trioproxy.reqlog import RequestLog
from trioproxy.sessions.bridge import BridgeRegistry
from trioproxy.sessions.context import ProxyContext, build_admission, is_loopback
from trioproxy.store import Store
from trioproxy.upstream.http import make_upstream_client
from trioproxy.web.app import create_app
from trioproxy.web.hypercorn_worker import install as install_worker

log = get_logger("trioproxy.server")
STORE_POLL_SECONDS = 2.0


def _port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


def _is_loopback_bind(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through our structured handler
    config.graceful_timeout = settings.drain_timeout
    config.websocket_max_message_size = settings.max_body_bytes
    config.h11_max_incomplete_size = 1024 * 1024
    config.keep_alive_timeout = 75.0
    config.backlog = 4096
    return config


def listening_sockets(config: HypercornConfig, settings: Settings) -> Sockets:
    sockets = config.create_sockets()
    timeout_ms = int(settings.stalled_client_timeout * 1000)
    for sock in sockets.insecure_sockets:
        if hasattr(socket, "TCP_USER_TIMEOUT") and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
        sock.listen(config.backlog)
    return sockets


async def watch_store(ctx: ProxyContext) -> None:
    """Pick up accounts and keys changed by the CLI (or another replica) while we run."""
    version = await ctx.store.run(ctx.store.accounts_version)
    while True:
        await trio.sleep(STORE_POLL_SECONDS)
        try:
            current = await ctx.store.run(ctx.store.accounts_version)
            if current != version:
                version = current
                ctx.pool.sync(await ctx.store.run(ctx.store.list_accounts))
                log.info("accounts reloaded", accounts=len(ctx.pool.accounts))
            keys = await ctx.store.run(ctx.store.active_api_key_count)
            if keys != ctx.active_keys:
                ctx.active_keys = keys
                ctx.forget_keys()
        except Exception:
            log.exception("store poll failed")


async def serve_proxy(
    settings: Settings,
    *,
    shutdown_event: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until ``shutdown_event`` is set (or cancelled); report the bound port."""
    install_worker()
    store = Store.open(
        settings.resolved_database_url, data_dir=settings.data_dir, secret_key=settings.secret_key
    )
    try:
        keys = store.active_api_key_count()
        if (
            not _is_loopback_bind(settings.host)
            and keys == 0
            and not settings.allow_remote_without_keys
        ):
            raise ConfigError(
                f"refusing to listen on {settings.host} with no API key: anyone could use your accounts. "
                "Create a key with `trioproxy keys create NAME`, or set TRIOPROXY_ALLOW_REMOTE_WITHOUT_KEYS=true."
            )
        shutdown = shutdown_event if shutdown_event is not None else trio.Event()
        async with make_upstream_client(settings) as http, trio.open_nursery() as app_nursery:
            pool = Pool(strategy=settings.routing_strategy)
            pool.sync(await store.run(store.list_accounts))
            admission = build_admission(settings)
            tokens = TokenManager(
                pool,
                store,
                http,
                settings.auth_base_url,
                admission,
                cooldown=settings.refresh_cooldown,
            )
            await app_nursery.start(tokens.run)  # owns the refresh flights
            reqlog = RequestLog(store)
            ctx = ProxyContext(
                settings,
                store,
                pool,
                tokens,
                http,
                reqlog,
                admission,
                nursery=app_nursery,
                active_keys=keys,
            )
            await app_nursery.start(reqlog.run)
            ctx.bridges = BridgeRegistry(ctx)
            await app_nursery.start(ctx.bridges.run)
            app_nursery.start_soon(watch_store, ctx)
            # usage poller, model registry, alerts, quota saver (issue 6; docs/quota.md)
            pool.restore_quota(await store.run(store.load_quota))
            services = QuotaServices.build(settings, pool, tokens, http, store)
            await services.start(app_nursery, pool, store)
            config = hypercorn_config(settings)
            sockets = listening_sockets(config, settings)
            app = wrap_app(create_app(ctx, services), config.wsgi_max_body_size, "asgi")

            listener_closing = trio.Event()

            async def stop_when_asked() -> None:
                await shutdown.wait()
                ctx.start_draining()  # readiness goes false first, new requests get 503
                log.info("draining", grace=settings.drain_grace, deadline=settings.drain_timeout)
                await trio.sleep(settings.drain_grace)
                listener_closing.set()

            async def run_server(
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                try:
                    await worker_serve(
                        app,
                        config,
                        sockets=sockets,
                        shutdown_trigger=stop_and_wait,
                        task_status=task_status,
                    )
                finally:
                    app_nursery.cancel_scope.cancel(reason="server stopped")

            async def stop_and_wait() -> None:
                await listener_closing.wait()

            app_nursery.start_soon(stop_when_asked)
            binds: list[str] = await app_nursery.start(run_server)
            port = _port_of(binds[0])
            log.info(
                "serving",
                url=f"http://{settings.host}:{port}",
                data_dir=str(settings.data_dir),
                accounts=len(pool.accounts),
                api_keys=keys,
            )
            if not pool.accounts:
                log.warning(
                    "no accounts yet",
                    hint="import a Codex auth.json: `trioproxy accounts import ~/.codex/auth.json` (or POST it to /api/accounts)",
                )
            if keys == 0 and is_loopback(settings.host):
                log.info(
                    "no API key: serving loopback clients only",
                    hint="`trioproxy keys create NAME` to require keys",
                )
            task_status.started(port)
    finally:
        store.close()
