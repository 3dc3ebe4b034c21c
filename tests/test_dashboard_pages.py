"""The dashboard's forms and its event stream over HTTP, against a real proxy on loopback in
front of the mock: what each form changes (seen through the management API), the API's
refusals shown on the page, and the live stream's life (one snapshot a second, ended by
the client leaving, by the session ending and by a drain)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import trio

from tests.conftest import MockFactory
from tests.dashboard_support import (  # noqa: F401
    DashboardFactory,
    add_admin,
    browser_client,
    csrf_token,
    eventually,
    make_dashboard,
    sign_in,
)
from trioproxy.config import load_settings
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.server import serve_proxy
from trioproxy.store import Store


def notices(page: httpx.Response) -> list[str]:
    return re.findall(r'<div class="notice \w+" role="\w+">([^<]*)</div>', page.text)


async def test_accounts_import_remove_and_a_browser_login_pasted_back(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=3, device_interval=0))
    proxy = await make_dashboard(mock, accounts=["acct-mock-1"], login_callback_port=0)
    async with browser_client(proxy) as client:
        await sign_in(client)
        token = await csrf_token(client)
        auth = json.dumps(await mock.control.auth_json("acct-mock-2"))
        uploaded = await client.post(
            "/dashboard/accounts/import",
            data={"csrf_token": token},
            files={"auth_file": ("auth.json", auth, "application/json")},
        )
        assert uploaded.status_code == 303
        page = await client.get("/dashboard/accounts")
        assert notices(page) == ["imported acct-mock-2 (user2@mock.example)"]
        bad = await client.post(
            "/dashboard/accounts/import", data={"csrf_token": token, "auth_json": "{not json"}
        )
        assert bad.status_code == 303
        assert "That is not JSON" in notices(await client.get("/dashboard/accounts"))[0]

        removed = await client.post(
            "/dashboard/accounts/acct-mock-1/remove", data={"csrf_token": token}
        )
        assert removed.status_code == 303
        listed = (await client.get("/api/accounts")).json()["accounts"]
        assert [a["account_id"] for a in listed] == ["acct-mock-2"]

        started = await client.post(
            "/dashboard/accounts/logins", data={"csrf_token": token, "flow": "browser"}
        )
        assert started.status_code == 303
        login_page = await client.get(started.headers["location"])
        authorize = re.search(r'href="([^"]+)"[^>]*id="authorize-url"', login_page.text)
        assert authorize is not None
        authorize_url = authorize.group(1).replace("&amp;", "&")
        state = parse_qs(urlsplit(authorize_url).query)["state"][0]
        assert (await mock.client.get(authorize_url)).status_code == 200  # the sign-in page
        approved = await mock.control.approve_login("acct-mock-3", state=state)
        finished = await client.post(
            started.headers["location"] + "/complete",
            data={"csrf_token": token, "redirect_url": approved["redirect_url"]},
        )
        assert finished.status_code == 303
        done = await client.get(started.headers["location"])
        assert 'data-status="succeeded"' in done.text and "acct-mock-3" in done.text
        assert "hx-trigger" not in done.text  # a finished login stops polling

        cancelled = await client.post(
            "/dashboard/accounts/logins", data={"csrf_token": token, "flow": "device"}
        )
        cancel = await client.post(
            cancelled.headers["location"] + "/cancel", data={"csrf_token": token}
        )
        assert cancel.status_code == 303
        assert notices(await client.get("/dashboard/accounts")) == ["Login cancelled."]


async def test_the_pool_shows_the_routing_strategy_in_force(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_dashboard(mock, routing_strategy="reset_drain")
    listed = (await proxy.client.get(f"{proxy.root}/api/accounts")).json()
    assert listed["pool"]["routing_strategy"] == "reset_drain"
    # before any request was routed, and in what clients read nothing changes
    usage = (await proxy.client.get(f"{proxy.root}/api/codex/usage")).json()
    assert "routing_strategy" not in usage
    async with browser_client(proxy) as client:
        await sign_in(client)
        for path in ("/dashboard/pool", "/dashboard/pool/table"):
            page = await client.get(path)
            assert page.status_code == 200
            assert '<div class="value" id="routing-strategy">reset_drain</div>' in page.text


async def test_pause_and_resume_forms_with_the_csrf_token(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_dashboard(mock)

    async def state() -> str:
        listed = (await proxy.client.get(f"{proxy.root}/api/accounts")).json()["accounts"]
        return str(next(a["state"] for a in listed if a["account_id"] == "acct-mock-1"))

    async with browser_client(proxy) as client:
        await sign_in(client)
        token = await csrf_token(client)
        forged = await client.post("/dashboard/accounts/acct-mock-1/pause", data={})
        assert forged.status_code == 403 and await state() == "active"
        paused = await client.post(
            "/dashboard/accounts/acct-mock-1/pause", data={"csrf_token": token}
        )
        assert paused.status_code == 303 and await state() == "paused"
        page = await client.get("/dashboard/accounts")
        assert notices(page) == ["Paused account acct-mock-1."]
        assert 'id="resume-acct-mock-1"' in page.text and 'id="pause-acct-mock-2"' in page.text
        pool = await client.get("/dashboard/pool")
        assert 'id="account-acct-mock-1" data-state="paused"' in pool.text
        assert "1 / 2 active" in pool.text and "1 paused" in pool.text
        await client.post("/dashboard/accounts/acct-mock-1/resume", data={"csrf_token": token})
        assert await state() == "active"
        page = await client.get("/dashboard/accounts")
        assert notices(page) == ["Resumed account acct-mock-1."]
        unknown = await client.post(
            "/dashboard/accounts/acct-nobody/pause", data={"csrf_token": token}
        )
        assert unknown.status_code == 303
        assert notices(await client.get("/dashboard/accounts")) == ["No account acct-nobody."]


async def test_an_account_that_needs_a_new_sign_in_is_fixed_by_signing_in_again(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2, device_interval=0))
    proxy = await make_dashboard(mock)
    with Store.open(
        proxy.settings.resolved_database_url, data_dir=proxy.settings.data_dir
    ) as store:
        store.set_account_state("acct-mock-2", "reauth_required", "refresh token revoked")
    async with browser_client(proxy) as client:
        await sign_in(client)

        async def needs_sign_in() -> bool:  # the proxy reads the store's changes every 2 s
            page = await client.get("/dashboard/pool/table")
            return 'id="account-acct-mock-2" data-state="reauth_required"' in page.text

        await eventually(needs_sign_in, 5)
        accounts = await client.get("/dashboard/accounts")
        row = accounts.text[accounts.text.index('id="acct-acct-mock-2"') :]
        assert "reauth required" in row[:1500] and "Sign in again" in row[:1500]
        started = await client.post(
            "/dashboard/accounts/logins",
            data={"csrf_token": await csrf_token(client), "flow": "device"},
        )
        page = await client.get(started.headers["location"])
        code = re.search(r'id="user-code">([A-Z0-9-]+)<', page.text)
        assert code is not None
        await mock.control.approve_login("acct-mock-2", user_code=code.group(1))

        async def updated() -> bool:
            status = await client.get(started.headers["location"] + "/status")
            return 'data-status="succeeded"' in status.text

        await eventually(updated, 10)
        status = await client.get(started.headers["location"] + "/status")
        assert 'account <span class="mono">acct-mock-2</span> updated' in status.text
        listed = {
            a["account_id"]: a for a in (await client.get("/api/accounts")).json()["accounts"]
        }
        assert listed["acct-mock-2"]["state"] == "active"


async def test_keys_create_refused_change_disable_enable_rotate(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_dashboard(mock)
    async with browser_client(proxy) as client:
        await sign_in(client)
        token = await csrf_token(client)
        refused = await client.post(
            "/dashboard/keys",
            data={"csrf_token": token, "name": "team", "budgets": "5h:bananas=3"},
        )
        assert refused.status_code == 400
        assert "bananas" in notices(refused)[0]
        assert 'value="team"' in refused.text  # the form keeps what was typed

        created = await client.post(
            "/dashboard/keys",
            data={
                "csrf_token": token,
                "name": "team",
                "models": "gpt-5.5, gpt-5.4*",
                "max_reasoning_effort": "medium",
                "budgets": "5h:tokens=2M\nmonthly:cost_usd=50",
                "max_requests": "4",
                "accounts": ["acct-mock-2"],
                "expires_at": "90d",
            },
        )
        assert created.status_code == 200
        secret = re.search(r'<code id="secret">(trx_[^<]+)</code>', created.text)
        assert secret is not None
        (key,) = (await client.get("/api/keys")).json()["keys"]
        assert key["policy"] == {
            "models": ["gpt-5.5", "gpt-5.4*"],
            "max_reasoning_effort": "medium",
            "budgets": [
                {"window": "5h", "reset": "rolling", "tokens": 2000000},
                {"window": "monthly", "reset": "calendar", "cost_usd": 50},
            ],
            "max_requests": 4,
            "accounts": ["acct-mock-2"],
        }
        assert key["expires_at"] is not None
        key_id = key["key_id"]
        assert secret.group(1).startswith(f"trx_{key_id}_")

        page = await client.get(f"/dashboard/keys/{key_id}")
        assert "gpt-5.5, gpt-5.4*" in page.text and "5h:tokens=2M" in page.text
        changed = await client.post(
            f"/dashboard/keys/{key_id}",
            data={"csrf_token": token, "name": "team a", "budgets": "daily:requests=100"},
        )
        assert changed.status_code == 303
        view = (await client.get(f"/api/keys/{key_id}")).json()
        assert view["name"] == "team a" and view["expires_at"] is None
        assert view["policy"] == {
            "budgets": [{"window": "daily", "reset": "calendar", "requests": 100}]
        }
        assert notices(await client.get(f"/dashboard/keys/{key_id}")) == ["Key changed."]

        for verb, status in (("disable", "disabled"), ("enable", "active")):
            done = await client.post(f"/dashboard/keys/{key_id}/{verb}", data={"csrf_token": token})
            assert done.status_code == 303
            assert (await client.get(f"/api/keys/{key_id}")).json()["status"] == status
        rotated = await client.post(f"/dashboard/keys/{key_id}/rotate", data={"csrf_token": token})
        new_secret = re.search(r'<code id="secret">(trx_[^<]+)</code>', rotated.text)
        assert new_secret is not None and new_secret.group(1) != secret.group(1)
        assert (await client.get(f"/api/keys/{key_id}")).json()["rotated_at"] is not None


async def test_what_clients_sent_is_shown_as_text(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock)
    model = "</script><img src=x onerror=alert(1)>"
    answer = await proxy.client.post(proxy.v1_url, json={"model": model, "input": "hi"})
    assert answer.status_code in (200, 400, 404)
    async with browser_client(proxy) as client:
        await sign_in(client)

        async def counted() -> bool:
            return bool((await client.get("/api/usage", params={"model": model})).json()["rows"])

        await eventually(counted, 10)
        for path in ("/dashboard/usage?group=model", "/dashboard/requests"):
            page = await client.get(path)
            assert page.status_code == 200
            assert "<img" not in page.text and "</script><" not in page.text, path
            assert "&lt;img src=x" in page.text or "\\u003cimg src=x" in page.text, path


class Events:
    """The messages of a server-sent event stream, read as they come."""

    def __init__(self, stream: httpx.Response) -> None:
        self.chunks = stream.aiter_text()
        self.buffer = ""

    async def read(self, count: int) -> list[str]:
        """The next ``count`` messages, or fewer when the stream ends first."""
        events: list[str] = []
        while len(events) < count:
            if "\n\n" in self.buffer:
                event, self.buffer = self.buffer.split("\n\n", 1)
                events.append(event)
                continue
            try:
                self.buffer += await self.chunks.__anext__()
            except StopAsyncIteration:
                break
        return events


async def dashboard_lane(client: httpx.AsyncClient) -> int:
    lanes = (await client.get("/api/admission")).json()["lanes"]
    return int(lanes["dashboard"]["in_use"])


async def test_the_event_stream_ends_when_its_client_leaves_or_its_session_ends(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock)
    async with browser_client(proxy) as client, browser_client(proxy) as other:
        await sign_in(client)
        await sign_in(other)
        with trio.fail_after(5):
            async with client.stream("GET", "/dashboard/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                start = trio.current_time()
                events = await Events(stream).read(3)
                took = trio.current_time() - start
        assert 1.8 <= took < 3.5  # one at once, then one a second
        assert all(e.startswith("event: snapshot\ndata: ") for e in events)
        assert "HTTP requests" in events[0]
        # the client left: its lane slot is back (only this request holds one)

        async def only_this_request() -> bool:
            return await dashboard_lane(other) == 1

        await eventually(only_this_request, 3)

        token = await csrf_token(client)
        with trio.fail_after(5):
            async with client.stream("GET", "/dashboard/events") as stream:
                reader = Events(stream)
                assert len(await reader.read(1)) == 1
                out = await other.post(
                    "/dashboard/logout", data={"csrf_token": await csrf_token(other)}
                )
                assert out.status_code == 303
                # another session ending leaves this stream alone; this one's ending ends it
                assert len(await reader.read(1)) == 1
                signed_out = await client.post("/dashboard/logout", data={"csrf_token": token})
                assert signed_out.status_code == 303
                rest = await reader.read(5)
        assert len(rest) <= 1  # at most the one already on its way


async def test_a_drain_ends_the_event_stream_at_once(
    make_mock: MockFactory, nursery: trio.Nursery, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    add_admin(tmp_path / "data")
    settings = load_settings(
        environ={},
        overrides={
            "host": "127.0.0.1",
            "port": 0,
            "data_dir": str(tmp_path / "data"),
            "upstream_base_url": mock.base_url,
            "auth_base_url": mock.root,
            "usage_poll_interval": 0.0,
            "drain_grace": 0.0,
            "drain_timeout": 30.0,
        },
    )
    shutdown = trio.Event()
    stopped = trio.Event()

    async def run_proxy(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await serve_proxy(settings, shutdown_event=shutdown, task_status=task_status)
        stopped.set()

    port = await nursery.start(functools.partial(run_proxy))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await sign_in(client)
        with trio.fail_after(5):
            async with client.stream("GET", "/dashboard/events") as stream:
                reader = Events(stream)
                assert len(await reader.read(1)) == 1
                shutdown.set()
                start = trio.current_time()
                assert len(await reader.read(10)) <= 1  # until the stream ends
                assert trio.current_time() - start < 1.5
        with trio.fail_after(5):
            await stopped.wait()  # the drain did not wait for the dashboard
