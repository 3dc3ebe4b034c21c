"""``trioproxy admin create|list|remove|set-password`` on a real SQLite store (click's
runner): generated and given passwords, only hashes stored, refused names and passwords."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner, Result

from trioproxy.cli import main
from trioproxy.dashboard.passwords import verify_password
from trioproxy.store import Store
from trioproxy.store import admins as admin_store


def run(data_dir: Path, *args: str, stdin: str | None = None) -> Result:
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRIOPROXY_")}
    return CliRunner().invoke(
        main, ["admin", *args, "--data-dir", str(data_dir)], input=stdin, env=unset
    )


def stored_hash(data_dir: Path, name: str) -> str | None:
    with Store.open(f"sqlite:///{data_dir / 'trioproxy.db'}", data_dir=data_dir) as store:
        record = admin_store.get_admin(store, name)
    return None if record is None else record.password_hash


def test_create_prints_a_generated_password_once_and_stores_its_hash(tmp_path: Path) -> None:
    made = run(tmp_path, "create", "ops")
    assert made.exit_code == 0, made.output
    password = made.stdout.strip()
    assert len(password) >= 20 and "\n" not in password
    assert "shown only this once" in made.stderr
    stored = stored_hash(tmp_path, "ops")
    assert stored is not None and stored.startswith("scrypt$32768$8$1$")
    assert password not in stored and verify_password(password, stored)
    again = run(tmp_path, "create", "ops")
    assert again.exit_code == 1 and "exists already" in again.stderr


def test_a_password_from_stdin_and_set_password(tmp_path: Path) -> None:
    made = run(tmp_path, "create", "ops", "--password-stdin", stdin="a long password\n")
    assert made.exit_code == 0 and made.stdout == ""
    assert verify_password("a long password", stored_hash(tmp_path, "ops") or "")
    short = run(tmp_path, "set-password", "ops", "--password-stdin", stdin="short\n")
    assert short.exit_code == 2 and "at least 10 characters" in short.stderr
    changed = run(tmp_path, "set-password", "ops")
    assert changed.exit_code == 0
    assert verify_password(changed.stdout.strip(), stored_hash(tmp_path, "ops") or "")
    missing = run(tmp_path, "set-password", "nobody")
    assert missing.exit_code == 1 and "no admin named" in missing.stderr
    both = run(tmp_path, "set-password", "ops", "--password-stdin", "--prompt", stdin="x\n")
    assert both.exit_code == 2


def test_the_prompt_asks_twice(tmp_path: Path) -> None:
    made = run(tmp_path, "create", "ops", "--prompt", stdin="typed password\ntyped password\n")
    assert made.exit_code == 0, made.output
    assert "typed password" not in made.stdout
    assert verify_password("typed password", stored_hash(tmp_path, "ops") or "")


def test_list_and_remove(tmp_path: Path) -> None:
    assert "no admin yet" in run(tmp_path, "list").stdout
    assert run(tmp_path, "create", "ops").exit_code == 0
    assert run(tmp_path, "create", "b-team").exit_code == 0
    table = run(tmp_path, "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "CREATED", "PASSWORD", "SET", "LAST", "SIGN-IN"]
    assert [line.split()[0] for line in table[1:]] == ["b-team", "ops"]
    listed = json.loads(run(tmp_path, "list", "--json").stdout)
    assert [a["name"] for a in listed] == ["b-team", "ops"]
    assert all("hash" not in json.dumps(a) for a in listed)
    assert run(tmp_path, "remove", "ops").exit_code == 0
    assert run(tmp_path, "remove", "ops").exit_code == 1
    assert [a["name"] for a in json.loads(run(tmp_path, "list", "--json").stdout)] == ["b-team"]
    assert run(tmp_path, "create", "has space").exit_code == 2
