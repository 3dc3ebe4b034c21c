"""A real browser for the dashboard tests: headless Chromium from Debian's packages, driven
by Selenium through Debian's chromedriver.

The proxy under test runs in the test's own trio loop, so every WebDriver call (a blocking
HTTP call to chromedriver) runs in a worker thread (:class:`Browser`); the loop keeps
serving the pages meanwhile. A missing Chromium or chromedriver fails the test with what
to install (each test fails at its first use of the browser: the dashboard's behaviour is
only tested in a browser, so a machine without one must not pass).

Screenshots go to the test's ``tmp_path/screenshots`` and, when ``TRIOPROXY_SCREENSHOTS``
names a folder (``TRIOPROXY_SCREENSHOTS=docs/screenshots``), there too.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio

T = TypeVar("T")
CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = "chromedriver"
WINDOW = (1280, 900)
INSTALL = "apt-get install -y chromium chromium-driver"


def find_chromium() -> tuple[str | None, str | None]:
    """The Chromium and chromedriver binaries (None: not installed)."""
    browser = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    return browser, shutil.which(CHROMEDRIVER)


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    browser, driver = find_chromium()
    missing = [n for n, f in (("chromium", browser), ("chromedriver", driver)) if f is None]
    if missing:
        return f"the dashboard's browser tests need {' and '.join(missing)}: {INSTALL}"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the browser tests need selenium: pip install -e '.[dev]'"
    return None


def start_chromium() -> Any:
    """A headless Chromium session (the caller quits it); Chromium, chromedriver and
    selenium are there (:func:`chromium_missing`)."""
    browser, driver = find_chromium()
    assert browser is not None and driver is not None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--password-store=basic",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@attrs.frozen
class NoBrowser:
    """In place of a WebDriver where there is none: any use fails the test with why."""

    reason: str

    def __getattr__(self, name: str) -> Any:
        pytest.fail(self.reason, pytrace=False)


@attrs.define(eq=False)
class Browser:
    """The shared WebDriver session, its calls made in a worker thread."""

    driver: Any  # a WebDriver, or a NoBrowser
    shots: list[Path]  # folders screenshots are written to

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    async def get(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return await self.call(self.driver.find_element, By.CSS_SELECTOR, css)

    async def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(await self.call(self.driver.find_elements, By.CSS_SELECTOR, css))

    async def text(self, css: str) -> str:
        """The element's text, found and read in one call (parts of a page that refresh
        themselves replace their elements)."""
        from selenium.webdriver.common.by import By

        return str(await self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text))

    async def click(self, css: str) -> None:
        element = await self.find(css)
        await self.call(element.click)

    async def type(self, css: str, text: str, *, clear: bool = True) -> None:
        element = await self.find(css)
        if clear:
            await self.call(element.clear)
        await self.call(element.send_keys, text)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, source, *args)

    async def async_script(self, source: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_async_script, source, *args)

    async def cdp(self, command: str, params: dict[str, Any]) -> Any:
        return await self.call(self.driver.execute_cdp_cmd, command, params)

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    async def wait_for(
        self, what: Callable[[], Any], seconds: float = 10.0, message: str = ""
    ) -> Any:
        """``what()`` (run in a worker thread) until it is truthy; fails after ``seconds``."""
        with trio.move_on_after(seconds):
            while True:
                try:
                    found = await self.call(what)
                except Exception:  # not there yet (NoSuchElement, a stale element)
                    found = None
                if found:
                    return found
                await trio.sleep(0.1)
        pytest.fail(f"waited {seconds} s for {message or what}")

    async def wait_css(self, css: str, seconds: float = 10.0) -> Any:
        from selenium.webdriver.common.by import By

        return await self.wait_for(
            lambda: self.driver.find_element(By.CSS_SELECTOR, css), seconds, f"an element {css}"
        )

    async def wait_text(self, css: str, needle: str, seconds: float = 10.0) -> str:
        from selenium.webdriver.common.by import By

        def found() -> str | None:
            text = str(self.driver.find_element(By.CSS_SELECTOR, css).text)
            return text if needle in text else None

        return str(await self.wait_for(found, seconds, f"{needle!r} in {css}"))

    async def resize(self, width: int, height: int) -> None:
        await self.call(self.driver.set_window_size, width, height)

    async def screenshot(self, name: str) -> None:
        """A PNG of the whole page (the window's width, the content's height, at most
        4000 px) in each folder."""

        def capture() -> bytes | None:
            metrics = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
            width = self.driver.execute_script("return window.innerWidth")  # with the scrollbar's
            height = min(4000, metrics["cssContentSize"]["height"])
            if width <= 0 or height <= 0:
                return None  # not laid out yet
            shot = self.driver.execute_cdp_cmd(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                },
            )
            return base64.b64decode(shot["data"])

        # (tried again while Chromium cannot take it: a page still being laid out)
        data = await self.wait_for(capture, 10.0, "a screenshot")
        for folder in self.shots:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.png").write_bytes(data)


def screenshot_folders(tmp_path: Path) -> list[Path]:
    folders = [tmp_path / "screenshots"]
    extra = os.environ.get("TRIOPROXY_SCREENSHOTS")
    if extra:
        folders.append(Path(extra))
    return folders
