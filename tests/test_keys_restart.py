"""Budget counting survives a process killed outright, less at most one flush interval: a
real ``trioproxy serve`` process, killed with SIGKILL in the middle of a stream of requests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import trio

from tests.conftest import MockFactory
from tests.helpers import request_body
from tests.test_cli import LogReader
from trioproxy.accounts.authfile import parse_auth_json
from trioproxy.config import load_settings
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.store import Store

RESPONSES = "/backend-api/codex/responses"
FLUSH = 1.0  # the default usage_flush_interval


async def test_a_killed_process_loses_at_most_one_flush_of_counting(
    make_mock: MockFactory, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    data = tmp_path / "data"
    url_of_store = load_settings(
        environ={}, overrides={"data_dir": str(data)}
    ).resolved_database_url
    with Store.open(url_of_store, data_dir=data) as store:
        for account in mock.account_ids():
            auth = await mock.control.auth_json(account)
            store.upsert_account(parse_auth_json(auth, now=mock.backend.clock.now()))
        key, secret = store.create_api_key(
            "killed", policy={"budgets": [{"window": "daily", "requests": 1_000_000}]}
        )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioproxy.cli", "serve", "--port", "0", "--data-dir", str(data),
         "--log-format", "json", "--upstream-base-url", mock.base_url,
         "--auth-base-url", mock.root, "--usage-poll-interval", "0",
         "--usage-flush-interval", str(FLUSH)],
        stderr=-1,
    )  # fmt: skip
    completed: list[float] = []
    try:
        log = LogReader(process)
        url = (await log.expect("serving"))["url"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, log)  # the process's log never fills its pipe
            async with httpx.AsyncClient(headers={"authorization": f"Bearer {secret}"}) as client:
                with trio.move_on_after(3.3):  # a bounded stream of requests, one at a time
                    while len(completed) < 2000:
                        answer = await client.post(f"{url}{RESPONSES}", json=request_body())
                        assert answer.status_code == 200, answer.text
                        completed.append(trio.current_time())
            killed_at = trio.current_time()
            process.kill()
            await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()
    with Store.open(url_of_store, data_dir=data) as store:
        stored = sum(r["requests"] for r in store.key_usage_by_hour(key.key_id, 0.0))
        counters = json.loads(store.load_key_counters("default")[key.key_id])
    lost = len(completed) - stored
    # what a kill may lose: the requests finished since the last write (one interval, plus
    # the write in progress)
    recent = sum(1 for t in completed if t > killed_at - FLUSH - 0.5)
    print(f"requests completed {len(completed)}, stored {stored}, lost {lost}, "
          f"completed in the last {FLUSH + 0.5:.1f} s {recent}")  # fmt: skip
    assert len(completed) > 20 and stored > 0
    assert 0 <= lost <= recent
    # the budget counters were written in the same transaction as the usage
    assert counters["daily/calendar"]["total"][0] == stored


async def _drain(log: LogReader) -> None:
    while await log.stream.receive_some(65536):
        pass
