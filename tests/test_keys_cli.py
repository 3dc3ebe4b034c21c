"""``trioproxy keys ...`` with policies, on a real SQLite store: create (with budgets,
models, expiry), show, set, rotate, disable, enable, revoke, list; refused options store
nothing. Commands run in-process (click's runner); one runs as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from trioproxy.cli_admin import admin_main
from trioproxy.store import AccountRecord, Store

SNIPPET = """model_provider = "trioproxy"

[model_providers.trioproxy]
name = "trioproxy"
base_url = "http://127.0.0.1:{port}/backend-api/codex"
wire_api = "responses"
supports_websockets = true
env_key = "TRIOPROXY_API_KEY\""""
Y2100 = 4102444800.0  # 2100-01-01T00:00:00Z


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def run(data_dir: Path, *args: str) -> Result:
    """``trioproxy keys ARGS`` on the store in ``data_dir``, without TRIOPROXY_* settings
    from the environment."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRIOPROXY_")}
    return CliRunner().invoke(
        admin_main, ["keys", *args, "--data-dir", str(data_dir)], env=unset, catch_exceptions=False
    )


def open_store(data_dir: Path) -> Store:
    return Store.open(f"sqlite:///{data_dir / 'trioproxy.db'}", data_dir=data_dir)


def stored(data_dir: Path) -> list[dict[str, Any]]:
    with open_store(data_dir) as store:
        return [record.public_view() for record in store.list_api_keys()]


def add_account(data_dir: Path, account_id: str) -> None:
    with open_store(data_dir) as store:
        store.upsert_account(
            AccountRecord(
                account_id=account_id,
                email=f"{account_id}@example.com",
                plan="plus",
                user_id="user",
                access_token="access",
                refresh_token="refresh",
                last_refresh=time.time(),
                created_at=time.time(),
                updated_at=time.time(),
            )
        )


def create(data_dir: Path, *args: str) -> tuple[str, str]:
    """A key made by ``keys create``: (key id, secret)."""
    result = run(data_dir, "create", *args)
    assert result.exit_code == 0, result.stderr
    secret = result.stdout.strip()
    return secret.split("_")[1], secret


def test_create_with_budgets_models_and_expiry(data_dir: Path) -> None:
    add_account(data_dir, "acct-1")
    result = run(
        data_dir,
        "create",
        "team a",
        "--model",
        "gpt-5*",
        "--model",
        "re:^o[0-9]$",
        "--max-effort",
        "medium",
        "--budget",
        "5h:tokens=2000000,requests=500",
        "--budget",
        "monthly:calendar:cost_usd=50",
        "--budget",
        "daily:rolling:output_tokens=100k",
        "--max-sessions",
        "2",
        "--max-requests",
        "4",
        "--account",
        "acct-1",
        "--expires",
        "2100-01-01",
        "--port",
        "3456",
    )
    assert result.exit_code == 0, result.stderr
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n" and secret.startswith("trx_")
    key_id = secret.split("_")[1]
    policy = {
        "models": ["gpt-5*", "re:^o[0-9]$"],
        "max_reasoning_effort": "medium",
        "budgets": [
            {"window": "5h", "reset": "rolling", "requests": 500, "tokens": 2000000},
            {"window": "monthly", "reset": "calendar", "cost_usd": 50.0},
            {"window": "daily", "reset": "rolling", "output_tokens": 100000},
        ],
        "max_sessions": 2,
        "max_requests": 4,
        "accounts": ["acct-1"],
    }
    (view,) = stored(data_dir)
    assert (view["key_id"], view["name"], view["policy"], view["expires_at"]) == (
        key_id,
        "team a",
        policy,
        Y2100,
    )
    assert f"created key {key_id} (team a); it is shown only this once" in result.stderr
    assert (
        "Policy: models=gpt-5*,re:^o[0-9]$; effort<=medium; 5h:requests=500,tokens=2M; "
        "monthly:cost_usd=50; daily:rolling:output_tokens=100k; max_sessions=2; "
        "max_requests=4; accounts=acct-1\n" in result.stderr
    )
    assert "Expires: 2100-01-01 00:00 UTC (in " in result.stderr
    assert f"Clients send it as:  Authorization: Bearer {secret}\n" in result.stderr
    assert SNIPPET.format(port=3456) in result.stderr
    assert result.stderr.endswith(f"then run:  TRIOPROXY_API_KEY={secret} codex\n")
    with open_store(data_dir) as store:
        assert store.verify_api_key(secret) is not None


def test_show_text_and_json(data_dir: Path) -> None:
    key_id, secret = create(
        data_dir, "shown", "--budget", "weekly:requests=70", "--max-effort", "low"
    )
    result = run(data_dir, "show", key_id)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"key           {key_id}", "name          shown", "status        active"]
    assert lines[5:] == [
        "expires       never",
        "rotated       -",
        "disabled      -",
        "revoked       -",
        "models        any",
        "max effort    low",
        "budget        weekly:requests=70",
        "max sessions  no limit",
        "max requests  no limit",
        "accounts      any",
        "",
        "Budget usage is counted by the running proxy: "
        f"GET http://127.0.0.1:2455/api/keys/{key_id}",
    ]
    as_json = run(data_dir, "show", secret, "--json")  # the whole key names it too
    assert as_json.exit_code == 0
    view = json.loads(as_json.stdout)
    assert (view["key_id"], view["status"], view["policy"]) == (
        key_id,
        "active",
        {
            "max_reasoning_effort": "low",
            "budgets": [{"window": "weekly", "reset": "calendar", "requests": 70}],
        },
    )
    assert f"GET http://127.0.0.1:2455/api/keys/{key_id}" in as_json.stderr
    assert secret not in as_json.stdout + as_json.stderr


def test_set_merges_like_patch(data_dir: Path) -> None:
    key_id, _ = create(
        data_dir,
        "before",
        "--model",
        "gpt-5*",
        "--budget",
        "5h:tokens=1M",
        "--max-sessions",
        "3",
        "--expires",
        "30d",
    )
    result = run(
        data_dir,
        "set",
        key_id,
        "--name",
        "after",
        "--budget",
        "daily:requests=10",
        "--max-requests",
        "2",
        "--policy-json",
        '{"max_sessions": null}',
        "--no-expiry",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        f"updated key {key_id} (after): active; policy: models=gpt-5*; "
        "daily:requests=10; max_requests=2\n"
    )
    (view,) = stored(data_dir)
    assert (view["name"], view["expires_at"], view["policy"]) == (
        "after",
        None,
        {
            "models": ["gpt-5*"],
            "budgets": [{"window": "daily", "reset": "calendar", "requests": 10}],
            "max_requests": 2,
        },
    )
    cleared = run(data_dir, "set", key_id, "--clear-models", "--clear-budgets")
    assert cleared.exit_code == 0, cleared.stderr
    assert stored(data_dir)[0]["policy"] == {"max_requests": 2}
    expiring = run(data_dir, "set", key_id, "--expires", "12h")
    assert expiring.exit_code == 0
    assert abs(stored(data_dir)[0]["expires_at"] - (time.time() + 12 * 3600)) < 60
    assert "active, expires 20" in expiring.stdout


def test_rotate_disable_enable_revoke(data_dir: Path) -> None:
    key_id, old = create(data_dir, "life", "--budget", "daily:requests=5")
    rotated = run(data_dir, "rotate", key_id)
    assert rotated.exit_code == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert rotated.stdout == new + "\n" and new.startswith(f"trx_{key_id}_") and new != old
    assert f"rotated key {key_id} (life)" in rotated.stderr
    with open_store(data_dir) as store:
        assert store.verify_api_key(old) is None
        record = store.verify_api_key(new)
        assert record is not None and record.key_id == key_id
        assert record.rotated_at is not None
        assert record.policy == {
            "budgets": [{"window": "daily", "reset": "calendar", "requests": 5}]
        }

    disabled = run(data_dir, "disable", key_id)
    assert (disabled.exit_code, disabled.stdout) == (0, f"disabled key {key_id} (life)\n")
    with open_store(data_dir) as store:
        assert store.verify_api_key(new) is None
    first = stored(data_dir)[0]["disabled_at"]
    again = run(data_dir, "disable", key_id)
    assert (again.exit_code, again.stdout) == (0, f"key {key_id} (life) was already disabled\n")
    assert stored(data_dir)[0]["disabled_at"] == first
    table = run(data_dir, "list").stdout.splitlines()[1]
    assert " disabled 20" in table and table.endswith("UTC (now)")
    enabled = run(data_dir, "enable", key_id)
    assert (enabled.exit_code, enabled.stdout) == (0, f"enabled key {key_id} (life)\n")
    with open_store(data_dir) as store:
        assert store.verify_api_key(new) is not None

    revoked = run(data_dir, "revoke", key_id)
    assert (revoked.exit_code, revoked.stdout) == (0, f"revoked key {key_id} (life)\n")
    before = stored(data_dir)
    for args in (
        ("set", key_id, "--name", "back"),
        ("rotate", key_id),
        ("disable", key_id),
        ("enable", key_id),
    ):
        refused = run(data_dir, *args)
        assert refused.exit_code == 1, args
        assert f"key {key_id} (life) is revoked; revocation cannot be undone" in refused.stderr
        assert refused.stdout == ""
    assert stored(data_dir) == before
    assert run(data_dir, "show", key_id).stdout.splitlines()[2] == "status        revoked"


def test_list_shows_status_and_policy(data_dir: Path) -> None:
    plain, _ = create(data_dir, "plain")
    narrow, _ = create(
        data_dir, "narrow", "--model", "gpt-5.5", "--budget", "5h:tokens=2M", "--expires", "3d"
    )
    assert run(data_dir, "disable", plain).exit_code == 0
    table = run(data_dir, "list")
    assert table.exit_code == 0, table.stderr
    header, first, second = table.stdout.splitlines()
    assert header.split() == ["KEY", "ID", "NAME", "CREATED", "LAST", "USED", "POLICY", "STATUS"]
    assert first.startswith(f"{plain}  plain   20")
    assert " -  " in first and " disabled 20" in first
    assert second.startswith(f"{narrow}  narrow ")
    assert " models=gpt-5.5; 5h:tokens=2M  active, expires 20" in second
    assert second.endswith("UTC (in 2d)")
    listed = json.loads(run(data_dir, "list", "--json").stdout)
    assert [(k["key_id"], k["name"], k["status"], k["policy"]) for k in listed] == [
        (plain, "plain", "disabled", {}),
        (
            narrow,
            "narrow",
            "active",
            {
                "models": ["gpt-5.5"],
                "budgets": [{"window": "5h", "reset": "rolling", "tokens": 2000000}],
            },
        ),
    ]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ("--budget", "6h:tokens=5"),
            "Invalid value for --budget: '6h:tokens=5': the window is one",
        ),
        (("--budget", "daily:tokens=-1"), "tokens=-1 is not a positive number"),
        (("--budget", "daily:tokens"), "'tokens' is not LIMIT=VALUE"),
        (
            ("--budget", "5h:calendar:tokens=5"),
            "Invalid value for policy field 'budgets[0].reset'",
        ),
        (
            ("--budget", "daily:tokens=5", "--budget", "daily:requests=5"),
            "Two budgets share the window daily/calendar",
        ),
        (("--budget", "daily:tokens=0.5"), "policy field 'budgets[0].tokens'"),
        (("--model", "re:("), "policy field 'models[0]'"),
        (("--max-sessions", "0"), "policy field 'max_sessions'"),
        (("--max-effort", "ultra"), "'ultra' is not one of 'none', 'minimal'"),
        (("--policy-json", '{"colour": 1}'), "policy field 'colour'"),
        (("--policy-json", "{"), "Invalid value for --policy-json: --policy-json is not JSON"),
        (("--account", "ghost"), "Invalid value for --account: not in the store: ghost"),
        (("--expires", "soon"), "Invalid value for --expires: 'soon' is not a time"),
        (("--expires", "2001-01-01"), "Invalid value for --expires: '2001-01-01' is in the past"),
    ],
)
def test_bad_options_store_nothing(data_dir: Path, args: tuple[str, ...], says: str) -> None:
    result = run(data_dir, "create", "refused", *args)
    assert result.exit_code == 2, result.stdout
    assert says in result.stderr
    assert result.stdout == ""
    assert stored(data_dir) == []


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("--budget", "monthly:sliding:cost_usd=5"), 2, "the reset is rolling or calendar"),
        (("--max-requests", "-1"), 2, "policy field 'max_requests'"),
        (("--account", "ghost"), 2, "not in the store: ghost"),
        (("--expires", "later"), 2, "'later' is not a time"),
        (("--expires", "1d", "--no-expiry"), 2, "give --expires or --no-expiry, not both"),
        (("--name", " "), 2, "Invalid value for --name: must not be empty"),
        ((), 2, "nothing to change"),
    ],
)
def test_bad_changes_change_nothing(
    data_dir: Path, args: tuple[str, ...], code: int, says: str
) -> None:
    key_id, _ = create(data_dir, "kept", "--budget", "5h:tokens=1M", "--expires", "30d")
    before = stored(data_dir)
    result = run(data_dir, "set", key_id, *args)
    assert result.exit_code == code, result.stdout
    assert says in result.stderr
    assert stored(data_dir) == before


def test_unknown_keys_are_errors(data_dir: Path) -> None:
    create(data_dir, "someone")
    before = stored(data_dir)
    for args in (
        ("show", "0000dead"),
        ("set", "0000dead", "--name", "x"),
        ("rotate", "0000dead"),
        ("disable", "0000dead"),
        ("enable", "0000dead"),
        ("revoke", "0000dead"),
    ):
        result = run(data_dir, *args)
        assert result.exit_code == 1, args
        assert "no such key: 0000dead (see: trioproxy keys list)" in result.stderr
    assert stored(data_dir) == before


def test_create_as_a_real_process(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOPROXY_")}
    command = "from trioproxy.cli_admin import admin_main; admin_main()"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            command,
            *("keys", "create", "ci", "--budget", "daily:requests=9"),
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n"
    assert SNIPPET.format(port=2455) in result.stderr
    (view,) = stored(data_dir)
    assert view["policy"] == {"budgets": [{"window": "daily", "reset": "calendar", "requests": 9}]}
