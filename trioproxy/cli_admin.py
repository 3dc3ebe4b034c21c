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
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from trioproxy.accounts.pausing import Outcome, pause_account, resume_account
from trioproxy.accounts.quota import QuotaState, Window
from trioproxy.accounts.records import RELOGIN_COMMAND, shown_state
from trioproxy.cli_options import load_cli_settings, settings_options
from trioproxy.config import ConfigError, load_settings
from trioproxy.keys.options import (
    SPEC_FORM,
    checked_policy,
    format_budget_spec,
    parse_when,
    policy_change,
)
from trioproxy.keys.policy import EFFORTS, PolicyError, merge_policy
from trioproxy.store import AccountRecord, Store, StoreError
from trioproxy.store.apikeys import key_id_of
from trioproxy.store.records import ApiKeyRecord
from trioproxy.store.store import UNCHANGED, Unchanged


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
    return shown_state(record.state)


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


def _pause_or_resume(
    change: Callable[[Store, str], Outcome],
    account_id: str,
    config_file: Path | None,
    overrides: dict[str, Any],
) -> None:
    with open_store(config_file, overrides) as store:
        outcome = change(store, account_id)
    if outcome.before is None:
        raise click.ClickException(f"no such account: {account_id} (see: trioproxy accounts list)")
    if outcome.refused:
        raise click.ClickException(outcome.message())
    click.echo(outcome.message())


@accounts.command("pause")
@click.argument("account_id")
@settings_options
def pause(account_id: str, config_file: Path | None, **overrides: Any) -> None:
    """Take an account out of rotation: no new request, turn or conversation goes to it
    (turns already running on it finish) until it is resumed. A running proxy picks the
    change up within seconds."""
    _pause_or_resume(pause_account, account_id, config_file, overrides)


@accounts.command("resume")
@click.argument("account_id")
@settings_options
def resume(account_id: str, config_file: Path | None, **overrides: Any) -> None:
    """Put a paused account back in rotation."""
    _pause_or_resume(resume_account, account_id, config_file, overrides)


# -- keys ------------------------------------------------------------------------------------
#: the environment variable the printed Codex CLI configuration reads the key from
ENV_KEY = "TRIOPROXY_API_KEY"
POLICY_OPTIONS = (
    "models",
    "max_effort",
    "budgets",
    "max_sessions",
    "max_requests",
    "accounts",
    "policy_json",
)
CLEAR_OPTIONS = ("clear_models", "clear_budgets")


@click.group()
def keys() -> None:
    """Manage client API keys and their policies (docs/keys.md). With no key, only loopback
    clients are admitted. KEY_ID is the id `keys list` shows (the whole key works too)."""


def _policy_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that set a key's policy and expiry (``keys create`` and ``keys set``)."""
    options = [
        click.option(
            "--model",
            "models",
            multiple=True,
            metavar="PATTERN",
            help="A model the key may use: a name, a shell pattern (gpt-5*) or re:REGEX; "
            "repeat for more (replaces the list).",
        ),
        click.option(
            "--max-effort",
            type=click.Choice(EFFORTS),
            help="The highest reasoning effort the key may ask for.",
        ),
        click.option(
            "--budget",
            "budgets",
            multiple=True,
            metavar="SPEC",
            help=f"A budget, {SPEC_FORM}: e.g. 5h:tokens=2000000,requests=500 or "
            "monthly:calendar:cost_usd=50; repeat for more (replaces the list).",
        ),
        click.option("--max-sessions", type=int, help="WebSocket sessions open at once."),
        click.option("--max-requests", type=int, help="Requests and turns in flight at once."),
        click.option(
            "--expires",
            metavar="WHEN",
            help="When the key stops working: an ISO-8601 date or date and time (UTC "
            "without an offset), unix seconds, or from now: 12h, 30d, 2w.",
        ),
        click.option(
            "--account",
            "accounts",
            multiple=True,
            metavar="ID",
            help="An account the key may be routed to; repeat for more (replaces the list).",
        ),
        click.option(
            "--policy-json",
            metavar="JSON",
            help="Policy fields as a JSON object (a field set to null is removed); the "
            "options above override its fields.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _checked(current: dict[str, Any] | None, change: dict[str, Any]) -> dict[str, Any] | None:
    """``current`` with ``change`` merged, checked and normalized; a policy that cannot be
    used is a usage error naming the field."""
    try:
        return checked_policy(merge_policy(current, change))
    except PolicyError as exc:
        raise click.BadParameter(str(exc), param_hint=f"policy field {exc.param!r}") from None


def _change(**options: Any) -> dict[str, Any]:
    try:
        return policy_change(**options)
    except PolicyError as exc:
        hint = "--policy-json" if exc.param == "policy" else "--budget"
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _expiry(text: str, now: float) -> float:
    try:
        return parse_when(text, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires") from None


def _check_accounts(store: Store, change: dict[str, Any]) -> None:
    """Accounts the change names must be in the store."""
    named = change.get("accounts")
    if not isinstance(named, list):
        return
    unknown = sorted(set(named) - {record.account_id for record in store.list_accounts()})
    if unknown:
        raise click.BadParameter(
            f"not in the store: {', '.join(map(str, unknown))} (see: trioproxy accounts list)",
            param_hint="--account",
        )


def _stored_key(store: Store, key_id: str, *, changing: bool) -> ApiKeyRecord:
    record = store.get_api_key(key_id)
    if record is None:
        raise click.ClickException(f"no such key: {key_id} (see: trioproxy keys list)")
    if changing and record.revoked:
        raise click.ClickException(
            f"key {key_id} ({record.name}) is revoked; revocation cannot be undone"
        )
    return record


def _key_id(text: str) -> str:
    return key_id_of(text) or text  # a whole key names its id; never echo it back


def _proxy_root(config_file: Path | None, overrides: dict[str, Any]) -> str:
    """The proxy's address as a client on this machine reaches it."""
    settings = load_cli_settings(config_file, overrides)
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.certfile else "http"
    return f"{scheme}://{host}:{settings.port}"


def _codex_config(root: str, env_key: str) -> str:
    return (
        'model_provider = "trioproxy"\n'
        "\n"
        "[model_providers.trioproxy]\n"
        'name = "trioproxy"\n'
        f'base_url = "{root}/backend-api/codex"\n'
        'wire_api = "responses"\n'
        "supports_websockets = true\n"
        f'env_key = "{env_key}"'
    )


def _policy_summary(policy: dict[str, Any] | None) -> str:
    """A policy in one short line: ``models=gpt-5*; effort<=medium; 5h:tokens=2M``."""
    policy = policy or {}
    parts = []
    models = policy.get("models")
    if models is not None:
        listed = ",".join(models)
        parts.append(f"models={listed}" if len(listed) <= 32 else f"{len(models)} models")
    if policy.get("max_reasoning_effort") is not None:
        parts.append(f"effort<={policy['max_reasoning_effort']}")
    parts += [format_budget_spec(budget) for budget in policy.get("budgets") or ()]
    for name in ("max_sessions", "max_requests"):
        if policy.get(name) is not None:
            parts.append(f"{name}={policy[name]}")
    accounts = policy.get("accounts")
    if accounts is not None:
        listed = ",".join(accounts)
        parts.append(f"accounts={listed}" if len(listed) <= 32 else f"{len(accounts)} accounts")
    return "; ".join(parts) or "-"


def _status_cell(record: ApiKeyRecord, now: float) -> str:
    status = record.status(now)
    when = {
        "revoked": record.revoked_at,
        "disabled": record.disabled_at,
        "expired": record.expires_at,
    }.get(status)
    if when is not None:
        return f"{status} {_when(when, now)}"
    if record.expires_at is not None:
        return f"active, expires {_when(record.expires_at, now)}"
    return status


@keys.command("create")
@click.argument("name")
@_policy_options
@settings_options
def create_key(
    name: str,
    expires: str | None,
    config_file: Path | None,
    **overrides: Any,
) -> None:
    """Create an API key with an optional policy. The key is printed once (stdout); only its
    hash is stored. The Codex CLI configuration that uses it is printed on stderr.

    A budget SPEC is WINDOW[:RESET]:LIMIT=VALUE[,LIMIT=VALUE...]: WINDOW is 5h, daily,
    weekly or monthly; RESET rolling or calendar (UTC; default: rolling for 5h, calendar
    otherwise); LIMIT requests, tokens (input + output), input_tokens, cached_input_tokens,
    output_tokens, reasoning_tokens or cost_usd; VALUE a number, with k or M for thousands
    or millions. Examples:

    \b
      --budget 5h:tokens=2000000,requests=500
      --budget monthly:calendar:cost_usd=50
      --budget daily:rolling:output_tokens=100k"""
    options = {option: overrides.pop(option) for option in POLICY_OPTIONS}
    if not name.strip():
        raise click.BadParameter("must not be empty", param_hint="NAME")
    now = time.time()
    change = _change(**options)
    policy = _checked(None, change)
    expires_at = None
    if expires is not None:
        expires_at = _expiry(expires, now)
        if expires_at <= now:
            raise click.BadParameter(f"{expires!r} is in the past", param_hint="--expires")
    root = _proxy_root(config_file, overrides)
    with open_store(config_file, overrides) as store:
        _check_accounts(store, change)
        record, plaintext = store.create_api_key(name, policy=policy, expires_at=expires_at)
    click.echo(plaintext)
    click.echo(
        f"created key {record.key_id} ({record.name}); it is shown only this once (only its "
        f"hash is stored).\n"
        f"Policy: {_policy_summary(record.policy)}\n"
        f"Expires: {_when(record.expires_at, now) if record.expires_at else 'never'}\n"
        f"Clients send it as:  Authorization: Bearer {plaintext}\n"
        f"\n"
        f"Codex CLI: add to ~/.codex/config.toml\n"
        f"\n"
        f"{_codex_config(root, ENV_KEY)}\n"
        f"\n"
        f"then run:  {ENV_KEY}={plaintext} codex",
        err=True,
    )


@keys.command("set")
@click.argument("key_id")
@_policy_options
@click.option("--clear-models", is_flag=True, help="Allow every model again.")
@click.option("--clear-budgets", is_flag=True, help="Remove every budget.")
@click.option("--no-expiry", is_flag=True, help="The key never expires.")
@click.option("--name", "new_name", help="A new name.")
@settings_options
def set_key(
    key_id: str,
    expires: str | None,
    no_expiry: bool,
    new_name: str | None,
    config_file: Path | None,
    **overrides: Any,
) -> None:
    """Change a key: its name, expiry or policy fields (each option replaces its field; the
    other fields stay). A running proxy takes the change up within a second or so.
    Budget SPECs are as for `keys create`."""
    options = {option: overrides.pop(option) for option in (*POLICY_OPTIONS, *CLEAR_OPTIONS)}
    key_id = _key_id(key_id)
    if expires is not None and no_expiry:
        raise click.UsageError("give --expires or --no-expiry, not both")
    if new_name is not None and not new_name.strip():
        raise click.BadParameter("must not be empty", param_hint="--name")
    now = time.time()
    change = _change(**options)
    expires_at: float | Unchanged | None = UNCHANGED
    if expires is not None:
        expires_at = _expiry(expires, now)
    elif no_expiry:
        expires_at = None
    if not change and new_name is None and isinstance(expires_at, Unchanged):
        raise click.UsageError("nothing to change; see: trioproxy keys set --help")
    with open_store(config_file, overrides) as store:
        record = _stored_key(store, key_id, changing=True)
        policy: dict[str, Any] | Unchanged | None = UNCHANGED
        if change:
            policy = _checked(record.policy, change)
            _check_accounts(store, change)
        try:
            updated = store.update_api_key(
                key_id, name=new_name, policy=policy, expires_at=expires_at
            )
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    assert updated is not None
    click.echo(
        f"updated key {key_id} ({updated.name}): {_status_cell(updated, now)}; "
        f"policy: {_policy_summary(updated.policy)}"
    )


@keys.command("show")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@settings_options
def show_key(key_id: str, as_json: bool, config_file: Path | None, **overrides: Any) -> None:
    """Show a key: status, dates and policy. What its budgets have used is counted by the
    running proxy: read it with GET /api/keys/KEY_ID."""
    key_id = _key_id(key_id)
    root = _proxy_root(config_file, overrides)
    with open_store(config_file, overrides) as store:
        record = _stored_key(store, key_id, changing=False)
    now = time.time()
    usage_hint = f"budget usage is counted by the running proxy: GET {root}/api/keys/{key_id}"
    if as_json:
        _echo_json(record.public_view(now))
        click.echo(usage_hint, err=True)
        return
    policy = record.policy or {}
    lines = [
        ("key", record.key_id),
        ("name", record.name),
        ("status", record.status(now)),
        ("created", _when(record.created_at, now)),
        ("last used", _when(record.last_used_at, now)),
        ("expires", _when(record.expires_at, now) if record.expires_at else "never"),
        ("rotated", _when(record.rotated_at, now)),
        ("disabled", _when(record.disabled_at, now)),
        ("revoked", _when(record.revoked_at, now)),
        ("models", ", ".join(policy["models"]) if "models" in policy else "any"),
        ("max effort", policy.get("max_reasoning_effort") or "any"),
    ]
    budgets = [format_budget_spec(budget) for budget in policy.get("budgets") or ()]
    lines += [("budget", spec) for spec in budgets] or [("budgets", "none")]
    lines += [
        ("max sessions", str(policy.get("max_sessions") or "no limit")),
        ("max requests", str(policy.get("max_requests") or "no limit")),
        ("accounts", ", ".join(policy["accounts"]) if "accounts" in policy else "any"),
    ]
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        click.echo(f"{label.ljust(width)}  {value}")
    click.echo(f"\n{usage_hint[0].upper()}{usage_hint[1:]}")


def _set_disabled(key_id: str, disabled: bool, config_file: Path | None, overrides: Any) -> None:
    key_id = _key_id(key_id)
    verb = "disabled" if disabled else "enabled"
    with open_store(config_file, overrides) as store:
        before = _stored_key(store, key_id, changing=True)
        if (before.disabled_at is not None) == disabled:
            click.echo(f"key {key_id} ({before.name}) was already {verb}")
            return
        try:
            store.update_api_key(key_id, disabled=disabled)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"{verb} key {key_id} ({before.name})")


@keys.command("disable")
@click.argument("key_id")
@settings_options
def disable_key(key_id: str, config_file: Path | None, **overrides: Any) -> None:
    """Disable a key: requests with it get 403 api_key_disabled until it is enabled."""
    _set_disabled(key_id, True, config_file, overrides)


@keys.command("enable")
@click.argument("key_id")
@settings_options
def enable_key(key_id: str, config_file: Path | None, **overrides: Any) -> None:
    """Enable a disabled key."""
    _set_disabled(key_id, False, config_file, overrides)


@keys.command("rotate")
@click.argument("key_id")
@settings_options
def rotate_key(key_id: str, config_file: Path | None, **overrides: Any) -> None:
    """Give a key a new secret, printed once (stdout). The key keeps its id, policy, usage
    and budgets; the old secret stops working."""
    key_id = _key_id(key_id)
    with open_store(config_file, overrides) as store:
        _stored_key(store, key_id, changing=True)
        try:
            rotated = store.rotate_api_key(key_id)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    if rotated is None:
        raise click.ClickException(f"no such key: {key_id} (see: trioproxy keys list)")
    record, plaintext = rotated
    click.echo(plaintext)
    click.echo(
        f"rotated key {key_id} ({record.name}); the new secret is shown only this once and "
        f"the old one no longer works.",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@settings_options
def list_keys(as_json: bool, config_file: Path | None, **overrides: Any) -> None:
    """Show API keys: id, name, dates, a policy summary and status (secrets are never
    stored)."""
    with open_store(config_file, overrides) as store:
        records = store.list_api_keys()
    now = time.time()
    if as_json:
        _echo_json([record.public_view(now) for record in records])
        return
    if not records:
        click.echo(
            "no API keys (clients are admitted from loopback only); create one with: "
            "trioproxy keys create NAME"
        )
        return
    rows = [
        [
            r.key_id,
            r.name,
            _when(r.created_at, now),
            _when(r.last_used_at, now),
            _policy_summary(r.policy),
            _status_cell(r, now),
        ]
        for r in records
    ]
    click.echo(_table(["KEY ID", "NAME", "CREATED", "LAST USED", "POLICY", "STATUS"], rows))


@keys.command("revoke")
@click.argument("key_id")
@settings_options
def revoke_key(key_id: str, config_file: Path | None, **overrides: Any) -> None:
    """Revoke an API key (KEY_ID as shown by `keys list`; the whole key works too).
    Revocation is final."""
    key_id = _key_id(key_id)
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
