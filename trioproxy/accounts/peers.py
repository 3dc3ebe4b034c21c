"""What ``trioproxy accounts import PATH`` reads: Codex auth.json files, and the stores of
other proxies (CLIProxyAPI, codex-lb), each account turned into the auth.json the Codex CLI
would write so that it takes the one import path (``importing.py``).

Theory of operation
-------------------
:func:`read_sources` looks at what PATH is:

- a file: a Codex auth.json, or one CLIProxyAPI credential file;
- a directory holding codex-lb's ``store.db`` and ``encryption.key`` (its data directory,
  ``~/.codex-lb`` by default): every row of its ``accounts`` table, tokens decrypted with the
  Fernet key in ``encryption.key``;
- any other directory: the ``*.json`` files below it (sorted, symlinked folders not followed)
  that are a Codex auth.json (an object with ``tokens``) or a CLIProxyAPI credential (an
  object with a ``type``; ``codex-<email>.json`` and friends, in its ``auth-dir``). Other
  JSON files are ignored.

Each account found becomes a :class:`Source`: where it came from, and either its auth.json
data, the reason it is skipped (a CLIProxyAPI credential of another provider or marked
``disabled``; a codex-lb account in ``reauth_required``, ``deactivated`` or being deleted) or
the error that makes it unusable. The formats, with their sources, are in docs/accounts.md
("Moving from another proxy"). :func:`as_auth_json` is also applied to every item the import
path takes, so ``POST /api/accounts`` accepts a CLIProxyAPI credential object too.

Resource handling: files are read whole (at most ``MAX_FILE_BYTES`` each); codex-lb's
database is opened read-only and closed before this returns. Nothing is written to the peer's
files.

Error handling: nothing here raises for a bad account or file; each becomes a
:class:`Source` with ``error`` set (a message that never quotes token text). Only an
unreadable PATH given on the command line is reported the same way, by its name.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from trioproxy.accounts.records import RELOGIN_COMMAND

#: Larger files are not credentials (and are not read).
MAX_FILE_BYTES = 1 << 20
#: The names codex-lb gives its database and its key in its data directory.
CODEX_LB_DB = "store.db"
CODEX_LB_KEY = "encryption.key"
#: codex-lb account states whose tokens are not imported, and why.
_CODEX_LB_SKIPPED = {
    "reauth_required": "reauth_required in codex-lb: its tokens no longer work; sign in again"
    f" with `{RELOGIN_COMMAND}`",
    "deactivated": "deactivated in codex-lb",
}


@attrs.frozen
class Source:
    """One account (or file) found under a PATH: ``data`` (an auth.json) to import, or why
    not (``skip``: not an error; ``error``: unusable)."""

    origin: str
    #: how the account is named in messages when it is not a plain Codex auth.json
    #: (``CLIProxyAPI codex-a@b.json``, ``codex-lb account 3f2a...``), else None
    peer: str | None = None
    data: Mapping[str, Any] | None = attrs.field(default=None, repr=False)
    skip: str | None = None
    error: str | None = None


def as_auth_json(item: Any) -> Any:
    """``item`` as a Codex auth.json: a CLIProxyAPI credential object (``type`` and flat
    tokens) is rewritten, anything else is returned as it is."""
    if (
        isinstance(item, Mapping)
        and "tokens" not in item
        and isinstance(item.get("type"), str)
        and "access_token" in item
    ):
        return {
            "auth_mode": "chatgpt",
            "tokens": {
                "id_token": item.get("id_token") or None,
                "access_token": item.get("access_token"),
                "refresh_token": item.get("refresh_token"),
                "account_id": item.get("account_id") or None,
            },
            "last_refresh": item.get("last_refresh") or None,
        }
    return item


def read_sources(path: Path) -> list[Source]:
    """Every account under ``path`` (see the module docstring); an empty list when a folder
    holds none."""
    if not path.is_dir():
        return [_file_source(path, loaded=_load_json(path))]
    if (path / CODEX_LB_DB).is_file():
        return _codex_lb_sources(path)
    found = []
    for file in _json_files(path):
        loaded = _load_json(file)
        if isinstance(loaded, dict) and ("tokens" in loaded or isinstance(loaded.get("type"), str)):
            found.append(_file_source(file, loaded=loaded))
    return found


def _json_files(folder: Path) -> Iterator[Path]:
    found = []
    for parent, subfolders, files in os.walk(folder):
        subfolders.sort()
        found += [Path(parent) / name for name in files if name.endswith(".json")]
    yield from sorted(found)


def _load_json(path: Path) -> Any:
    """The file's JSON, or a :class:`_Unreadable` saying why not."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return _Unreadable(f"larger than {MAX_FILE_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        return _Unreadable(f"cannot read it ({exc.strerror or type(exc).__name__})")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        return _Unreadable("not JSON (not UTF-8 text)")
    except json.JSONDecodeError as exc:
        return _Unreadable(f"not JSON ({exc.msg} at line {exc.lineno})")


@attrs.frozen
class _Unreadable:
    reason: str


def _file_source(path: Path, *, loaded: Any) -> Source:
    origin = str(path)
    if isinstance(loaded, _Unreadable):
        return Source(origin, error=loaded.reason)
    if not isinstance(loaded, dict) or "tokens" in loaded or "type" not in loaded:
        return Source(origin, data=loaded)  # a Codex auth.json (the import path judges it)
    peer = f"CLIProxyAPI {path.name}"
    kind = loaded.get("type")
    if kind != "codex":
        return Source(origin, peer, skip=f"a CLIProxyAPI {kind!s:.20} credential, not Codex")
    if loaded.get("disabled") is True:
        return Source(origin, peer, skip="disabled in CLIProxyAPI")
    return Source(origin, peer, data=as_auth_json(loaded))


def _codex_lb_sources(folder: Path) -> list[Source]:
    """Every account of a codex-lb data directory."""
    database, key_file = folder / CODEX_LB_DB, folder / CODEX_LB_KEY
    origin = str(database)
    try:
        key = key_file.read_bytes().strip()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return [Source(origin, error=f"codex-lb's key {CODEX_LB_KEY} cannot be read ({reason})")]
    from cryptography.fernet import Fernet, InvalidToken

    try:
        fernet = Fernet(key)
    except ValueError:
        return [Source(origin, error=f"{key_file} is not a Fernet key")]
    try:
        rows = _codex_lb_rows(database)
    except sqlite3.Error as exc:
        return [Source(origin, error=f"not a codex-lb database ({exc})")]

    def decrypt(value: object) -> str | None:
        if value is None:
            return None
        return fernet.decrypt(value if isinstance(value, bytes) else str(value).encode()).decode()

    sources = []
    for row in rows:
        peer = f"codex-lb account {row['id']}"
        status = str(row.get("status") or "").lower()
        if row.get("delete_requested_at") is not None:
            sources.append(Source(origin, peer, skip="being deleted in codex-lb"))
            continue
        if status in _CODEX_LB_SKIPPED:
            sources.append(Source(origin, peer, skip=_CODEX_LB_SKIPPED[status]))
            continue
        try:
            tokens = {
                name: decrypt(row.get(f"{name}_encrypted"))
                for name in ("access_token", "refresh_token", "id_token")
            }
        except (InvalidToken, UnicodeDecodeError):
            error = f"its tokens cannot be decrypted with {key_file} (another store's key?)"
            sources.append(Source(origin, peer, error=error))
            continue
        last_refresh = row.get("last_refresh")
        data = {
            "auth_mode": "chatgpt",
            "tokens": {**tokens, "account_id": row.get("chatgpt_account_id") or None},
            # a naive UTC time, as codex-lb's own auth.json export writes it
            "last_refresh": str(last_refresh) if last_refresh is not None else None,
        }
        sources.append(Source(origin, peer, data=data))
    return sources


def _codex_lb_rows(database: Path) -> list[dict[str, Any]]:
    """The ``accounts`` rows (the columns this import reads that the schema has), oldest
    schema versions included; the database is opened read-only."""
    wanted = [
        "id",
        "chatgpt_account_id",
        "status",
        "last_refresh",
        "delete_requested_at",
        "access_token_encrypted",
        "refresh_token_encrypted",
        "id_token_encrypted",
    ]
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        present = {row[1] for row in conn.execute("PRAGMA table_info(accounts)")}
        if not present:
            raise sqlite3.OperationalError("it has no accounts table")
        columns = [name for name in wanted if name in present]
        cursor = conn.execute(f"SELECT {', '.join(columns)} FROM accounts ORDER BY rowid")
        return [dict(zip(columns, row, strict=True)) for row in cursor]
    finally:
        conn.close()
