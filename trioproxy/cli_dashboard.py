"""``trioproxy admin``: the dashboard's admins, in the store (no running server needed;
docs/dashboard.md).

``create NAME`` and ``set-password NAME`` make a password (printed once on stdout, alone, so
``PASSWORD=$(trioproxy admin create ops)`` works) unless one is given on standard input
(``--password-stdin``: its first line) or typed at a prompt (``--prompt``: asked twice,
not echoed). Only a salted scrypt hash is stored; a running proxy takes a new or removed
admin, or a new password, within two seconds, and ends the sessions of a removed admin or
of a changed password.

Exit codes: 0 done; 1 no such admin, an admin of that name exists already, or the store
could not be opened; 2 a usage error (a password too short, two password sources).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from trioproxy.cli_admin import _table, _when, open_store
from trioproxy.cli_options import settings_options
from trioproxy.dashboard.passwords import (
    check_new_password,
    generate_password,
    hash_password,
)
from trioproxy.store import admins as admin_store


@click.group()
def admin() -> None:
    """Manage who may sign in to the dashboard (/dashboard)."""


def _password_options(func: Any) -> Any:
    func = click.option(
        "--prompt",
        "prompt",
        is_flag=True,
        help="Type the password at a prompt (asked twice, not shown).",
    )(func)
    return click.option(
        "--password-stdin",
        "from_stdin",
        is_flag=True,
        help="Read the password from the first line of standard input.",
    )(func)


def _password(from_stdin: bool, prompt: bool) -> tuple[str, bool]:
    """The password to set and whether it was generated."""
    if from_stdin and prompt:
        raise click.UsageError("give --password-stdin or --prompt, not both")
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif prompt:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        return generate_password(), True
    problem = check_new_password(password)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="password")
    return password, False


def _name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or any(c.isspace() or not c.isprintable() for c in name):
        raise click.BadParameter(
            "a name is 1 to 64 printable characters without spaces", param_hint="NAME"
        )
    return name


@admin.command("create")
@click.argument("name")
@_password_options
@settings_options
def create_admin(
    name: str, from_stdin: bool, prompt: bool, config_file: Path | None, **overrides: Any
) -> None:
    """Add an admin. Without --password-stdin or --prompt a password is made and printed
    once (stdout); only its hash is stored."""
    name = _name(name)
    password, generated = _password(from_stdin, prompt)
    hashed = hash_password(password)
    with open_store(config_file, overrides) as store:
        created = admin_store.create_admin(store, name, hashed)
    if created is None:
        raise click.ClickException(
            f"an admin named {name!r} exists already (set-password changes its password)"
        )
    if generated:
        click.echo(password)
    click.echo(
        f"created admin {name}"
        + (
            "; its password is shown only this once (only its hash is stored)."
            if generated
            else "."
        )
        + "\nSign in at http://<proxy>/dashboard",
        err=True,
    )


@admin.command("set-password")
@click.argument("name")
@_password_options
@settings_options
def set_password(
    name: str, from_stdin: bool, prompt: bool, config_file: Path | None, **overrides: Any
) -> None:
    """Give an admin a new password (made and printed once unless given); its sessions
    end."""
    name = _name(name)
    password, generated = _password(from_stdin, prompt)
    hashed = hash_password(password)
    with open_store(config_file, overrides) as store:
        changed = admin_store.set_password(store, name, hashed)
    if not changed:
        raise click.ClickException(f"no admin named {name!r}")
    if generated:
        click.echo(password)
    click.echo(f"new password for admin {name}; its sessions end", err=True)


@admin.command("remove")
@click.argument("name")
@settings_options
def remove_admin(name: str, config_file: Path | None, **overrides: Any) -> None:
    """Remove an admin; its sessions end."""
    with open_store(config_file, overrides) as store:
        removed = admin_store.remove_admin(store, name)
    if not removed:
        raise click.ClickException(f"no admin named {name!r}")
    click.echo(f"removed admin {name}", err=True)


@admin.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@settings_options
def list_admins(as_json: bool, config_file: Path | None, **overrides: Any) -> None:
    """The admins: name, created, password set, last sign-in."""
    with open_store(config_file, overrides) as store:
        records = admin_store.list_admins(store)
    if as_json:
        click.echo(json.dumps([r.public_view() for r in records], indent=2))
        return
    if not records:
        click.echo("no admin yet: `trioproxy admin create NAME`")
        return
    now = time.time()
    rows = [
        [
            r.name,
            _when(r.created_at, now),
            _when(r.password_set_at, now),
            _when(r.last_login_at, now),
        ]
        for r in records
    ]
    click.echo(_table(["NAME", "CREATED", "PASSWORD SET", "LAST SIGN-IN"], rows))
