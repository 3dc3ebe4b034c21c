"""The dashboard's security model, over HTTP against a real proxy on loopback: nothing
answers without a session or a key, every change needs the session's CSRF token, another
origin's form post is refused, the session cookie's attributes, sessions ending (sign-out,
a new password, a removed admin), failed sign-ins throttled per address and per name, the
first admin made at a first start, and no admin password in the logs."""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import structlog
import trio
from click.testing import CliRunner
from werkzeug.routing import Rule

from tests.conftest import MockFactory, start_proxy
from tests.dashboard_support import (  # noqa: F401
    ADMIN,
    PASSWORD,
    DashboardFactory,
    browser_client,
    csrf_token,
    eventually,
    make_dashboard,
    sign_in,
)
from tests.test_servers import make_certificate
from trioproxy.app.management import create_management_app
from trioproxy.cli import main as cli_main
from trioproxy.dashboard.auth import ADMINS_TTL, COOKIE
from trioproxy.dashboard.passwords import hash_password
from trioproxy.dashboard.sessions import LoginThrottle, SessionRegistry
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.sessions.context import ProxyContext
from trioproxy.store import Store
from trioproxy.store import admins as admin_store

OPEN = ("/health/live", "/health/ready", "/dashboard/login", "/dashboard/static/<path:filename>")


def every_route() -> list[tuple[str, str]]:
    """Every (method, path) the management app answers, from its own route table, with
    sample values in the path's variables."""
    stub = cast(ProxyContext, SimpleNamespace(store=None, drain_started=trio.Event()))
    app = create_management_app(stub, cast(Any, None), None, cast(Any, object()))
    routes = []
    for rule in cast(list[Rule], list(app.url_map.iter_rules())):
        if rule.rule in OPEN:
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"x-\1", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((method, path))
    return routes


async def test_no_page_or_api_route_answers_without_a_session_or_a_key(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock, api_key=True)  # with a key, loopback is no pass
    routes = every_route()
    assert ("GET", "/dashboard/pool") in routes and ("POST", "/api/keys") in routes
    assert len(routes) > 40
    async with browser_client(proxy) as client:
        for method, path in routes:
            answer = await client.request(method, path)
            if path.startswith("/dashboard") and method == "GET" and answer.status_code == 303:
                # a page sends the browser to the sign-in page, and shows nothing
                assert answer.headers["location"].startswith("/dashboard/login"), path
                assert answer.content == b"" or b"login" in answer.content
            else:  # the API, the page fragments, the event stream, every form
                assert answer.status_code == 401, (method, path, answer.status_code)
        # the open ones: the sign-in page and the static files
        assert (await client.get("/dashboard/login")).status_code == 200
        assert (await client.get("/dashboard/static/dashboard.css")).status_code == 200
        licence = await client.get("/dashboard/static/vendor/htmx-2.0.11/LICENSE")
        assert licence.status_code == 200 and "Zero-Clause BSD" in licence.text
        # a made-up cookie is no session
        client.cookies.set(COOKIE, "made-up")
        assert (await client.get("/api/accounts")).status_code == 401
        assert (await client.get("/dashboard/pool")).status_code == 303


async def test_loopback_without_keys_still_needs_a_session_for_the_dashboard(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock)
    async with browser_client(proxy) as client:
        assert (await client.get("/api/accounts")).status_code == 200  # loopback trust
        assert (await client.get("/dashboard/pool")).status_code == 303
        assert (await client.get("/dashboard/events")).status_code == 401


async def test_a_session_is_an_operator_and_every_change_needs_its_csrf_token(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock, api_key=True)
    async with browser_client(proxy) as client:
        signed_in = await sign_in(client)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard/pool"
        cookie = signed_in.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain http here
        assert (await client.get("/api/accounts")).status_code == 200
        assert (await client.get("/api/keys")).status_code == 200
        token = await csrf_token(client)

        for headers in ({}, {"x-csrf-token": "wrong"}):
            refused = await client.post("/api/keys", json={"name": "x"}, headers=headers)
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "csrf_token_invalid"
            removal = await client.delete("/api/accounts/acct-mock-1", headers=headers)
            assert removal.status_code == 403
        form = await client.post("/dashboard/keys", data={"name": "x"})
        assert form.status_code == 403
        form = await client.post("/dashboard/keys", data={"name": "x", "csrf_token": "wrong"})
        assert form.status_code == 403
        assert [k["name"] for k in (await client.get("/api/keys")).json()["keys"]] == ["tests"]

        made = await client.post("/api/keys", json={"name": "ok"}, headers={"x-csrf-token": token})
        assert made.status_code == 201
        form = await client.post("/dashboard/keys", data={"name": "form", "csrf_token": token})
        assert form.status_code == 200 and "trx_" in form.text
        assert form.headers["cache-control"] == "no-store"  # a secret is on the page
        names = [k["name"] for k in (await client.get("/api/keys")).json()["keys"]]
        assert names == ["tests", "ok", "form"]


async def test_another_origins_form_post_is_refused(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock)
    evil = {"origin": "http://evil.example"}
    async with browser_client(proxy) as client:
        login = await client.post(
            "/dashboard/login", data={"name": ADMIN, "password": PASSWORD}, headers=evil
        )
        assert login.status_code == 403 and login.json()["error"]["code"] == "origin_not_allowed"
        assert COOKIE not in client.cookies
        # the same form from the proxy's own origin
        own = {"origin": proxy.root}
        login = await client.post(
            "/dashboard/login", data={"name": ADMIN, "password": PASSWORD}, headers=own
        )
        assert login.status_code == 303
        token = await csrf_token(client)
        # even with the session and the right token, another origin's post is refused
        for path in ("/dashboard/keys", "/dashboard/logout"):
            answer = await client.post(path, data={"name": "x", "csrf_token": token}, headers=evil)
            assert answer.status_code == 403, path
        refused = await client.post(
            "/api/keys", json={"name": "x"}, headers={**evil, "x-csrf-token": token}
        )
        assert refused.status_code == 403
        assert (await client.get("/api/keys")).json()["keys"] == []


async def test_sessions_end_at_sign_out_with_a_new_password_and_with_their_admin(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock, api_key=True)
    store = Store.open(proxy.settings.resolved_database_url, data_dir=proxy.settings.data_dir)
    try:
        async with browser_client(proxy) as first, browser_client(proxy) as second:
            await sign_in(first)
            await sign_in(second)
            token = await csrf_token(first)
            out = await first.post("/dashboard/logout", data={"csrf_token": token})
            assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
            assert (await first.get("/api/accounts")).status_code == 401
            assert (await second.get("/api/accounts")).status_code == 200

            async def signed_out() -> bool:
                return (await second.get("/api/accounts")).status_code == 401

            admin_store.set_password(store, ADMIN, hash_password("another password here"))
            await eventually(signed_out, ADMINS_TTL + 3)
            assert (await second.get("/dashboard/pool")).status_code == 303
            assert (await sign_in(second, password="another password here")).status_code == 303

            admin_store.remove_admin(store, ADMIN)
            await eventually(signed_out, ADMINS_TTL + 3)
    finally:
        store.close()


async def test_failed_sign_ins_are_throttled(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock)
    async with browser_client(proxy) as client:
        for _ in range(5):
            failed = await sign_in(client, password="wrong password")
            assert failed.status_code == 401 and "Wrong name or password" in failed.text
        refused = await sign_in(client)  # the right password, but too late
        assert refused.status_code == 429
        assert 295 <= int(refused.headers["retry-after"]) <= 300
        assert "Too many failed sign-ins" in refused.text
        assert COOKIE not in client.cookies
        # a name that is no admin fails the same way (and counts the same)
        assert (await client.get("/dashboard/login")).status_code == 200


def test_the_throttle_counts_per_address_and_per_name_over_a_sliding_window() -> None:
    throttle = LoginThrottle(per_address=3, per_name=5, window=100.0)
    for at in (0.0, 10.0, 20.0):
        assert throttle.retry_after("10.0.0.1", "ops", at) is None
        throttle.failed("10.0.0.1", "ops", at)
    assert throttle.retry_after("10.0.0.1", "ops", 30.0) == 70.0  # the first leaves at 100
    assert throttle.retry_after("10.0.0.1", "other", 30.0) == 70.0  # the address is held
    assert throttle.retry_after("10.0.0.2", "ops", 30.0) is None  # the name is not, yet
    throttle.failed("10.0.0.2", "ops", 30.0)
    throttle.failed("10.0.0.3", "ops", 40.0)
    assert throttle.retry_after("10.0.0.4", "ops", 50.0) == 50.0  # 5 for the name
    assert throttle.retry_after("10.0.0.1", "x", 100.0) is None  # 0.0 left the window
    throttle.succeeded("10.0.0.4", "ops")
    assert throttle.retry_after("10.0.0.5", "ops", 50.0) is None
    assert throttle.statistics().refused_total == 3


def test_sessions_expire_idle_and_old_and_are_bounded() -> None:
    registry = SessionRegistry(idle_timeout=10.0, max_age=25.0, max_sessions=2)
    token, session = registry.open("ops", 1.0, now=0.0)
    assert registry.find(token, 9.0) is session
    assert registry.find(token, 18.0) is session  # each request starts the idle time again
    assert registry.find(token, 25.0) is None  # too old, however busy
    token, _ = registry.open("ops", 1.0, now=30.0)
    assert registry.find(token, 40.0) is None  # idle 10 s
    first, _ = registry.open("a", 1.0, now=50.0)
    second, _ = registry.open("b", 1.0, now=51.0)
    third, _ = registry.open("c", 1.0, now=52.0)
    assert registry.find(first, 53.0) is None and registry.find(third, 53.0) is not None
    assert registry.find(second, 53.0) is not None
    assert registry.close_admin("b") == 1 and registry.find(second, 53.0) is None


async def test_a_first_start_without_admin_makes_one_and_logs_its_password_once(
    make_mock: MockFactory, nursery: trio.Nursery, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    with structlog.testing.capture_logs() as logs:
        proxy = await start_proxy(nursery, mock, tmp_path)
        try:

            async def logged() -> bool:
                return any("password" in e for e in logs)

            await eventually(logged, 10)
            (created,) = [e for e in logs if "password" in e]
            assert created["name"] == "admin" and created["log_level"] == "warning"
            async with browser_client(proxy) as client:
                assert (await sign_in(client, "admin", created["password"])).status_code == 303
        finally:
            await proxy.client.aclose()
    with Store.open(
        proxy.settings.resolved_database_url, data_dir=proxy.settings.data_dir
    ) as store:
        assert [a.name for a in admin_store.list_admins(store)] == ["admin"]


async def test_no_admin_password_reaches_the_logs(
    make_mock: MockFactory,
    nursery: trio.Nursery,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    chosen, wrong, changed = "chosen password 1", "a wrong password 2", "changed password 3"
    data_dir = tmp_path / "proxy-data"
    runner = CliRunner()
    made = runner.invoke(
        cli_main,
        ["admin", "create", ADMIN, "--password-stdin", "--data-dir", str(data_dir)],
        input=chosen + "\n",
        env={"TRIOPROXY_DATA_DIR": None},
    )
    assert made.exit_code == 0, made.output
    assert chosen not in made.output
    mock = await make_mock(MockConfig(accounts=1))
    with structlog.testing.capture_logs() as logs:
        proxy = await start_proxy(nursery, mock, tmp_path, log_level="debug")
        try:
            async with browser_client(proxy) as client:
                assert (await sign_in(client, password=wrong)).status_code == 401
                assert (await sign_in(client, password=chosen)).status_code == 303
                await client.get("/dashboard/pool")
                again = runner.invoke(
                    cli_main,
                    [
                        "admin",
                        "set-password",
                        ADMIN,
                        "--password-stdin",
                        "--data-dir",
                        str(data_dir),
                    ],
                    input=changed + "\n",
                )
                assert again.exit_code == 0 and changed not in again.output
                await trio.sleep(ADMINS_TTL + 0.2)
                assert (await sign_in(client, password=changed)).status_code == 303
        finally:
            await proxy.client.aclose()
    captured = capfd.readouterr()
    text = repr(logs) + captured.out + captured.err
    assert logs  # the proxy did log
    for password in (chosen, wrong, changed):
        assert password not in text


async def test_behind_a_tls_reverse_proxy_the_cookie_is_secure_and_throttled_per_client(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(mock, api_key=True, trusted_proxies="127.0.0.1")

    def through(client: str) -> dict[str, str]:
        return {"x-forwarded-proto": "https", "x-forwarded-for": client}

    async with browser_client(proxy) as client:
        for _ in range(5):
            failed = await client.post(
                "/dashboard/login",
                data={"name": ADMIN, "password": "wrong password"},
                headers=through("203.0.113.7"),
            )
            assert failed.status_code == 401
        throttled = await client.post(
            "/dashboard/login",
            data={"name": ADMIN, "password": PASSWORD},
            headers=through("203.0.113.7"),
        )
        assert throttled.status_code == 429
        # another client behind the same reverse proxy is not held by that one's failures
        signed_in = await client.post(
            "/dashboard/login",
            data={"name": ADMIN, "password": PASSWORD},
            headers=through("203.0.113.8"),
        )
        assert signed_in.status_code == 303
        cookie = signed_in.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


async def test_over_tls_the_cookie_is_secure(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    cert, key, ca = make_certificate(tmp_path)
    trust = ssl.create_default_context(cafile=str(ca))
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_dashboard(
        mock, server="hypercorn", certfile=str(cert), keyfile=str(key), verify=trust
    )
    assert proxy.root.startswith("https://")
    async with httpx.AsyncClient(base_url=proxy.root, verify=trust, timeout=30) as client:
        signed_in = await sign_in(client)
        assert signed_in.status_code == 303
        assert "Secure" in signed_in.headers["set-cookie"]
        assert (await client.get("/api/accounts")).status_code == 200
        assert (await client.get("/dashboard/pool")).status_code == 200
