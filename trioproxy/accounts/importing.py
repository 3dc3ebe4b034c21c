"""Adding accounts to a running proxy: the one path from Codex auth.json data to an account
in the store and the pool, used by ``POST /api/accounts`` and by a finished login
(``logins.py``).

Every item is parsed first (:func:`parse_auth_json`), so a bad one stores nothing; then each
is upserted (a known ChatGPT account id is updated in place: same id, ``created_at`` and
history kept, tokens replaced, state ``active`` again), the pool is brought in line with the
store and each account gets a fresh start (its quota polled at once, a 429 lock forgotten;
docs/quota.md). Without a pool (the CLI) only the store is written; a running server picks
the change up from the store.

Error handling: :class:`AuthFileError` for data that is not a ChatGPT auth.json (its message
never quotes token text); store errors propagate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from trioproxy.accounts.authfile import parse_auth_json
from trioproxy.accounts.pool import Pool
from trioproxy.store import Store


@attrs.frozen
class Imported:
    """What an import did to one account (no tokens)."""

    account_id: str
    email: str | None
    plan: str | None
    created: bool

    def view(self) -> dict[str, Any]:
        return attrs.asdict(self)


async def import_auth_jsons(
    store: Store, pool: Pool | None, items: Iterable[Any], *, now: float
) -> list[Imported]:
    """Store every auth.json of ``items`` (see the module docstring)."""
    records = [parse_auth_json(item, now=now) for item in items]
    results = []
    for record in records:
        stored, created = await store.run(store.upsert_account, record)
        results.append(Imported(stored.account_id, stored.email, stored.plan, created))
    if pool is not None and results:
        pool.sync(await store.run(store.list_accounts))
        for result in results:
            pool.fresh_start(result.account_id)
    return results
