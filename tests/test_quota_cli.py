"""``trioproxy accounts list`` shows what a running proxy learned of each account's quota."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.test_cli_admin import run, write_auth
from trioproxy.accounts import quota as q
from trioproxy.store import Store


def test_accounts_list_shows_windows_resets_state_and_the_source_and_age_of_each_figure(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    write_auth(tmp_path / "a" / "auth.json", 1)
    write_auth(tmp_path / "b" / "auth.json", 2)
    assert (
        run(data_dir, "accounts", "import", str(tmp_path / "a"), str(tmp_path / "b")).returncode
        == 0
    )
    now = time.time()
    polled = q.merge(
        q.QuotaState(),
        q.Observation(
            "poll",
            now - 125,
            q.WindowReading(30.0, now + 4 * 3600 + 600, 300),
            q.WindowReading(5.0, now + 3 * 86400 + 600, 10080),
        ),
    )
    locked = q.merge(
        q.merge(
            q.QuotaState(),
            q.Observation("headers", now - 30, q.WindowReading(97.0, now + 7200, 300)),
        ),
        q.from_usage_limit(now + 3 * 3600 + 600, now - 10),
    )
    with Store.open(f"sqlite:///{data_dir / 'trioproxy.db'}", data_dir=data_dir) as store:
        store.save_quota({"acct-mock-1": polled.to_json(), "acct-mock-2": locked.to_json()})

    table = run(data_dir, "accounts", "list")
    took = int(time.time() - now)  # the command's own start-up under load moves the ages
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()[1:]
    first, second = rows
    assert "30% (resets in 4h)" in first and "5% (resets in 3d)" in first
    assert "p:poll 2m ago, s:poll 2m ago" in first and " active " in first
    assert "exhausted (until " in second and "(in 3h))" in second
    assert "97% (resets in 1h)" in second
    ages = [f"p:headers {30 + d}s ago, 429 {10 + d}s ago" for d in range(took + 1)]
    assert any(age in second for age in ages), (second, took)

    listed = json.loads(run(data_dir, "accounts", "list", "--json").stdout)
    one, two = listed
    assert one["state"] == "active" and two["state"] == "exhausted"
    assert one["quota"]["primary"]["source"] == "poll"
    assert 124 <= one["quota"]["primary"]["age_seconds"] < 200
    assert one["quota"]["secondary"]["window_minutes"] == 10080
    assert two["quota"]["usage_limit_until"] == now + 3 * 3600 + 600
    assert two["quota"]["primary"]["used_percent"] == 97.0


def test_saved_quota_goes_with_a_removed_account(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with Store.open(f"sqlite:///{data_dir / 'trioproxy.db'}", data_dir=data_dir) as store:
        write_auth(tmp_path / "a" / "auth.json", 1)
        assert run(data_dir, "accounts", "import", str(tmp_path / "a")).returncode == 0
        locked = q.merge(q.QuotaState(), q.from_usage_limit(time.time() + 600, time.time()))
        store.save_quota({"acct-mock-1": locked.to_json()})
        assert set(store.load_quota()) == {"acct-mock-1"}
        assert store.remove_account("acct-mock-1")
        assert store.load_quota() == {}
