"""The quota services of a running proxy, built and started together in the app nursery:
the usage poller, the model registry refresher, the alert watcher and sender, and the task
that saves quota states to the store (off the request path).

Replicas on one database: the poller, the registry refresher and the alerts are jobs that
one process at a time does for all (``leadership.py``, lease ``quota-services``). The others
get their results through the store: polled figures as quota states (saved by the lease
holder, combined by every replica's store watcher), model lists as the shared document
``models``. Every process saves what its own traffic taught it about quotas.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import trio

from trioproxy.accounts.alerts import AlertSender, PoolWatcher
from trioproxy.accounts.leadership import Lease
from trioproxy.accounts.poller import HttpUsageSource, UsagePoller
from trioproxy.accounts.pool import Pool
from trioproxy.accounts.refresh import TokenManager
from trioproxy.accounts.registry import HttpModelSource, ModelRegistry
from trioproxy.config import Settings
from trioproxy.logs import get_logger
from trioproxy.store import Store
from trioproxy.store.coordination import save_document

log = get_logger("trioproxy.quota")
SAVE_QUOTA_SECONDS = 5.0
SAVE_QUOTA_SHARED_SECONDS = 1.0
LEASE = "quota-services"
MODELS_DOCUMENT = "models"


@attrs.define(eq=False)
class QuotaServices:
    registry: ModelRegistry
    poller: UsagePoller
    alerts: AlertSender
    watcher: PoolWatcher
    #: the lease under which this process runs the jobs done by one replica at a time
    lease: Lease

    @classmethod
    def build(
        cls,
        settings: Settings,
        pool: Pool,
        tokens: TokenManager,
        http: httpx.AsyncClient,
        store: Store,
    ) -> QuotaServices:
        upstream = settings.upstream_base_url.rstrip("/")

        async def deactivated(account_id: str, reason: str) -> None:
            await store.run(lambda: store.set_account_state(account_id, "deactivated", reason))

        registry = ModelRegistry(
            pool, HttpModelSource(tokens, http, upstream), settings.models_refresh_interval
        )
        pool.model_plans = registry.plans_for
        poller = UsagePoller(
            pool,
            HttpUsageSource(tokens, http, upstream),
            interval=settings.usage_poll_interval,
            concurrency=settings.usage_poll_concurrency,
            max_cooldown=settings.usage_poll_max_cooldown,
            on_deactivated=deactivated,
        )
        alerts = AlertSender(
            settings.alert_webhook_url or None,
            http,
            max_queue=settings.alert_queue_size,
            timeout=settings.alert_timeout,
        )

        async def publish_models(models: dict[str, Any]) -> None:
            await store.run(save_document, store, MODELS_DOCUMENT, models)

        if store.engine.dialect.name == "postgresql":
            registry.publish = publish_models
        # the holder is unique to this process: its name, process id and a random part
        holder = f"{settings.resolved_replica_name}:{os.getpid()}:{secrets.token_hex(3)}"
        lease = Lease(store, LEASE, holder, term=settings.lease_term)
        return cls(registry, poller, alerts, PoolWatcher(pool, alerts), lease)

    async def start(self, nursery: trio.Nursery, pool: Pool, store: Store) -> None:
        """Start the services in ``nursery`` (the app nursery): the quota saver here, the
        others while this process holds the lease (on PostgreSQL; a SQLite store has one
        server, which runs them all the time)."""
        if store.engine.dialect.name == "postgresql":
            await nursery.start(self.lease.lead, self._lease_jobs)
        else:
            self.lease.held = True
            await self._lease_jobs(nursery)
        # replicas read each other's quota states from the store: save them sooner
        shared = store.engine.dialect.name == "postgresql"
        interval = SAVE_QUOTA_SHARED_SECONDS if shared else SAVE_QUOTA_SECONDS
        nursery.start_soon(save_quota, pool, store.run, store.save_quota, interval)

    async def _lease_jobs(self, nursery: trio.Nursery) -> None:
        if self.poller.interval > 0:
            await nursery.start(self.poller.run)
        await nursery.start(self.registry.run)
        await nursery.start(self.watcher.run)
        if self.alerts.url:
            await nursery.start(self.alerts.run)


async def save_quota(
    pool: Pool,
    run: Callable[..., Awaitable[object]],
    save: Callable[..., object],
    interval: float = SAVE_QUOTA_SECONDS,
) -> None:
    """Write changed quota states every ``interval`` seconds (and once more on the way out)."""
    try:
        while True:
            await trio.sleep(interval)
            dirty = pool.take_dirty()
            if dirty:
                try:
                    await run(save, dirty)
                except Exception:
                    log.exception("saving quota states failed")
    finally:
        dirty = pool.take_dirty()
        if dirty:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await run(save, dirty)
                except Exception:
                    log.exception("saving quota states failed")
