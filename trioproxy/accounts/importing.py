"""Adding accounts: the one path from Codex auth.json data to an account in the store and
the pool, used by ``POST /api/accounts``, by a finished login (``logins.py``) and by
``trioproxy accounts import`` (Codex auth.json files and other proxies' stores, read by
``peers.py``).

Theory of operation
-------------------
Each item is first made an auth.json (:func:`peers.as_auth_json`: a CLIProxyAPI credential
object is rewritten) and parsed (:func:`parse_auth_json`). Then the accounts are stored:

- the same ChatGPT account twice in one import: the one with the newest tokens is kept, the
  other is skipped;
- an account already stored whose tokens are newer than the imported ones (a later
  ``last_refresh``, another refresh token) and that is not in ``reauth_required`` is skipped:
  refresh tokens rotate, so the older ones most likely no longer work and would replace
  working ones;
- every other account is upserted: a known ChatGPT account id is updated in place (same id,
  ``created_at`` and history kept, tokens replaced, state ``active`` again), a new one is
  created.

Then the pool is brought in line with the store and each stored account gets a fresh start
(its quota polled at once, a 429 lock forgotten; docs/quota.md). Without a pool (the CLI)
only the store is written; a running server picks the change up from the store.

:func:`import_auth_jsons` (the API, logins) parses every item before storing any, so a bad
one stores nothing. :func:`import_sources` (the CLI) reports each source on its own: an
unusable one is an error, the others are still stored.

Error handling: :class:`AuthFileError` for data that is not a ChatGPT auth.json (its message
never quotes token text); store errors propagate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from trioproxy.accounts.authfile import AuthFileError, parse_auth_json
from trioproxy.accounts.peers import Source, as_auth_json
from trioproxy.accounts.pool import Pool
from trioproxy.store import AccountRecord, Store


@attrs.frozen
class Imported:
    """What an import did to one account (no tokens): created, updated, or ``skipped`` (the
    reason) and left as it was."""

    account_id: str
    email: str | None
    plan: str | None
    created: bool
    skipped: str | None = None

    def view(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def describe(self) -> str:
        return f"{self.account_id} ({self.email or 'no email'}, {self.plan or 'unknown plan'})"


@attrs.frozen
class Outcome:
    """What ``accounts import`` did with one :class:`Source`."""

    source: Source
    account: Imported | None = None
    error: str | None = None

    @property
    def action(self) -> str:
        if self.error is not None:
            return "error"
        if self.account is None or self.account.skipped is not None:
            return "skipped"
        return "imported" if self.account.created else "updated"

    def line(self) -> str:
        """One line for the user: ``imported <id> (<email>, <plan>)``, ``updated ...``,
        ``skipped ...: <why>`` or ``<origin>: <error>``; never a token."""
        peer = self.source.peer
        if self.error is not None:
            return f"{self.source.origin}{f' ({peer})' if peer else ''}: {self.error}"
        if self.account is None:
            return f"skipped {peer or self.source.origin}: {self.source.skip}"
        text = f"{self.action} {self.account.describe()}"
        if peer:
            text += f" from {peer}"
        if self.account.skipped is not None:
            text += f": {self.account.skipped}"
        return text


async def import_auth_jsons(
    store: Store, pool: Pool | None, items: Iterable[Any], *, now: float
) -> list[Imported]:
    """Store every auth.json of ``items`` (see the module docstring); one :class:`AuthFileError`
    stores nothing."""
    records = [parse_auth_json(as_auth_json(item), now=now) for item in items]
    return await _store(store, pool, records)


async def import_sources(
    store: Store, pool: Pool | None, sources: Sequence[Source], *, now: float
) -> list[Outcome]:
    """Store every usable account of ``sources``; an :class:`Outcome` for each, in order."""
    outcomes: list[Outcome | None] = []
    usable: list[tuple[int, AccountRecord]] = []
    for source in sources:
        if source.error is not None:
            outcomes.append(Outcome(source, error=source.error))
        elif source.data is None:
            outcomes.append(Outcome(source))
        else:
            try:
                record = parse_auth_json(as_auth_json(source.data), now=now)
            except AuthFileError as exc:
                outcomes.append(Outcome(source, error=str(exc)))
            else:
                usable.append((len(outcomes), record))
                outcomes.append(None)
    stored = await _store(store, pool, [record for _, record in usable])
    for (index, _), account in zip(usable, stored, strict=True):
        outcomes[index] = Outcome(sources[index], account)
    return [outcome for outcome in outcomes if outcome is not None]


async def _store(store: Store, pool: Pool | None, records: list[AccountRecord]) -> list[Imported]:
    """Upsert ``records`` by the rules of the module docstring; one result each, in order."""
    newest: dict[str, int] = {}
    for index, record in enumerate(records):
        kept = newest.get(record.account_id)
        if kept is None or record.last_refresh >= records[kept].last_refresh:
            newest[record.account_id] = index
    results = []
    for index, record in enumerate(records):
        if newest[record.account_id] != index:
            results.append(_skipped(record, "the same account appears again with newer tokens"))
            continue
        current = await store.run(store.get_account, record.account_id)
        if (
            current is not None
            and current.state != "reauth_required"
            and current.last_refresh > record.last_refresh
            and current.refresh_token != record.refresh_token
        ):
            reason = "the stored tokens are newer (these are older and most likely spent)"
            results.append(_skipped(current, reason))
            continue
        stored, created = await store.run(store.upsert_account, record)
        results.append(Imported(stored.account_id, stored.email, stored.plan, created))
    fresh = [result.account_id for result in results if result.skipped is None]
    if pool is not None and fresh:
        pool.sync(await store.run(store.list_accounts))
        for account_id in fresh:
            pool.fresh_start(account_id)
    return results


def _skipped(record: AccountRecord, reason: str) -> Imported:
    return Imported(record.account_id, record.email, record.plan, False, reason)
