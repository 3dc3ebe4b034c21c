"""``/api/keys`` of a live proxy on loopback in front of the mock backend: creating keys with
a policy, reading, changing, rotating, disabling, enabling and revoking them, each change in
force at once; and every refused change, which changes nothing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import MockEnv, ProxyEnv, start_proxy
from tests.helpers import request_body, wait_until

RESPONSES = "/backend-api/codex/responses"
Y2100 = 4102444800.0  # 2100-01-01T00:00:00Z

POLICY = {
    "models": ["gpt-5.5", "re:^o[0-9]$"],
    "max_reasoning_effort": "medium",
    "budgets": [
        {"window": "5h", "tokens": 2000000, "requests": 500},
        "monthly:calendar:cost_usd=50",
    ],
    "max_sessions": 2,
    "max_requests": 3,
    "accounts": ["acct-mock-2", "acct-mock-1"],
}
STORED_POLICY = {  # POLICY as stored and shown: resets filled in, specs read, ids sorted
    "models": ["gpt-5.5", "re:^o[0-9]$"],
    "max_reasoning_effort": "medium",
    "budgets": [
        {"window": "5h", "reset": "rolling", "requests": 500, "tokens": 2000000},
        {"window": "monthly", "reset": "calendar", "cost_usd": 50.0},
    ],
    "max_sessions": 2,
    "max_requests": 3,
    "accounts": ["acct-mock-1", "acct-mock-2"],
}


@pytest.fixture
async def keyed(nursery: trio.Nursery, mock: MockEnv, tmp_path: Path) -> AsyncIterator[ProxyEnv]:
    """A proxy whose client sends the key ``tests`` (the operator's)."""
    env = await start_proxy(nursery, mock, tmp_path, api_key=True, usage_flush_interval=0.1)
    yield env
    await env.client.aclose()


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def call(env: ProxyEnv, method: str, path: str, **kw: Any) -> httpx.Response:
    return await env.client.request(method, f"{env.root}/api/keys{path}", **kw)


async def create(env: ProxyEnv, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    answer = await call(env, "POST", "", json=body)
    assert answer.status_code == 201, answer.text
    data = answer.json()
    assert set(data) == {"key", "secret"}
    return data["key"], data["secret"]


MOVING = ("window_start", "window_end", "resets_at")


def stable(view: dict[str, Any]) -> dict[str, Any]:
    """A view without what moves by itself: its last use, a rolling window's times."""
    kept = {name: value for name, value in view.items() if name != "last_used_at"}
    kept["budgets"] = [
        {name: value for name, value in budget.items() if name not in MOVING}
        for budget in view["budgets"]
    ]
    return kept


async def listing(env: ProxyEnv) -> list[dict[str, Any]]:
    answer = await call(env, "GET", "")
    assert answer.status_code == 200, answer.text
    return [stable(view) for view in answer.json()["keys"]]


async def models_status(env: ProxyEnv, secret: str) -> tuple[int, str | None]:
    answer = await env.client.get(f"{env.root}/v1/models", headers=auth(secret))
    code = None if answer.status_code == 200 else answer.json()["error"]["code"]
    return answer.status_code, code


def assert_error(answer: httpx.Response, status: int, code: str, param: str | None) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == "invalid_request_error"


async def test_create_with_a_policy_then_read_and_use_the_key(keyed: ProxyEnv) -> None:
    before = time.time()
    view, secret = await create(
        keyed, {"name": " team a ", "policy": POLICY, "expires_at": "2100-01-01"}
    )
    key_id = view["key_id"]
    assert secret.startswith(f"trx_{key_id}_") and len(secret) == 4 + 9 + 43
    assert before <= view["created_at"] <= time.time()
    assert {name: view[name] for name in view if name not in ("created_at", "budgets")} == {
        "key_id": key_id,
        "name": "team a",
        "status": "active",
        "last_used_at": None,
        "revoked_at": None,
        "disabled_at": None,
        "expires_at": Y2100,
        "rotated_at": None,
        "policy": STORED_POLICY,
        "in_flight": {"requests": 0, "sessions": 0},
    }
    five_hours, monthly = view["budgets"]
    assert {k: five_hours[k] for k in ("window", "reset", "tokens", "requests")} == {
        "window": "5h",
        "reset": "rolling",
        "tokens": 2000000,
        "requests": 500,
    }
    assert five_hours["used"]["requests"] == 0 and five_hours["used_percent"] == 0
    assert five_hours["window_end"] - five_hours["window_start"] == 5 * 3600
    assert monthly["cost_usd"] == 50.0 and monthly["exceeded"] is None

    # the secret works at once (the proxy's store now has two keys)
    assert await models_status(keyed, secret) == (200, None)
    assert await models_status(keyed, secret[:-3] + "xyz") == (401, "invalid_api_key")
    got = await call(keyed, "GET", f"/{key_id}")
    assert got.status_code == 200 and stable(got.json()) == stable(view)
    names = [(v["name"], v["status"]) for v in await listing(keyed)]
    assert names == [("tests", "active"), ("team a", "active")]
    # the secret is in the answer of create only
    assert secret.split("_", 2)[2] not in got.text + (await call(keyed, "GET", "")).text


async def test_policy_changes_are_in_force_at_once(keyed: ProxyEnv) -> None:
    view, secret = await create(keyed, {"name": "narrow", "policy": {"models": ["gpt-5.5"]}})
    key_id = view["key_id"]
    url = keyed.codex_url
    answer = await keyed.client.post(url, json=request_body(), headers=auth(secret))
    assert answer.status_code == 200, answer.text
    # the proxy charges a request when it has ended, just after the client read its answer
    with trio.fail_after(10):
        while True:
            usage = await keyed.client.get(
                f"{keyed.root}/api/usage", params={"key": key_id, "bucket": "total"}
            )
            if usage.json()["totals"].get("requests") == 1:
                break
            await trio.sleep(0.05)

    # a new budget starts from what the key spent in its window
    changed = await call(
        keyed, "PATCH", f"/{key_id}", json={"policy": {"budgets": ["daily:requests=10"]}}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["policy"] == {
        "models": ["gpt-5.5"],
        "budgets": [{"window": "daily", "reset": "calendar", "requests": 10}],
    }
    (budget,) = changed.json()["budgets"]
    assert budget["used"]["requests"] == 1 and budget["used_percent"] == 10.0

    changed = await call(
        keyed, "PATCH", f"/{key_id}", json={"policy": {"models": ["o3"], "max_requests": 1}}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["policy"] == {
        "models": ["o3"],
        "budgets": [{"window": "daily", "reset": "calendar", "requests": 10}],
        "max_requests": 1,
    }
    answer = await keyed.client.post(url, json=request_body(), headers=auth(secret))
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "model_not_allowed"
    assert answer.json()["error"]["allowed"] == ["o3"]

    # the budget counts what the key spends; a request held upstream is in flight
    answer = await keyed.client.post(url, json=request_body(model="o3"), headers=auth(secret))
    assert answer.status_code == 200
    (budget,) = (await call(keyed, "GET", f"/{key_id}")).json()["budgets"]
    assert budget["used"]["requests"] == 2 and budget["used_percent"] == 20.0
    held_answers: list[httpx.Response] = []

    async def held_request() -> None:
        held_answers.append(
            await keyed.client.post(url, json=request_body(model="o3"), headers=auth(secret))
        )

    await keyed.mock.control.add_fault("stall", seconds=30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held_request)
        await wait_until(lambda: len(keyed.mock.backend.recorder.query(path=RESPONSES)) == 3)
        held = (await call(keyed, "GET", f"/{key_id}")).json()
        assert held["in_flight"] == {"requests": 1, "sessions": 0}
        await keyed.mock.control.clear_faults()
    assert [answer.status_code for answer in held_answers] == [200]
    after = (await call(keyed, "GET", f"/{key_id}")).json()
    assert after["in_flight"] == {"requests": 0, "sessions": 0}
    assert after["budgets"][0]["used"]["requests"] == 3


async def test_patch_merges_field_by_field(keyed: ProxyEnv) -> None:
    view, _ = await create(keyed, {"name": "merge", "policy": POLICY, "expires_at": Y2100})
    path = f"/{view['key_id']}"
    answer = await call(
        keyed,
        "PATCH",
        path,
        json={
            "name": "merged",
            "policy": {"max_sessions": None, "models": ["gpt-5*"], "budgets": ["5h:tokens=1M"]},
            "expires_at": None,
        },
    )
    assert answer.status_code == 200, answer.text
    changed = answer.json()
    assert (changed["name"], changed["expires_at"], changed["status"]) == ("merged", None, "active")
    assert changed["policy"] == {
        "models": ["gpt-5*"],
        "max_reasoning_effort": "medium",
        "budgets": [{"window": "5h", "reset": "rolling", "tokens": 1000000}],
        "max_requests": 3,
        "accounts": ["acct-mock-1", "acct-mock-2"],
    }
    assert [b["tokens"] for b in changed["budgets"]] == [1000000]
    # an empty change changes nothing
    same = await call(keyed, "PATCH", path, json={})
    assert same.status_code == 200 and stable(same.json()) == stable(changed)
    # disabling through PATCH, and back
    disabled = (await call(keyed, "PATCH", path, json={"disabled": True})).json()
    assert disabled["status"] == "disabled" and disabled["disabled_at"] is not None
    enabled = (await call(keyed, "PATCH", path, json={"disabled": False})).json()
    assert (enabled["status"], enabled["disabled_at"]) == ("active", None)
    # an expiry in the past expires the key; a relative one is counted from now
    expired = (await call(keyed, "PATCH", path, json={"expires_at": 1000})).json()
    assert (expired["status"], expired["expires_at"]) == ("expired", 1000.0)
    later = (await call(keyed, "PATCH", path, json={"expires_at": "30d"})).json()
    assert later["status"] == "active"
    assert abs(later["expires_at"] - (time.time() + 30 * 86400)) < 60
    # "policy": null removes the whole policy
    cleared = (await call(keyed, "PATCH", path, json={"policy": None})).json()
    assert (cleared["policy"], cleared["budgets"]) == ({}, [])


async def test_rotate_disable_enable_revoke(keyed: ProxyEnv) -> None:
    view, old = await create(keyed, {"name": "life", "policy": {"budgets": ["daily:requests=5"]}})
    key_id = view["key_id"]
    assert await models_status(keyed, old) == (200, None)
    answer = await keyed.client.post(keyed.codex_url, json=request_body(), headers=auth(old))
    assert answer.status_code == 200

    rotated = await call(keyed, "POST", f"/{key_id}/rotate")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    key = rotated.json()["key"]
    assert new.startswith(f"trx_{key_id}_") and new != old
    assert key["key_id"] == key_id and key["rotated_at"] is not None
    assert key["budgets"][0]["used"]["requests"] == 1  # the budget stays with the key
    assert await models_status(keyed, old) == (401, "invalid_api_key")
    assert await models_status(keyed, new) == (200, None)

    disabled = await call(keyed, "POST", f"/{key_id}/disable")
    assert disabled.status_code == 200 and disabled.json()["status"] == "disabled"
    assert await models_status(keyed, new) == (403, "api_key_disabled")
    again = await call(keyed, "POST", f"/{key_id}/disable")  # keeps the first time
    assert again.json()["disabled_at"] == disabled.json()["disabled_at"]
    enabled = await call(keyed, "POST", f"/{key_id}/enable")
    assert enabled.status_code == 200 and enabled.json()["status"] == "active"
    assert await models_status(keyed, new) == (200, None)

    revoked = await call(keyed, "DELETE", f"/{key_id}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert await models_status(keyed, new) == (401, "api_key_revoked")
    again = await call(keyed, "DELETE", f"/{key_id}")
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]

    # revocation is final: every change is refused and changes nothing
    before = await listing(keyed)
    for method, path, body in (
        ("PATCH", "", {"name": "back"}),
        ("PATCH", "", {"disabled": False}),
        ("POST", "/rotate", None),
        ("POST", "/disable", None),
        ("POST", "/enable", None),
    ):
        answer = await call(keyed, method, f"/{key_id}{path}", json=body)
        assert_error(answer, 409, "api_key_revoked", None)
    assert await listing(keyed) == before
    assert await models_status(keyed, new) == (401, "api_key_revoked")


async def test_the_first_key_is_made_from_loopback_then_keys_are_required(
    proxy: ProxyEnv,
) -> None:
    assert (await call(proxy, "GET", "")).json() == {"keys": []}
    view, secret = await create(proxy, {"name": "first"})
    assert view["policy"] == {} and view["budgets"] == []
    answer = await call(proxy, "GET", "")
    assert_error(answer, 401, "missing_api_key", None)
    answer = await proxy.client.get(f"{proxy.root}/api/keys", headers=auth(secret))
    assert [v["name"] for v in answer.json()["keys"]] == ["first"]


async def test_refused_creations_change_nothing(keyed: ProxyEnv) -> None:
    before = await listing(keyed)
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [
        ({}, 400, "invalid_name", "name"),
        ({"name": "   "}, 400, "invalid_name", "name"),
        ({"name": 7}, 400, "invalid_name", "name"),
        ({"name": "x", "colour": "red"}, 400, "unknown_parameter", "colour"),
        (
            {"name": "x", "policy": {"budgets": [{"window": "daily", "tokens": -1}]}},
            400,
            "invalid_policy",
            "budgets[0].tokens",
        ),
        (
            {"name": "x", "policy": {"budgets": [{"window": "hourly", "tokens": 5}]}},
            400,
            "invalid_policy",
            "budgets[0].window",
        ),
        (
            {"name": "x", "policy": {"budgets": ["5h:tokens=1", "6h:tokens=5"]}},
            400,
            "invalid_policy",
            "budgets[1]",
        ),
        (
            {"name": "x", "policy": {"models": ["gpt-5", "re:("]}},
            400,
            "invalid_policy",
            "models[1]",
        ),
        ({"name": "x", "policy": {"colour": "red"}}, 400, "invalid_policy", "colour"),
        ({"name": "x", "policy": ["gpt-5"]}, 400, "invalid_policy", "policy"),
        (
            {"name": "x", "policy": {"max_reasoning_effort": "ultra"}},
            400,
            "invalid_policy",
            "max_reasoning_effort",
        ),
        (
            {"name": "x", "policy": {"accounts": ["acct-mock-1", "ghost"]}},
            400,
            "unknown_account",
            "policy.accounts",
        ),
        ({"name": "x", "expires_at": "soon"}, 400, "invalid_expires_at", "expires_at"),
        ({"name": "x", "expires_at": True}, 400, "invalid_expires_at", "expires_at"),
        ({"name": "x", "expires_at": 1000}, 400, "invalid_expires_at", "expires_at"),
        ({"name": "x", "expires_at": "2001-01-01"}, 400, "invalid_expires_at", "expires_at"),
    ]
    for body, status, code, param in cases:
        assert_error(await call(keyed, "POST", "", json=body), status, code, param)
    unknown = await call(keyed, "POST", "", json={"name": "x", "policy": {"accounts": ["ghost"]}})
    assert "ghost" in unknown.json()["error"]["message"]
    answer = await call(keyed, "POST", "", content=b'{"name": ', headers=JSON)
    assert_error(answer, 400, "invalid_json", None)
    answer = await call(keyed, "POST", "", content=b'["x"]', headers=JSON)
    assert_error(answer, 400, "invalid_json", None)
    answer = await call(keyed, "POST", "", content=b'{"name": "x"}', headers=TEXT)
    assert_error(answer, 415, "unsupported_media_type", None)
    assert await listing(keyed) == before


JSON = {"content-type": "application/json"}
TEXT = {"content-type": "text/plain"}


async def test_refused_changes_change_nothing(keyed: ProxyEnv) -> None:
    view, secret = await create(keyed, {"name": "kept", "policy": POLICY, "expires_at": Y2100})
    path = f"/{view['key_id']}"
    before = await listing(keyed)
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [
        ({"name": ""}, 400, "invalid_name", "name"),
        ({"name": None}, 400, "invalid_name", "name"),
        ({"secret": "x"}, 400, "unknown_parameter", "secret"),
        ({"policy": {"max_sessions": 0}}, 400, "invalid_policy", "max_sessions"),
        ({"policy": {"budgets": [{"window": "weekly"}]}}, 400, "invalid_policy", "budgets[0]"),
        ({"policy": {"models": ["re:[a-"]}}, 400, "invalid_policy", "models[0]"),
        ({"policy": {"max_request": 1}}, 400, "invalid_policy", "max_request"),
        ({"policy": "all"}, 400, "invalid_policy", "policy"),
        ({"policy": {"accounts": ["ghost"]}}, 400, "unknown_account", "policy.accounts"),
        ({"expires_at": "tomorrowish"}, 400, "invalid_expires_at", "expires_at"),
        ({"expires_at": -5}, 400, "invalid_expires_at", "expires_at"),
        ({"disabled": "yes"}, 400, "invalid_parameter", "disabled"),
        # a valid field does not go through with an invalid one
        (
            {"name": "renamed", "policy": {"max_requests": -1}},
            400,
            "invalid_policy",
            "max_requests",
        ),
    ]
    for body, status, code, param in cases:
        assert_error(await call(keyed, "PATCH", path, json=body), status, code, param)
    answer = await call(keyed, "PATCH", path, content=b"{", headers=JSON)
    assert_error(answer, 400, "invalid_json", None)
    answer = await call(keyed, "PATCH", path, content=b'{"name": "x"}', headers=TEXT)
    assert_error(answer, 415, "unsupported_media_type", None)
    unknown: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "", None),
        ("PATCH", "", {"name": "x"}),
        ("POST", "/rotate", None),
        ("POST", "/disable", None),
        ("POST", "/enable", None),
        ("DELETE", "", None),
    ]
    for method, suffix, payload in unknown:
        answer = await call(keyed, method, f"/0000dead{suffix}", json=payload)
        assert_error(answer, 404, "unknown_key", None)
    assert await listing(keyed) == before
    assert await models_status(keyed, secret) == (200, None)
