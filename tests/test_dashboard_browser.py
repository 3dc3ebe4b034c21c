"""The dashboard as an operator uses it, in headless Chromium (``tests/browser.py``) against
a real proxy on loopback in front of the mock backend: signing in, an account running out
while the pool page is open, adding an account by device login, a key from creation to
revocation with a real client in between, the live page's stream, and every page on a
laptop, on a phone and in dark mode (screenshots under ``tmp_path/screenshots``, and
``$TRIOPROXY_SCREENSHOTS`` when set).

One browser serves the whole module; each test starts its own proxy and signs in again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.browser import Browser, NoBrowser, chromium_missing, screenshot_folders, start_chromium
from tests.conftest import MockFactory, ProxyEnv
from tests.dashboard_support import (  # noqa: F401
    ADMIN,
    PASSWORD,
    DashboardFactory,
    eventually,
    make_dashboard,
)
from trioproxy.harness.mock_upstream import MockConfig

RESPONSE = {"model": "gpt-5.5", "input": "hello"}


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One browser for the module; without Chromium, why (each test then fails)."""
    missing = chromium_missing()
    if missing is not None:
        yield missing
        return
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chromium: Any, tmp_path: Path) -> Browser:
    if isinstance(chromium, str):
        return Browser(NoBrowser(chromium), [])
    chromium.delete_all_cookies()
    chromium.set_window_size(1280, 900)
    chromium.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    return Browser(chromium, screenshot_folders(tmp_path))


async def sign_in(browser: Browser, proxy: ProxyEnv, page: str = "pool") -> None:
    await browser.get(f"{proxy.root}/dashboard/{page}")
    await browser.wait_css("form input[name=password]")
    assert "/dashboard/login" in browser.url
    await browser.type("#name", ADMIN)
    await browser.type("#password", PASSWORD)
    await browser.click("form button[type=submit]")
    await browser.wait_for(lambda: f"/dashboard/{page}" in browser.driver.current_url)


async def test_sign_in_then_an_account_runs_out_with_its_countdown_on_the_pool_page(
    browser: Browser,
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_dashboard(mock)

    # a wrong password first: the sign-in page says so and no session starts
    await browser.get(f"{proxy.root}/dashboard/pool")
    await browser.wait_css("#password")
    await browser.screenshot("login")
    await browser.type("#name", ADMIN)
    await browser.type("#password", "not the password")
    await browser.click("form button[type=submit]")
    await browser.wait_text("#login-error", "Wrong name or password")
    await sign_in(browser, proxy)

    rows = await browser.find_all("#accounts-table tbody tr")
    assert [await browser.call(row.get_attribute, "data-state") for row in rows] == [
        "active",
        "active",
    ]
    # upstream reports a usage limit on the next request: its account is locked an hour
    await mock.control.add_fault("usage_limit", count=1, resets_in=3600)
    answer = await proxy.client.post(f"{proxy.root}/v1/responses", json=RESPONSE)
    assert answer.status_code == 200  # served by the other account
    await browser.wait_css("tr[data-state=exhausted]", seconds=8)
    state = await browser.text("tr[data-state=exhausted] td.state")
    assert "exhausted" in state and "until" in state
    countdown = "tr[data-state=exhausted] time[data-countdown]"
    first = await browser.text(countdown)
    assert re.fullmatch(r"in (59m \d+s|1h 0m)", first), first
    await browser.wait_for(
        lambda: browser.driver.find_element("css selector", countdown).text != first,
        3,
        "the countdown to tick",
    )
    assert await browser.text("#pool-status") == "serving"
    await browser.screenshot("pool")


async def test_add_an_account_by_device_login(
    browser: Browser,
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2, device_interval=0))
    proxy = await make_dashboard(mock, accounts=["acct-mock-1"])
    await sign_in(browser, proxy, "accounts")
    await browser.click("#login-device")
    code = await browser.wait_css("#user-code")
    user_code = await browser.call(lambda: code.text)
    assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}", user_code), user_code
    link = await browser.find("#verification-url")
    assert await browser.call(link.get_attribute, "href") == f"{mock.root}/codex/device"
    await browser.screenshot("device-login")

    await mock.control.approve_login("acct-mock-2", user_code=user_code)
    result = await browser.wait_text("#login-result", "acct-mock-2", seconds=10)
    assert "added" in result
    assert await browser.text("#login-status") == "succeeded"
    await browser.get(f"{proxy.root}/dashboard/pool")
    await browser.wait_css("#account-acct-mock-2[data-state=active]")


async def test_a_key_from_creation_to_revocation(
    browser: Browser,
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    # another key exists (the tests' own): without any, loopback clients need none
    proxy = await make_dashboard(mock, api_key=True)
    await sign_in(browser, proxy, "keys")
    await browser.type("#name", "team a")
    await browser.type("#budgets", "5h:tokens=2M,requests=500\nmonthly:cost_usd=50")
    await browser.type("#max_requests", "4")
    await browser.click("#create-key button[type=submit]")
    secret = await browser.call(lambda: browser.driver.find_element("css selector", "#secret").text)
    assert secret.startswith("trx_")
    config = await browser.text("#codex-config")
    assert f'base_url = "{proxy.root}/backend-api/codex"' in config
    assert 'env_key = "TRIOPROXY_API_KEY"' in config

    # the copy button puts the configuration on the clipboard
    origin = proxy.root
    await browser.cdp(
        "Browser.grantPermissions",
        {"origin": origin, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    await browser.click("#copy-config")
    await browser.wait_text(".copied", "Copied")
    copied = await browser.async_script(
        "const done = arguments[arguments.length - 1];"
        "navigator.clipboard.readText().then(done, (e) => done('error: ' + e));"
    )
    assert copied == config
    await browser.screenshot("key-created")

    # a real client with the key from the page
    async with httpx.AsyncClient(
        base_url=proxy.root, headers={"authorization": f"Bearer {secret}"}, timeout=30
    ) as client:
        for _ in range(3):
            answer = await client.post("/v1/responses", json=RESPONSE)
            assert answer.status_code == 200, answer.text
        key_id = secret.split("_")[1]

        # its usage reaches the chart (the counts are written every second)
        async def usage_shows_the_key() -> bool:
            await browser.get(f"{proxy.root}/dashboard/usage?range=24h&bucket=hour&group=key")
            heads = await browser.script(
                "return [...document.querySelectorAll('#table-requests th')].map(e => e.textContent)"
            )
            return any(key_id in head for head in heads)

        with trio.fail_after(10):
            for _ in range(100):
                if await usage_shows_the_key():
                    break
                await trio.sleep(0.5)
        total = await browser.text("#table-requests tbody tr:last-child")
        assert "3" in total
        assert await browser.find("#chart-requests canvas")
        href = await browser.call((await browser.find("#csv-link")).get_attribute, "href")
        assert "format=csv" in href and "group_by=key" in href
        await browser.screenshot("usage")

        await browser.get(f"{proxy.root}/dashboard/keys")
        row = await browser.wait_css(f"#key-{key_id}")
        assert "5h:requests=500,tokens=2M" in await browser.call(lambda: row.text)
        await browser.screenshot("keys")

        # revoke it on its page: the client is refused from then on
        await browser.get(f"{proxy.root}/dashboard/keys/{key_id}")
        await browser.click("details.confirm:last-of-type summary")
        await browser.click("#revoke")
        await browser.wait_text("#key-status", "revoked")
        refused = await client.post("/v1/responses", json=RESPONSE)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "api_key_revoked"


async def test_every_page_on_a_laptop_a_phone_and_in_the_dark(
    browser: Browser,
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=3))
    proxy = await make_dashboard(mock)
    for _ in range(4):
        assert (await proxy.client.post(proxy.v1_url, json=RESPONSE)).status_code == 200
    await sign_in(browser, proxy, "live")

    # the live page is pushed by the server: the panel is replaced every second
    await browser.wait_for(
        lambda: (
            int(browser.driver.find_element("id", "live-panel").get_attribute("data-updates") or 0)
            >= 2
        ),
        5,
        "two live snapshots",
    )
    assert "HTTP requests" in await browser.text("#live-panel")
    await browser.screenshot("live")

    async def four_requests_logged() -> bool:  # the log is written in batches
        await browser.get(f"{proxy.root}/dashboard/requests?status=ok")
        return len(await browser.find_all("#requests-table tbody tr")) == 4

    await eventually(four_requests_logged, 10)
    await browser.click("#requests-table tbody tr:first-child details summary")
    routing = await browser.text("#requests-table tbody tr:first-child details")
    assert "chose acct-mock-" in routing and "Candidates:" in routing
    await browser.screenshot("requests")

    await browser.get(f"{proxy.root}/dashboard/alerts")
    assert await browser.text("#alerts-emitted") == "0"
    await browser.screenshot("alerts")
    await browser.get(f"{proxy.root}/dashboard/accounts")
    await browser.screenshot("accounts")

    # keyboard: the skip link is the first stop, and the navigation follows
    await browser.get(f"{proxy.root}/dashboard/pool")
    await browser.wait_css("#accounts-table")
    from selenium.webdriver.common.keys import Keys

    body = await browser.find("body")
    await browser.call(body.send_keys, Keys.TAB)
    active = await browser.script("return document.activeElement.textContent")
    assert active == "Skip to the content"

    await browser.resize(390, 844)
    await browser.get(f"{proxy.root}/dashboard/pool")
    await browser.wait_css("#accounts-table")
    assert await browser.script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1"
    )
    await browser.screenshot("pool-phone")

    await browser.resize(1280, 900)
    await browser.cdp(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    await browser.get(f"{proxy.root}/dashboard/pool")
    await browser.wait_css("#accounts-table")
    background = await browser.script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 21, 28)"
    await browser.screenshot("pool-dark")


async def test_pause_and_resume_an_account_with_its_buttons(
    browser: Browser,
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_dashboard(mock, routing_strategy="fill_first")
    await sign_in(browser, proxy, "accounts")
    await browser.click("#pause-acct-mock-1")
    await browser.wait_css("#acct-acct-mock-1[data-state=paused]")
    assert "Paused account acct-mock-1." in await browser.text(".notice.ok")
    assert "paused" in await browser.text("#acct-acct-mock-1 td[data-label=State]")
    await browser.screenshot("accounts-paused")
    answer = await proxy.client.post(proxy.v1_url, json=RESPONSE)
    assert answer.status_code == 200
    assert (await mock.control.model_requests())[-1]["account"] == "acct-mock-2"

    await browser.get(f"{proxy.root}/dashboard/pool")
    await browser.wait_css("#account-acct-mock-1[data-state=paused]")
    assert await browser.text("#routing-strategy") == "fill_first"

    await browser.get(f"{proxy.root}/dashboard/accounts")
    await browser.click("#resume-acct-mock-1")
    await browser.wait_css("#acct-acct-mock-1[data-state=active]")
    answer = await proxy.client.post(proxy.v1_url, json=RESPONSE)
    assert answer.status_code == 200
    assert (await mock.control.model_requests())[-1]["account"] == "acct-mock-1"


PHONE = (390, 844)
PAGES = ("pool", "accounts", "keys", "live", "usage", "requests", "alerts")


async def test_every_page_fits_a_phone_in_light_and_dark(
    browser: Browser,
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=3))
    proxy = await make_dashboard(mock)
    for _ in range(3):
        assert (await proxy.client.post(proxy.v1_url, json=RESPONSE)).status_code == 200
    await mock.control.patch_account("acct-mock-3", revoke_tokens=True, refresh_mode="invalidated")
    await proxy.client.post(f"{proxy.root}/api/accounts/acct-mock-2/pause")
    await sign_in(browser, proxy)
    await browser.resize(*PHONE)
    for scheme in ("light", "dark"):
        await browser.cdp(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
        )
        for name in PAGES:
            await browser.get(f"{proxy.root}/dashboard/{name}")
            await browser.wait_css("main h1")
            # the page itself never scrolls sideways; a wide table scrolls in its own box
            widths = await browser.script(
                "return [document.documentElement.scrollWidth, window.innerWidth,"
                " document.body.scrollWidth]"
            )
            assert widths[0] <= widths[1] and widths[2] <= widths[1], (name, scheme, widths)
            # every page of the navigation can be reached: each link is on the page's width
            # and can be scrolled to within the navigation
            links = await browser.script(
                "return [...document.querySelectorAll('nav.main a')].map(a => a.textContent)"
            )
            assert links == ["Pool", "Accounts", "Keys", "Live", "Usage", "Requests", "Alerts"]
            reachable = await browser.script(
                "const nav = document.querySelector('nav.main');"
                "const box = nav.getBoundingClientRect();"
                "return box.left >= 0 && box.right <= window.innerWidth + 0.5"
                " && getComputedStyle(nav).display !== 'none'"
                " && (nav.scrollWidth <= nav.clientWidth"
                "     || ['auto', 'scroll'].includes(getComputedStyle(nav).overflowX))"
            )
            assert reachable, (name, scheme)
            await browser.screenshot(f"phone-{scheme}-{name}")
        await browser.click("nav.main a[href$='/alerts']")
        await browser.wait_for(lambda: browser.driver.current_url.endswith("/dashboard/alerts"))
