"""What other processes change in the store, brought into this one's pool.

Accounts imported, removed, re-signed-in, paused or taken out of rotation by the CLI or by
another replica move ``accounts_version``; quota states another replica saved (a 429 lock,
fresh usage figures) move ``quota_version``. :func:`watch_store` looks at both when the
store listener (``store/listener.py``, PostgreSQL's ``LISTEN``/``NOTIFY``) says something
changed, and every ``poll_interval`` seconds in any case (the fallback, and all there is on
SQLite): the account list is synced into the pool, and saved quota states are combined with
what this process knows (``quota.combine``: the newer reading of each window, the newer
lock); shared documents (``store/coordination.py``, e.g. the model lists the lease holder
fetched) go to the callback given for them.

Bound: with PostgreSQL a change reaches every replica within the time its writer takes to
save it (at once for accounts; quota states are saved every second) plus a round trip; if
the listener's connection is down, within ``poll_interval`` more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from trioproxy.accounts.pool import Pool
from trioproxy.logs import get_logger
from trioproxy.store import Store
from trioproxy.store.coordination import document_version, load_document
from trioproxy.store.listener import listen

log = get_logger("trioproxy.accounts")


async def watch_store(
    pool: Pool,
    store: Store,
    *,
    poll_interval: float,
    documents: Mapping[str, Callable[[Any], None]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``pool`` in line with the store until cancelled (its listener is a task of its
    own nursery)."""
    woken = trio.Event()

    def on_change(_name: str) -> None:
        woken.set()

    accounts_version = await store.run(store.accounts_version)
    quota_version = await store.run(store.quota_version)
    document_versions = dict.fromkeys(documents or {}, -1.0)  # read each once at the start
    async with trio.open_nursery() as nursery:
        await nursery.start(listen, store.engine, on_change)
        task_status.started()
        while True:
            with trio.move_on_after(poll_interval):
                await woken.wait()
            woken = trio.Event()
            try:
                current = await store.run(store.accounts_version)
                if current != accounts_version:
                    accounts_version = current
                    pool.sync(await store.run(store.list_accounts))
                    log.info("accounts reloaded", accounts=len(pool.accounts))
                current = await store.run(store.quota_version)
                if current != quota_version:
                    quota_version = current
                    pool.absorb_quota(await store.run(store.load_quota))
                for name, absorb in (documents or {}).items():
                    current = await store.run(document_version, store, name)
                    if current != document_versions[name]:
                        document_versions[name] = current
                        absorb(await store.run(load_document, store, name))
            except Exception:
                log.exception("store poll failed")
