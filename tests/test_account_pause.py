"""Pausing and resuming an account, over loopback against the mock backend: through the
management API, the command line and a running proxy picking the change up; a paused
account gets no new request, turn or conversation, and a turn already on it finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import trio

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import final_text, open_ws, post_responses, request_body, response_id, ws_turn
from tests.quota_support import accounts, eventually
from trioproxy.harness.mock_upstream import MockConfig

BETA = {"openai-beta": "responses_websockets=2026-02-06"}


async def served_by(proxy: ProxyEnv) -> str:
    """One request; the account that served it (the mock's record of it)."""
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200, response.text
    assert final_text(events)
    return str((await proxy.mock.control.model_requests())[-1]["account"])


async def change(proxy: ProxyEnv, account_id: str, verb: str) -> tuple[int, dict[str, Any]]:
    answer = await proxy.client.post(f"{proxy.root}/api/accounts/{account_id}/{verb}")
    return answer.status_code, answer.json()


async def test_a_paused_account_gets_no_request_until_it_is_resumed(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    assert await served_by(proxy) == "acct-mock-1"

    status, body = await change(proxy, "acct-mock-1", "pause")
    assert status == 200 and body["changed"] is True
    assert body["account"]["state"] == "paused"
    assert body["account"]["state_reason"] == "paused by an operator"
    assert (await accounts(proxy))["acct-mock-1"]["state"] == "paused"
    for _ in range(3):
        assert await served_by(proxy) == "acct-mock-2"
    # (the request log is written in batches: the four requests show once written)
    logged: list[dict[str, Any]] = []

    async def written() -> bool:
        nonlocal logged
        answer = await proxy.client.get(f"{proxy.root}/api/requests", params={"limit": 10})
        logged = answer.json()["requests"]
        return len(logged) >= 4

    await eventually(written)
    excluded = logged[0]["decision"][-1]["excluded"]
    assert {"account": "acct-mock-1", "why": "paused"} in excluded

    # pausing again changes nothing; resuming puts it back first in line
    status, body = await change(proxy, "acct-mock-1", "pause")
    assert (status, body["changed"], body["account"]["state"]) == (200, False, "paused")
    status, body = await change(proxy, "acct-mock-1", "resume")
    assert (status, body["changed"], body["account"]["state"]) == (200, True, "active")
    assert body["account"]["state_reason"] is None
    assert await served_by(proxy) == "acct-mock-1"
    status, body = await change(proxy, "acct-mock-1", "resume")
    assert (status, body["changed"]) == (200, False)


async def test_the_last_account_paused_leaves_no_account_to_serve(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    assert (await change(proxy, "acct-mock-1", "pause"))[0] == 200
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "no_available_account"
    assert "acct-mock-1: paused" in error["message"]
    assert await mock.control.model_requests() == []


async def test_unknown_accounts_and_accounts_out_of_rotation_are_refused(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    for verb in ("pause", "resume"):
        status, body = await change(proxy, "acct-nobody", verb)
        assert status == 404
        assert body["error"]["code"] == "unknown_account"
        assert "acct-nobody" in body["error"]["message"]
    # an account whose tokens no longer work keeps saying so: it cannot be paused
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True, refresh_mode="invalidated")
    assert await served_by(proxy) == "acct-mock-2"
    assert (await accounts(proxy))["acct-mock-1"]["state"] == "reauth_required"
    status, body = await change(proxy, "acct-mock-1", "pause")
    assert status == 409 and body["error"]["code"] == "account_not_pausable"
    status, body = await change(proxy, "acct-mock-1", "resume")
    assert (status, body["changed"], body["account"]["state"]) == (200, False, "reauth_required")


async def test_only_an_operator_may_pause(make_mock: MockFactory, make_proxy: ProxyFactory) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, api_key=True)
    created = await proxy.client.post(
        f"{proxy.root}/api/keys", json={"name": "team", "policy": {"max_requests": 4}}
    )
    assert created.status_code == 201, created.text
    limited = {"authorization": f"Bearer {created.json()['secret']}"}
    for verb in ("pause", "resume"):
        refused = await proxy.client.post(
            f"{proxy.root}/api/accounts/acct-mock-1/{verb}", headers=limited
        )
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "operator_key_required"
    anonymous = await proxy.client.post(
        f"{proxy.root}/api/accounts/acct-mock-1/pause", headers={"authorization": ""}
    )
    assert anonymous.status_code == 401
    assert (await accounts(proxy))["acct-mock-1"]["state"] == "active"


async def test_a_turn_running_on_a_paused_account_finishes(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    # requests on acct-mock-1 are held upstream until the fault is removed
    await mock.control.add_fault("stall", account="acct-mock-1", seconds=60)
    answers: list[tuple[int, str]] = []

    async def one_request() -> None:
        response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        answers.append((response.status_code, final_text(events)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_request)

        async def held() -> bool:
            return any(f["fired"] for f in await mock.control.faults())

        await eventually(held)
        assert (await change(proxy, "acct-mock-1", "pause"))[0] == 200
        assert await served_by(proxy) == "acct-mock-2"  # while the first is still running
        await mock.control.clear_faults()  # upstream answers the held request
    assert answers and answers[0][0] == 200 and answers[0][1]
    served = [m["account"] for m in await mock.control.model_requests()]
    assert sorted(served) == ["acct-mock-1", "acct-mock-2"]


async def test_a_conversation_pinned_to_a_paused_account_moves_and_is_re_anchored(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    async with open_ws(proxy.codex_url, BETA) as ws:
        first = await ws_turn(ws, request_body("mock:exec echo one"))
        call = next(
            e["item"]
            for e in first
            if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"
        )
        assert (await change(proxy, "acct-mock-1", "pause"))[0] == 200
        follow_up = {
            "model": "gpt-5.5",
            "previous_response_id": response_id(first),
            "input": [
                {"type": "function_call_output", "call_id": call["call_id"], "output": "one"}
            ],
        }
        events = await ws_turn(ws, follow_up)
        assert final_text(events) == "Tool output received: one"
    messages = await mock.control.model_requests(transport="ws")
    # nothing more went to the paused account: the follow-up carried the whole conversation
    assert [(m["account"], m["status"]) for m in messages] == [
        ("acct-mock-1", 200),
        ("acct-mock-2", 200),
    ]
    assert "previous_response_id" not in messages[-1]["body"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from trioproxy.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("TRIOPROXY_")},
    )


async def test_the_commands_pause_and_resume_and_a_running_proxy_follows(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, routing_strategy="fill_first")
    data_dir = str(proxy.settings.data_dir)

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await trio.to_thread.run_sync(lambda: run_cli(*args, "--data-dir", data_dir))

    paused = await cli("accounts", "pause", "acct-mock-1")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "Paused account acct-mock-1."
    again = await cli("accounts", "pause", "acct-mock-1")
    assert again.stdout.strip() == "Account acct-mock-1 was already paused."
    listed = await cli("accounts", "list", "--json")
    states = {a["account_id"]: a["state"] for a in json.loads(listed.stdout)}
    assert states == {"acct-mock-1": "paused", "acct-mock-2": "active"}
    table = await cli("accounts", "list")
    assert "paused (paused by an operator)" in table.stdout

    async def proxy_sees(state: str) -> bool:
        return bool((await accounts(proxy))["acct-mock-1"]["state"] == state)

    await eventually(lambda: proxy_sees("paused"))
    assert await served_by(proxy) == "acct-mock-2"

    resumed = await cli("accounts", "resume", "acct-mock-1")
    assert resumed.returncode == 0 and resumed.stdout.strip() == "Resumed account acct-mock-1."
    await eventually(lambda: proxy_sees("active"))
    assert await served_by(proxy) == "acct-mock-1"

    unknown = await cli("accounts", "pause", "acct-nobody")
    assert unknown.returncode == 1
    assert "no such account: acct-nobody" in unknown.stderr
