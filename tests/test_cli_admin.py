"""``accounts`` and ``keys`` as users run them: real processes on a real SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trioproxy.accounts.authfile import AuthFileError, parse_auth_json
from trioproxy.harness.mock_upstream.accounts import (
    AUTH_CLAIM,
    PROFILE_CLAIM,
    make_account,
    unsigned_jwt,
)
from trioproxy.store import Store

ADMIN = [sys.executable, "-c", "from trioproxy.cli_admin import admin_main; admin_main()"]
NOW = time.time()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOPROXY_")}
    return {**env, **extra}


def run(data_dir: Path | None, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    flags = ["--data-dir", str(data_dir)] if data_dir is not None else []
    return subprocess.run(
        [*ADMIN, *args, *flags],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=60,
        check=False,
    )


def write_auth(path: Path, index: int, **kw: Any) -> dict[str, Any]:
    data = make_account(index, NOW, **kw).auth_json(NOW)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return data


def token_texts(*auth_files: dict[str, Any]) -> list[str]:
    texts = []
    for data in auth_files:
        for name in ("access_token", "refresh_token", "id_token"):
            token = data["tokens"][name]
            texts += [token, *(s for s in token.split(".") if len(s) > 16)]
    return texts


def assert_no_secrets(result: subprocess.CompletedProcess[str], secrets: list[str]) -> None:
    for text in secrets:
        assert text not in result.stdout and text not in result.stderr
    assert "Traceback" not in result.stderr


def open_store(data_dir: Path) -> Store:
    return Store.open(f"sqlite:///{data_dir / 'trioproxy.db'}", data_dir=data_dir)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_import_one_file_then_again_updates(tmp_path: Path, data_dir: Path) -> None:
    auth = write_auth(tmp_path / "codex" / "auth.json", 1)
    first = run(data_dir, "accounts", "import", str(tmp_path / "codex" / "auth.json"))
    assert first.returncode == 0, first.stderr
    assert first.stdout == "imported acct-mock-1 (user1@mock.example, plus)\n"
    again = run(data_dir, "accounts", "import", str(tmp_path / "codex" / "auth.json"))
    assert again.returncode == 0, again.stderr
    assert again.stdout == "updated acct-mock-1 (user1@mock.example, plus)\n"
    for result in (first, again):
        assert_no_secrets(result, token_texts(auth))
    with open_store(data_dir) as store:
        stored = store.get_account("acct-mock-1")
    assert stored is not None
    assert stored.access_token == auth["tokens"]["access_token"]
    assert stored.refresh_token == auth["tokens"]["refresh_token"]
    assert stored.id_token == auth["tokens"]["id_token"]


def test_import_a_folder_then_list(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "pool"
    auths = [
        write_auth(folder / "alice" / "auth.json", 1),
        write_auth(folder / "bob" / ".codex" / "auth.json", 2, plan="pro"),
        write_auth(folder / "carol.json", 3, plan="team", email="carol@mock.example"),
    ]
    (folder / "notes.json").write_text('{"not": "an auth file"}')
    (folder / "README.md").write_text("pool of accounts")
    result = run(data_dir, "accounts", "import", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "imported acct-mock-1 (user1@mock.example, plus)",
        "imported acct-mock-2 (user2@mock.example, pro)",
        "imported acct-mock-3 (carol@mock.example, team)",
    ]

    table = run(data_dir, "accounts", "list")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == [
        *["ID", "EMAIL", "PLAN", "STATE", "PRIMARY", "SECONDARY", "LEARNED", "TOKEN", "EXPIRES"]
    ]
    assert [row.split()[:4] for row in rows] == [
        ["acct-mock-1", "user1@mock.example", "plus", "active"],
        ["acct-mock-2", "user2@mock.example", "pro", "active"],
        ["acct-mock-3", "carol@mock.example", "team", "active"],
    ]
    assert all("UTC (in 9d)" in row for row in rows)  # mock tokens live ten days

    as_json = run(data_dir, "accounts", "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert [a["account_id"] for a in listed] == ["acct-mock-1", "acct-mock-2", "acct-mock-3"]
    assert listed[1]["plan"] == "pro" and listed[1]["state"] == "active"
    assert listed[0]["access_expires_at"] == int(NOW + 10 * 24 * 3600)
    assert not any("token" in key for a in listed for key in a if key != "access_expires_at")
    for output in (result, table, as_json):
        assert_no_secrets(output, token_texts(*auths))


def test_bad_files_are_reported_without_tracebacks_or_tokens(
    tmp_path: Path, data_dir: Path
) -> None:
    good = write_auth(tmp_path / "good.json", 1)
    (tmp_path / "garbage.json").write_text("this is not json")
    api_key = {"OPENAI_API_KEY": "sk-proj-SECRETSECRETSECRET", "tokens": None}
    (tmp_path / "apikey.json").write_text(json.dumps(api_key))
    broken = {"tokens": {"access_token": "not-a-jwt-SECRETSECRET", "refresh_token": "rt-SECRET"}}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    missing = {"tokens": {"access_token": good["tokens"]["access_token"]}}
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    result = run(
        data_dir,
        "accounts",
        "import",
        *(str(tmp_path / n) for n in ("garbage.json", "apikey.json", "good.json")),
        *(str(tmp_path / n) for n in ("broken.json", "missing.json")),
    )
    assert result.returncode == 1
    assert result.stdout == "imported acct-mock-1 (user1@mock.example, plus)\n"
    errors = result.stderr.splitlines()
    assert f"error: {tmp_path / 'garbage.json'}: not JSON" in errors[0]
    assert errors[1] == (
        f"error: {tmp_path / 'apikey.json'}: this auth.json holds an API key, not ChatGPT "
        "tokens (sign in with `codex login` and choose ChatGPT)"
    )
    assert errors[2].startswith(f"error: {tmp_path / 'broken.json'}: tokens.access_token is not")
    assert errors[3] == f"error: {tmp_path / 'missing.json'}: tokens.refresh_token is missing"
    assert errors[4].startswith("Error: 4 file(s) or folder(s) could not be imported")
    assert_no_secrets(result, [*token_texts(good), "SECRET", "sk-proj"])


def test_folder_without_auth_files_is_an_error(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run(data_dir, "accounts", "import", str(tmp_path / "empty"))
    assert result.returncode == 1
    assert "no auth.json with ChatGPT tokens found" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(tmp_path: Path, data_dir: Path) -> None:
    missing = run(data_dir, "accounts", "import", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_env = run(data_dir, "accounts", "list", TRIOPROXY_PORT="many")
    assert bad_env.returncode == 2 and "TRIOPROXY_PORT" in bad_env.stderr


def test_remove(tmp_path: Path, data_dir: Path) -> None:
    write_auth(tmp_path / "auth.json", 1)
    assert run(data_dir, "accounts", "import", str(tmp_path / "auth.json")).returncode == 0
    removed = run(data_dir, "accounts", "remove", "acct-mock-1")
    assert removed.returncode == 0 and removed.stdout == "removed acct-mock-1\n"
    unknown = run(data_dir, "accounts", "remove", "acct-mock-1")
    assert unknown.returncode == 1
    assert (
        unknown.stderr.strip()
        == "Error: no such account: acct-mock-1 (see: trioproxy accounts list)"
    )
    empty = run(data_dir, "accounts", "list")
    assert empty.returncode == 0
    assert empty.stdout == "no accounts yet; add some with: trioproxy accounts import PATH\n"


def test_settings_come_from_flags_env_and_config_file(tmp_path: Path) -> None:
    write_auth(tmp_path / "auth.json", 1)
    config = tmp_path / "trioproxy.toml"
    config.write_text(f'[trioproxy]\ndata_dir = "{tmp_path / "from-config"}"\n')
    by_config = run(
        None, "accounts", "import", str(tmp_path / "auth.json"), "--config", str(config)
    )
    assert by_config.returncode == 0, by_config.stderr
    by_env = run(
        None, "accounts", "list", "--json", TRIOPROXY_DATA_DIR=str(tmp_path / "from-config")
    )
    assert [a["account_id"] for a in json.loads(by_env.stdout)] == ["acct-mock-1"]
    # a flag beats the config file
    other = run(tmp_path / "other", "accounts", "list", "--json", "--config", str(config))
    assert json.loads(other.stdout) == []


def test_wrong_secret_key_is_reported_cleanly(tmp_path: Path, data_dir: Path) -> None:
    write_auth(tmp_path / "auth.json", 1)
    imported = run(
        data_dir, "accounts", "import", str(tmp_path / "auth.json"), TRIOPROXY_SECRET_KEY="one"
    )
    assert imported.returncode == 0, imported.stderr
    wrong = run(data_dir, "accounts", "list", "--secret-key", "two")
    assert wrong.returncode == 1
    assert "encrypted with a different secret key" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_keys_create_list_revoke(data_dir: Path) -> None:
    created = run(data_dir, "keys", "create", "ci runner")
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.strip()
    assert plaintext.startswith("trx_") and "\n" not in plaintext
    key_id = plaintext.split("_")[1]
    assert f"Authorization: Bearer {plaintext}" in created.stderr
    assert "shown only this once" in created.stderr

    table = run(data_dir, "keys", "list")
    assert table.returncode == 0
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["KEY", "ID", "NAME"]
    assert row.startswith(f"{key_id}  ci runner") and row.endswith("active")
    listed = json.loads(run(data_dir, "keys", "list", "--json").stdout)
    assert [(k["key_id"], k["name"], k["revoked_at"]) for k in listed] == [
        (key_id, "ci runner", None)
    ]
    for output in (table.stdout, json.dumps(listed)):
        assert plaintext.split("_", 2)[2] not in output

    with open_store(data_dir) as store:
        assert store.verify_api_key(plaintext) is not None

    revoked = run(data_dir, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and revoked.stdout == f"revoked key {key_id} (ci runner)\n"
    with open_store(data_dir) as store:
        assert store.verify_api_key(plaintext) is None
    after = run(data_dir, "keys", "list").stdout.splitlines()[1]
    assert " revoked 20" in after and after.endswith("UTC (now)")
    again = run(data_dir, "keys", "revoke", plaintext)  # the whole key works too
    assert again.returncode == 0 and "already revoked" in again.stdout
    assert plaintext not in again.stdout + again.stderr
    unknown = run(data_dir, "keys", "revoke", "deadbeef")
    assert unknown.returncode == 1 and "no such key: deadbeef" in unknown.stderr
    assert run(data_dir, "keys", "create", " ").returncode == 2


def test_auth_json_claims_and_fallbacks() -> None:
    """In-process: where each field comes from when auth.json leaves it out."""
    access = unsigned_jwt(
        {
            "exp": 2_000_000_000,
            "iat": 1_600_000_000,
            AUTH_CLAIM: {"chatgpt_account_id": "acct-x", "chatgpt_plan_type": "team"},
            PROFILE_CLAIM: {"email": "x@mock.example"},
        }
    )
    identity = unsigned_jwt({AUTH_CLAIM: {"user_id": "user-x"}})
    tokens = {"access_token": access, "refresh_token": "rt-x", "id_token": identity}
    record = parse_auth_json({"tokens": tokens}, now=NOW)
    assert (record.account_id, record.email, record.plan, record.user_id) == (
        "acct-x",
        "x@mock.example",
        "team",
        "user-x",
    )
    assert (record.access_expires_at, record.last_refresh) == (2_000_000_000, 1_600_000_000)
    assert (record.state, record.created_at, record.updated_at) == ("active", NOW, NOW)
    naive = parse_auth_json({"tokens": tokens, "last_refresh": "2023-11-14T22:13:20"}, now=NOW)
    assert naive.last_refresh == 1_700_000_000  # naive times are UTC
    precise = parse_auth_json(
        {"tokens": tokens, "last_refresh": "2023-11-14T22:13:20.123456789Z"}, now=NOW
    )
    assert precise.last_refresh == pytest.approx(1_700_000_000.123456)
    no_id = {"access_token": unsigned_jwt({}), "refresh_token": "rt-x"}
    with pytest.raises(AuthFileError, match="no account id"):
        parse_auth_json({"tokens": no_id}, now=NOW)
    with pytest.raises(AuthFileError, match="not an object"):
        parse_auth_json({"tokens": ["a", "b"]}, now=NOW)
