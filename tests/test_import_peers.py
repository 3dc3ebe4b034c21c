"""``trioproxy accounts import PATH`` on other proxies' stores, built here to their formats
(docs/accounts.md, "Moving from another proxy"): a CLIProxyAPI auth directory and a codex-lb
data directory (SQLite database with its ``accounts`` table, tokens Fernet-encrypted with the
key in ``encryption.key``). The command runs as a process on a real store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests.conftest import MockFactory, ProxyFactory
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.accounts import make_account
from trioproxy.store import Store

ADMIN = [sys.executable, "-c", "from trioproxy.cli_admin import admin_main; admin_main()"]
NOW = time.time()
HOUR = 3600.0


def run(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOPROXY_")}
    return subprocess.run(
        [*ADMIN, *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def tokens_of(index: int, **kw: Any) -> dict[str, str]:
    tokens: dict[str, str] = make_account(index, NOW, **kw).auth_json(NOW)["tokens"]
    return tokens


def secrets_of(*token_sets: dict[str, str]) -> list[str]:
    texts = []
    for tokens in token_sets:
        for name in ("access_token", "refresh_token", "id_token"):
            texts += [tokens[name], *(s for s in tokens[name].split(".") if len(s) > 16)]
    return texts


def assert_clean(result: subprocess.CompletedProcess[str], secrets: list[str]) -> None:
    for text in secrets:
        assert text not in result.stdout and text not in result.stderr
    assert "Traceback" not in result.stderr


def open_store(data_dir: Path) -> Store:
    return Store.open(f"sqlite:///{data_dir / 'trioproxy.db'}", data_dir=data_dir)


def rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).astimezone().isoformat(timespec="seconds")


# -- CLIProxyAPI ---------------------------------------------------------------------------
def cliproxy_file(folder: Path, tokens: dict[str, str], email: str, **extra: Any) -> None:
    """A credential as CLIProxyAPI's ``CodexTokenStorage.SaveTokenToFile`` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "id_token": tokens["id_token"],
        "access_token": tokens["access_token"],
        "refresh_token": tokens["refresh_token"],
        "account_id": tokens["account_id"],
        "last_refresh": rfc3339(NOW - HOUR),
        "email": email,
        "type": "codex",
        "expired": rfc3339(NOW + 9 * 24 * HOUR),
        **extra,
    }
    (folder / f"codex-{email}.json").write_text(json.dumps(data))


def test_cliproxyapi_auth_dir(tmp_path: Path) -> None:
    auths = tmp_path / "cli-proxy-api"
    one, two, off = tokens_of(1), tokens_of(2, plan="pro"), tokens_of(3)
    cliproxy_file(auths, one, "user1@mock.example")
    cliproxy_file(auths, {**two, "account_id": ""}, "user2@mock.example")  # id from the claim
    cliproxy_file(auths, off, "user3@mock.example", disabled=True)
    claude = {"type": "claude", "access_token": "sk-ant-SECRETSECRET", "email": "c@x.example"}
    (auths / "claude-c@x.example.json").write_text(json.dumps(claude))
    (auths / "config-notes.json").write_text('{"note": "not a credential"}')
    data_dir = tmp_path / "data"

    result = run(data_dir, "accounts", "import", str(auths))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "skipped CLIProxyAPI claude-c@x.example.json: a CLIProxyAPI claude credential, not Codex",
        "imported acct-mock-1 (user1@mock.example, plus) from CLIProxyAPI"
        " codex-user1@mock.example.json",
        "imported acct-mock-2 (user2@mock.example, pro) from CLIProxyAPI"
        " codex-user2@mock.example.json",
        "skipped CLIProxyAPI codex-user3@mock.example.json: disabled in CLIProxyAPI",
    ]
    assert_clean(result, [*secrets_of(one, two, off), "SECRET"])
    with open_store(data_dir) as store:
        stored = {r.account_id: r for r in store.list_accounts()}
    assert sorted(stored) == ["acct-mock-1", "acct-mock-2"]
    assert stored["acct-mock-1"].refresh_token == one["refresh_token"]
    assert stored["acct-mock-1"].id_token == one["id_token"]
    assert stored["acct-mock-1"].last_refresh == pytest.approx(NOW - HOUR, abs=1)
    assert stored["acct-mock-2"].access_token == two["access_token"]

    # one credential file given directly; the same tokens again update in place
    again = run(data_dir, "accounts", "import", str(auths / "codex-user1@mock.example.json"))
    assert again.returncode == 0, again.stderr
    assert again.stdout == (
        "updated acct-mock-1 (user1@mock.example, plus) from CLIProxyAPI"
        " codex-user1@mock.example.json\n"
    )


# -- codex-lb ------------------------------------------------------------------------------
#: codex-lb's ``accounts`` table (app/db/models.py, ``Account``; the columns this import
#: reads and the ones a real row has besides, NOT NULL ones included)
CODEX_LB_ACCOUNTS = """
CREATE TABLE accounts (
    id VARCHAR NOT NULL PRIMARY KEY,
    chatgpt_account_id VARCHAR,
    chatgpt_user_id VARCHAR,
    codex_installation_id VARCHAR(36) NOT NULL,
    email VARCHAR NOT NULL,
    alias VARCHAR,
    plan_type VARCHAR NOT NULL,
    routing_policy VARCHAR DEFAULT 'normal' NOT NULL,
    access_token_encrypted BLOB NOT NULL,
    refresh_token_encrypted BLOB NOT NULL,
    id_token_encrypted BLOB NOT NULL,
    last_refresh DATETIME NOT NULL,
    created_at DATETIME DEFAULT (CURRENT_TIMESTAMP) NOT NULL,
    status VARCHAR(15) NOT NULL,
    deactivation_reason TEXT,
    reset_at INTEGER,
    blocked_at INTEGER,
    delete_requested_at DATETIME
)
"""


def codex_lb_dir(folder: Path, accounts: list[dict[str, Any]], key: bytes | None = None) -> bytes:
    """A codex-lb data directory: ``store.db`` and ``encryption.key`` (a Fernet key, as
    ``app/core/crypto.py`` makes it). Returns the key."""
    folder.mkdir(parents=True, exist_ok=True)
    key = key or Fernet.generate_key()
    (folder / "encryption.key").write_bytes(key)
    fernet = Fernet(key)
    conn = sqlite3.connect(folder / "store.db")
    with conn:
        conn.execute(CODEX_LB_ACCOUNTS)
        for index, account in enumerate(accounts):
            tokens = account["tokens"]
            conn.execute(
                "INSERT INTO accounts (id, chatgpt_account_id, codex_installation_id, email,"
                " plan_type, access_token_encrypted, refresh_token_encrypted,"
                " id_token_encrypted, last_refresh, status, delete_requested_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    account["id"],
                    account.get("chatgpt_account_id", tokens["account_id"]),
                    f"00000000-0000-4000-8000-{index:012d}",
                    account["email"],
                    "plus",
                    *(
                        fernet.encrypt(tokens[n].encode())
                        for n in ("access_token", "refresh_token")
                    ),
                    fernet.encrypt(tokens["id_token"].encode()),
                    # SQLAlchemy's DateTime on SQLite: a naive UTC time as text
                    datetime.fromtimestamp(account["last_refresh"], UTC)
                    .replace(tzinfo=None)
                    .isoformat(sep=" "),
                    account.get("status", "active"),
                    account.get("delete_requested_at"),
                ),
            )
    conn.close()
    return key


def test_codex_lb_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    one, two, three, four, five = (tokens_of(i) for i in range(1, 6))
    # acct-mock-1 is already here with newer tokens than codex-lb's; acct-mock-2 with older
    for path, tokens, moment in (
        (tmp_path / "1.json", one, NOW),
        (tmp_path / "2.json", two, NOW - 9 * HOUR),
    ):
        moment_text = datetime.fromtimestamp(moment, UTC).isoformat()
        path.write_text(json.dumps({"tokens": tokens, "last_refresh": moment_text}))
        assert run(data_dir, "accounts", "import", str(path)).returncode == 0
    two_new = tokens_of(2)
    lb = tmp_path / "codex-lb"
    codex_lb_dir(
        lb,
        [
            {
                "id": "lb-1",
                "email": "user1@mock.example",
                "tokens": tokens_of(1),
                "last_refresh": NOW - 2 * HOUR,
            },
            {
                "id": "lb-2",
                "email": "user2@mock.example",
                "tokens": two_new,
                "last_refresh": NOW - HOUR,
            },
            {
                "id": "lb-3",
                "email": "user3@mock.example",
                "tokens": three,
                "last_refresh": NOW - HOUR,
                "chatgpt_account_id": None,
            },
            {
                "id": "lb-4",
                "email": "user4@mock.example",
                "tokens": four,
                "last_refresh": NOW,
                "status": "reauth_required",
            },
            {
                "id": "lb-5",
                "email": "user5@mock.example",
                "tokens": five,
                "last_refresh": NOW,
                "status": "deactivated",
            },
            {
                "id": "lb-6",
                "email": "user5@mock.example",
                "tokens": five,
                "last_refresh": NOW,
                "delete_requested_at": "2026-01-01 00:00:00",
            },
            {
                "id": "lb-7",
                "email": "user6@mock.example",
                "tokens": tokens_of(6),
                "last_refresh": NOW,
                "status": "rate_limited",
            },
        ],
    )
    result = run(data_dir, "accounts", "import", str(lb))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "skipped acct-mock-1 (user1@mock.example, plus) from codex-lb account lb-1: the stored"
        " tokens are newer (these are older and most likely spent)",
        "updated acct-mock-2 (user2@mock.example, plus) from codex-lb account lb-2",
        "imported acct-mock-3 (user3@mock.example, plus) from codex-lb account lb-3",
        "skipped codex-lb account lb-4: reauth_required in codex-lb: its tokens no longer work;"
        " sign in again with `trioproxy accounts login --device`",
        "skipped codex-lb account lb-5: deactivated in codex-lb",
        "skipped codex-lb account lb-6: being deleted in codex-lb",
        "imported acct-mock-6 (user6@mock.example, plus) from codex-lb account lb-7",
    ]
    key = (lb / "encryption.key").read_text()
    assert_clean(result, [*secrets_of(one, two, two_new, three, four, five), key])
    with open_store(data_dir) as store:
        stored = {r.account_id: r for r in store.list_accounts()}
    assert sorted(stored) == ["acct-mock-1", "acct-mock-2", "acct-mock-3", "acct-mock-6"]
    assert stored["acct-mock-1"].refresh_token == one["refresh_token"]  # kept: it was newer
    assert stored["acct-mock-2"].refresh_token == two_new["refresh_token"]
    assert stored["acct-mock-2"].last_refresh == pytest.approx(NOW - HOUR, abs=1)
    assert stored["acct-mock-3"].id_token == three["id_token"]


def test_codex_lb_wrong_or_missing_key(tmp_path: Path) -> None:
    lb = tmp_path / "codex-lb"
    one = tokens_of(1)
    codex_lb_dir(lb, [{"id": "lb-1", "email": "u@x", "tokens": one, "last_refresh": NOW}])
    (lb / "encryption.key").write_bytes(Fernet.generate_key())  # another store's key
    wrong = run(tmp_path / "data", "accounts", "import", str(lb))
    assert wrong.returncode == 1
    assert wrong.stdout == ""
    assert wrong.stderr.splitlines()[0] == (
        f"error: {lb / 'store.db'} (codex-lb account lb-1): its tokens cannot be decrypted"
        f" with {lb / 'encryption.key'} (another store's key?)"
    )
    assert_clean(wrong, secrets_of(one))
    (lb / "encryption.key").unlink()
    missing = run(tmp_path / "data", "accounts", "import", str(lb))
    assert missing.returncode == 1
    assert "codex-lb's key encryption.key cannot be read" in missing.stderr
    assert_clean(missing, secrets_of(one))


async def test_management_api_takes_a_cliproxyapi_credential(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, accounts=[])
    tokens = (await mock.control.auth_json("acct-mock-2"))["tokens"]
    credential = {**tokens, "type": "codex", "email": "user2@mock.example", "expired": ""}
    response = await proxy.client.post(f"{proxy.root}/api/accounts", json=[credential])
    assert response.status_code == 201, response.text
    assert response.json()["accounts"] == [
        {
            "account_id": "acct-mock-2",
            "email": "user2@mock.example",
            "plan": "plus",
            "created": True,
            "skipped": None,
        }
    ]
    listed = (await proxy.client.get(f"{proxy.root}/api/accounts")).json()["accounts"]
    assert [(a["account_id"], a["state"]) for a in listed] == [("acct-mock-2", "active")]
