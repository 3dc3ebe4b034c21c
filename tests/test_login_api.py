"""Logins through the management API (``/api/logins``) against the mock's auth server, over
loopback sockets: device and browser flows, their failures, cancellation, concurrency and
re-login of an account that exists."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import trio

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.store import AccountRecord, Store

FINAL = ("succeeded", "failed", "expired", "cancelled")


async def fast_mock(make_mock: MockFactory, **config: Any) -> MockEnv:
    return await make_mock(MockConfig(accounts=3, device_interval=0, **config))


async def start(proxy: ProxyEnv, flow: str) -> dict[str, Any]:
    response = await proxy.client.post(f"{proxy.root}/api/logins", json={"flow": flow})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def state(proxy: ProxyEnv, login_id: str) -> dict[str, Any]:
    response = await proxy.client.get(f"{proxy.root}/api/logins/{login_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_final(proxy: ProxyEnv, login_id: str, seconds: float = 15) -> dict[str, Any]:
    with trio.fail_after(seconds):
        for _ in range(10_000):
            view = await state(proxy, login_id)
            if view["status"] in FINAL:
                return view
            await trio.sleep(0.05)
    raise AssertionError("unreachable")


async def polls(mock: MockEnv) -> list[dict[str, Any]]:
    found = await mock.control.requests(path="/api/accounts/deviceauth/token")
    return sorted(found, key=lambda record: record["id"])


async def wait_polls(mock: MockEnv, count: int, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        for _ in range(10_000):
            if len(await polls(mock)) >= count:
                return
            await trio.sleep(0.02)


async def test_device_login_pending_then_approved_adds_a_working_account(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await fast_mock(make_mock)
    proxy = await make_proxy(mock, accounts=[])
    login = await start(proxy, "device")
    assert login["status"] == "pending" and login["flow"] == "device"
    assert login["verification_url"] == f"{mock.root}/codex/device"
    assert len(login["user_code"]) == 9
    await wait_polls(mock, 2)  # answered authorization_pending meanwhile
    assert {p["error_code"] for p in await polls(mock)} == {"authorization_pending"}
    assert (await state(proxy, login["id"]))["status"] == "pending"

    await mock.control.approve_login("acct-mock-2", user_code=login["user_code"])
    done = await wait_final(proxy, login["id"])
    assert done["status"] == "succeeded", done
    assert (done["account_id"], done["email"], done["plan"]) == (
        "acct-mock-2",
        "user2@mock.example",
        "plus",
    )
    assert done["created"] is True
    exchange = (await mock.control.requests(path="/oauth/token"))[-1]
    assert exchange["body"]["grant_type"] == "authorization_code"
    assert exchange["body"]["redirect_uri"] == f"{mock.root}/deviceauth/callback"
    # the account serves at once
    accounts = (await proxy.client.get(f"{proxy.root}/api/accounts")).json()["accounts"]
    assert [a["account_id"] for a in accounts] == ["acct-mock-2"]
    answer = await proxy.client.post(
        f"{proxy.root}/v1/responses", json={"model": "gpt-5.5", "input": "mock:whoami"}
    )
    assert answer.status_code == 200 and "acct-mock-2" in answer.text
    # no token text in the login's view
    tokens = await mock.control.account("acct-mock-2")
    text = (await proxy.client.get(f"{proxy.root}/api/logins/{login['id']}")).text
    for name in ("access_token", "refresh_token", "id_token"):
        assert tokens[name] not in text


async def test_device_login_honours_slow_down(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await fast_mock(make_mock)
    proxy = await make_proxy(mock, accounts=[])
    await mock.control.add_fault("slow_down", count=1, skip=1)
    login = await start(proxy, "device")
    await wait_polls(mock, 3, seconds=15)
    times = [p["time"] for p in await polls(mock)]
    assert [p["error_code"] for p in await polls(mock)][:2] == [
        "authorization_pending",
        "slow_down",
    ]
    assert times[2] - times[1] >= 4.9  # the interval grew by 5 s after slow_down
    assert times[1] - times[0] < 2
    await mock.control.approve_login("acct-mock-1", user_code=login["user_code"])
    assert (await wait_final(proxy, login["id"], seconds=15))["status"] == "succeeded"


async def test_device_code_expiry_and_denial(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await fast_mock(make_mock, device_code_ttl=0.5)
    proxy = await make_proxy(mock, accounts=[])
    expired = await start(proxy, "device")
    done = await wait_final(proxy, expired["id"])
    assert done["status"] == "expired" and done["reason_code"] == "login_expired"
    assert done["expires_at"] <= expired["created_at"] + 1  # the code's life bounds the login

    await mock.control.configure(device_code_ttl=900.0)
    denied = await start(proxy, "device")
    await mock.control.deny_login(user_code=denied["user_code"])
    done = await wait_final(proxy, denied["id"])
    assert done["status"] == "failed" and done["reason_code"] == "login_denied"

    # faults: a denial or an expiry answered by the auth server at the next poll
    await mock.control.add_fault("denied", count=1)
    faulted = await start(proxy, "device")
    assert (await wait_final(proxy, faulted["id"]))["reason_code"] == "login_denied"
    await mock.control.add_fault("expired_code", count=1)
    faulted = await start(proxy, "device")
    assert (await wait_final(proxy, faulted["id"]))["status"] == "expired"
    assert (await proxy.client.get(f"{proxy.root}/api/accounts")).json()["accounts"] == []


async def test_login_deadline_expires_an_abandoned_login(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await fast_mock(make_mock)
    proxy = await make_proxy(mock, accounts=[], login_timeout=0.5, login_callback_port=0)
    device = await start(proxy, "device")
    browser = await start(proxy, "browser")
    port = urlsplit(browser["redirect_uri"]).port
    assert browser["callback_listening"] is True
    for login in (device, browser):
        done = await wait_final(proxy, login["id"])
        assert done["status"] == "expired", done
    polls_then = len(await polls(mock))
    await trio.sleep(0.3)
    assert len(await polls(mock)) == polls_then  # no task polls any more
    try:  # and the listener is gone
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()
        raise AssertionError("the callback listener outlived its login")
    except OSError:
        pass
    answer = await proxy.client.post(
        f"{proxy.root}/api/logins/{browser['id']}/complete",
        json={"redirect_url": "http://localhost/auth/callback?code=x&state=y"},
    )
    assert answer.status_code == 410 and answer.json()["error"]["code"] == "login_expired"


def stored(proxy: ProxyEnv, account_id: str) -> AccountRecord:
    settings = proxy.settings
    with Store.open(
        settings.resolved_database_url, data_dir=settings.data_dir, secret_key=settings.secret_key
    ) as store:
        record = store.get_account(account_id)
    assert record is not None
    return record


async def browser_approve(mock: MockEnv, authorize_url: str, account: str) -> str:
    """What the browser does: open the authorize URL, sign in, follow the redirect."""
    async with httpx.AsyncClient(timeout=30) as browser:
        page = await browser.get(authorize_url)
        assert page.status_code == 200
        state_value = parse_qs(urlsplit(authorize_url).query)["state"][0]
        approved = await mock.control.approve_login(account, state=state_value)
        again = await browser.get(authorize_url)
        assert again.status_code == 302
        assert again.headers["location"] == approved["redirect_url"]
        return str(approved["redirect_url"])


async def test_browser_login_via_the_callback_listener(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await fast_mock(make_mock)
    proxy = await make_proxy(mock, accounts=[], login_callback_port=0)
    login = await start(proxy, "browser")
    assert login["callback_listening"] is True
    query = parse_qs(urlsplit(login["authorize_url"]).query)
    assert {k: v[0] for k, v in query.items() if k not in ("state", "code_challenge")} == {
        "response_type": "code",
        "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
        "redirect_uri": login["redirect_uri"],
        "scope": "openid profile email offline_access api.connectors.read api.connectors.invoke",
        "code_challenge_method": "S256",
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
        "originator": "codex_cli_rs",
    }
    assert login["redirect_uri"].startswith("http://localhost:")
    redirect = await browser_approve(mock, login["authorize_url"], "acct-mock-3")
    # a callback with another state is refused, and the login keeps waiting
    wrong = redirect.replace("state=", "state=x")
    async with httpx.AsyncClient(timeout=30) as browser:
        refused = await browser.get(wrong.replace("localhost", "127.0.0.1"))
        assert refused.status_code == 400
        assert (await state(proxy, login["id"]))["status"] == "pending"
        landed = await browser.get(redirect.replace("localhost", "127.0.0.1"))
        assert landed.status_code == 200
    done = await wait_final(proxy, login["id"])
    assert done["status"] == "succeeded" and done["account_id"] == "acct-mock-3"


async def test_browser_login_with_a_pasted_url_refuses_a_wrong_state(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await fast_mock(make_mock)
    proxy = await make_proxy(mock, accounts=[], login_callback_port=0)
    login = await start(proxy, "browser")
    redirect = await browser_approve(mock, login["authorize_url"], "acct-mock-1")
    complete = f"{proxy.root}/api/logins/{login['id']}/complete"
    wrong = await proxy.client.post(
        complete, json={"redirect_url": redirect.replace("state=", "state=x")}
    )
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "login_state_mismatch"
    assert (await state(proxy, login["id"]))["status"] == "pending"
    pasted = await proxy.client.post(complete, json={"redirect_url": redirect})
    assert pasted.status_code == 200, pasted.text
    assert pasted.json()["status"] == "succeeded"
    assert pasted.json()["account_id"] == "acct-mock-1"
    again = await proxy.client.post(complete, json={"redirect_url": redirect})
    assert again.status_code == 409 and again.json()["error"]["code"] == "login_not_pending"


async def test_cancel_unknown_and_two_concurrent_logins(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await fast_mock(make_mock)
    proxy = await make_proxy(mock, accounts=[], login_callback_port=0)
    first, second = await start(proxy, "device"), await start(proxy, "device")
    browser = await start(proxy, "browser")
    assert first["user_code"] != second["user_code"]
    cancelled = await proxy.client.delete(f"{proxy.root}/api/logins/{browser['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    await mock.control.approve_login("acct-mock-2", user_code=second["user_code"])
    await mock.control.approve_login("acct-mock-1", user_code=first["user_code"])
    done = [await wait_final(proxy, x["id"]) for x in (first, second)]
    assert [d["account_id"] for d in done] == ["acct-mock-1", "acct-mock-2"]
    unknown = await proxy.client.get(f"{proxy.root}/api/logins/login_nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_login"
    bad = await proxy.client.post(f"{proxy.root}/api/logins", json={"flow": "fax"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_login_flow"
    again = await proxy.client.delete(f"{proxy.root}/api/logins/{browser['id']}")
    assert again.status_code == 409


async def test_relogin_updates_an_existing_account_in_place(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await fast_mock(make_mock)
    proxy = await make_proxy(mock, accounts=["acct-mock-1"])
    before = stored(proxy, "acct-mock-1")
    # the refresh token dies: the account needs a new login
    await mock.control.patch_account("acct-mock-1", refresh_mode="invalidated", revoke_tokens=True)
    failed = await proxy.client.post(
        f"{proxy.root}/v1/responses", json={"model": "gpt-5.5", "input": "hi"}
    )
    assert failed.status_code == 503
    listed = (await proxy.client.get(f"{proxy.root}/api/accounts")).json()["accounts"]
    assert listed[0]["state"] == "reauth_required"
    await mock.control.patch_account("acct-mock-1", refresh_mode="ok")

    login = await start(proxy, "device")
    await mock.control.approve_login("acct-mock-1", user_code=login["user_code"])
    done = await wait_final(proxy, login["id"])
    assert done["status"] == "succeeded" and done["created"] is False
    after = (await proxy.client.get(f"{proxy.root}/api/accounts")).json()["accounts"]
    assert len(after) == 1 and after[0]["account_id"] == "acct-mock-1"
    assert after[0]["state"] == "active"
    record = stored(proxy, "acct-mock-1")
    assert record.created_at == before.created_at  # the same account, its history kept
    assert record.refresh_token != before.refresh_token and record.state == "active"
    answer = await proxy.client.post(
        f"{proxy.root}/v1/responses", json={"model": "gpt-5.5", "input": "mock:whoami"}
    )
    assert answer.status_code == 200 and "acct-mock-1" in answer.text
