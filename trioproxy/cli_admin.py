"""``trioproxy accounts ...`` and ``trioproxy keys ...``: offline administration of the store.

These commands open the store directly (no running server needed; a running server picks up
account changes by polling :meth:`Store.accounts_version`). Options are resolved like
``serve``'s: flags > ``TRIOPROXY_*`` environment > ``--config`` TOML > defaults.

Exit codes: 0 done; 1 an account, key or file could not be found or used (a message says
which); 2 a usage error (click's).
"""

from __future__ import annotations

import functools
import json
import shlex
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from trioproxy.accounts.quota import QuotaState, Window
from trioproxy.accounts.records import RELOGIN_COMMAND
from trioproxy.cli_options import settings_options
from trioproxy.config import ConfigError, load_settings
from trioproxy.store import AccountRecord, Store, StoreError
from trioproxy.store.apikeys import key_id_of


def open_store(config_file: Path | None, overrides: dict[str, Any]) -> Store:
    """The store named by the resolved settings; bad options are usage errors (exit 2), a
    store that cannot be opened is exit 1."""
    try:
        settings = load_settings(config_file=config_file, overrides=overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        return Store.open(
            settings.resolved_database_url,
            data_dir=settings.data_dir,
            secret_key=settings.secret_key,
        )
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    delta = timestamp - now
    span = abs(delta)
    if span < 60:
        return f"{moment} (now)"
    if span < 3600:
        amount = f"{int(span // 60)}m"
    elif span < 2 * 86400:
        amount = f"{int(span // 3600)}h"
    else:
        amount = f"{int(span // 86400)}d"
    return f"{moment} ({'in ' + amount if delta >= 0 else amount + ' ago'})"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    return "\n".join(line(cells).rstrip() for cells in [headers, *rows])


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def _describe(record: AccountRecord) -> str:
    return f"{record.account_id} ({record.email or 'no email'}, {record.plan or 'unknown plan'})"


# -- accounts ------------------------------------------------------------------------------
@click.group()
def accounts() -> None:
    """Manage the ChatGPT accounts the proxy spreads traffic over."""


@accounts.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@settings_options
def import_accounts(paths: tuple[Path, ...], config_file: Path | None, **overrides: Any) -> None:
    """Import accounts. PATH: a Codex auth.json, a folder searched for them, a CLIProxyAPI
    auth folder (its codex-*.json files) or a codex-lb data folder (store.db + encryption.key).

    Importing an account again updates its tokens and makes it active again; each account is
    reported as imported, updated or skipped (and why)."""
    import trio

    from trioproxy.accounts.importing import import_sources
    from trioproxy.accounts.peers import read_sources

    now = time.time()
    failures = stored = 0
    with open_store(config_file, overrides) as store:  # first: bad options fail before files
        sources = []
        for path in paths:
            found = read_sources(path)
            if not found:
                click.echo(f"error: {path}: no auth.json with ChatGPT tokens found", err=True)
                failures += 1
            sources += found
        for outcome in trio.run(functools.partial(import_sources, store, None, sources, now=now)):
            if outcome.action == "error":
                click.echo(f"error: {outcome.line()}", err=True)
                failures += 1
            else:
                click.echo(outcome.line())
                stored += outcome.action in ("imported", "updated")
    if failures:
        raise click.ClickException(
            f"{failures} file(s) or folder(s) could not be imported"
            f" ({stored} account(s) were imported or updated)"
        )


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (no tokens) instead of a table.")
@settings_options
def list_accounts(as_json: bool, config_file: Path | None, **overrides: Any) -> None:
    """Show accounts: id, email, plan, state, quota windows (percent used, reset, where each
    figure came from and how old it is) and access-token expiry; for an account that needs a
    new sign-in, the command that fixes it.

    Quota figures are what a running proxy last learned (rate-limit headers, events, 429s and
    usage polls); it saves them to the store every few seconds."""
    with open_store(config_file, overrides) as store:
        records = store.list_accounts()
        saved = store.load_quota()
    now = time.time()
    quotas = {r.account_id: QuotaState.from_json(saved.get(r.account_id)) for r in records}
    relogin = _relogin_command(config_file, overrides)
    if as_json:
        _echo_json(
            [
                {
                    **record.public_view(),
                    "state": _state(record, quotas[record.account_id], now),
                    "quota": quotas[record.account_id].view(now),
                    "relogin_command": relogin if record.state == "reauth_required" else None,
                }
                for record in records
            ]
        )
        return
    if not records:
        click.echo("no accounts yet; add some with: trioproxy accounts import PATH")
        return
    rows = []
    for r in records:
        quota = quotas[r.account_id]
        state = _state(r, quota, now)
        reason = r.state_reason
        if state == "exhausted":
            until = quota.exhausted_until(now)
            reason = "until " + (_when(until, now) if until != float("inf") else "unknown")
        rows.append(
            [
                r.account_id,
                r.email or "-",
                r.plan or "-",
                state + (f" ({reason})" if reason else ""),
                _window_cell(quota.primary, now),
                _window_cell(quota.secondary, now),
                _learned_cell(quota, now),
                _when(r.access_expires_at, now),
            ]
        )
    click.echo(
        _table(
            ["ID", "EMAIL", "PLAN", "STATE", "PRIMARY", "SECONDARY", "LEARNED", "TOKEN EXPIRES"],
            rows,
        )
    )
    stale = [r for r in records if r.state == "reauth_required"]
    if stale:
        click.echo(
            f"\n{len(stale)} account(s) need a new sign-in (their tokens no longer work)."
            " Run the command and sign in as the account; it is updated in place:"
        )
        for record in stale:
            click.echo(f"  {_describe(record)}: {relogin}")


def _relogin_command(config_file: Path | None, overrides: dict[str, Any]) -> str:
    """The login command for the store this command used: ``--data-dir`` and ``--config``
    as given (not ``--secret-key`` or ``--database-url``, which may hold secrets; set those
    the way they were set for this command)."""
    parts = [RELOGIN_COMMAND]
    if overrides.get("data_dir") is not None:
        parts += ["--data-dir", shlex.quote(str(overrides["data_dir"]))]
    if config_file is not None:
        parts += ["--config", shlex.quote(str(config_file))]
    return " ".join(parts)


def _state(record: AccountRecord, quota: QuotaState, now: float) -> str:
    if record.state == "active" and quota.exhausted_until(now) is not None:
        return "exhausted"
    return record.state


def _span(delta: float) -> str:
    span = abs(delta)
    if span < 60:
        amount = f"{int(span)}s"
    elif span < 3600:
        amount = f"{int(span // 60)}m"
    elif span < 2 * 86400:
        amount = f"{int(span // 3600)}h"
    else:
        amount = f"{int(span // 86400)}d"
    return f"in {amount}" if delta >= 0 else f"{amount} ago"


def _window_cell(window: Window | None, now: float) -> str:
    """``30% (resets in 4h)``: percent used now and when the window resets."""
    if window is None:
        return "-"
    used = f"{window.effective_used(now):.0f}%"
    if window.reset_at is None:
        return used
    return f"{used} (resets {_span(window.reset_at - now)})"


def _learned_cell(quota: QuotaState, now: float) -> str:
    """Where each figure came from and how old it is: ``poll 2m ago``; ``429 5m ago`` for a
    usage-limit lock."""
    parts = []
    for name, window in quota.windows():
        parts.append(f"{name[0]}:{window.source} {_span(window.at - now)}")
    if quota.locked(now) and quota.lock_at is not None:
        parts.append(f"429 {_span(quota.lock_at - now)}")
    return ", ".join(parts) or "-"


@accounts.command("remove")
@click.argument("account_id")
@settings_options
def remove_account(account_id: str, config_file: Path | None, **overrides: Any) -> None:
    """Remove an account and its tokens from the store."""
    with open_store(config_file, overrides) as store:
        if not store.remove_account(account_id):
            raise click.ClickException(
                f"no such account: {account_id} (see: trioproxy accounts list)"
            )
    click.echo(f"removed {account_id}")


# -- keys ------------------------------------------------------------------------------------
@click.group()
def keys() -> None:
    """Manage client API keys (with none, only loopback clients are admitted)."""


@keys.command("create")
@click.argument("name")
@settings_options
def create_key(name: str, config_file: Path | None, **overrides: Any) -> None:
    """Create an API key; it is printed once (stdout), only its hash is stored."""
    if not name.strip():
        raise click.BadParameter("must not be empty", param_hint="NAME")
    with open_store(config_file, overrides) as store:
        record, plaintext = store.create_api_key(name)
    click.echo(plaintext)
    click.echo(
        f"created key {record.key_id} ({record.name}); it is shown only this once.\n"
        f"Clients send it as:  Authorization: Bearer {plaintext}",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@settings_options
def list_keys(as_json: bool, config_file: Path | None, **overrides: Any) -> None:
    """Show API keys (ids and names; secrets are never stored)."""
    with open_store(config_file, overrides) as store:
        records = store.list_api_keys()
    if as_json:
        _echo_json([record.public_view() for record in records])
        return
    if not records:
        click.echo(
            "no API keys (clients are admitted from loopback only); create one with: "
            "trioproxy keys create NAME"
        )
        return
    now = time.time()
    rows = [
        [
            r.key_id,
            r.name,
            _when(r.created_at, now),
            _when(r.last_used_at, now),
            "revoked " + _when(r.revoked_at, now) if r.revoked else "active",
        ]
        for r in records
    ]
    click.echo(_table(["KEY ID", "NAME", "CREATED", "LAST USED", "STATUS"], rows))


@keys.command("revoke")
@click.argument("key_id")
@settings_options
def revoke_key(key_id: str, config_file: Path | None, **overrides: Any) -> None:
    """Revoke an API key (KEY_ID as shown by `keys list`; the whole key works too)."""
    key_id = key_id_of(key_id) or key_id  # never echo a whole key back
    with open_store(config_file, overrides) as store:
        before = {record.key_id: record for record in store.list_api_keys()}.get(key_id)
        if before is None or not store.revoke_api_key(key_id):
            raise click.ClickException(f"no such key: {key_id} (see: trioproxy keys list)")
    if before.revoked:
        click.echo(f"key {key_id} ({before.name}) was already revoked")
    else:
        click.echo(f"revoked key {key_id} ({before.name})")


# -- standalone ----------------------------------------------------------------------------
@click.group()
def admin_main() -> None:
    """trioproxy administration (the same `accounts` and `keys` commands as `trioproxy`)."""


admin_main.add_command(accounts)
admin_main.add_command(keys)


if __name__ == "__main__":
    admin_main()
