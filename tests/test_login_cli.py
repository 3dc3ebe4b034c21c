"""``trioproxy accounts login`` as a user runs it: a real process, its terminal output and
exit code, against the mock's auth server on loopback."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.conftest import MockEnv, MockFactory
from tests.test_login_api import browser_approve
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.store import Store

TRIOPROXY = [sys.executable, "-m", "trioproxy.cli"]


class Terminal:
    """A ``trioproxy accounts login`` process: its stdout read line by line, its stdin."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.out = b""
        self.err = b""

    async def expect(self, text: str, seconds: float = 30) -> str:
        """Read stdout until ``text`` appears; the line that holds it."""
        assert self.process.stdout is not None
        with trio.fail_after(seconds):
            for _ in range(100_000):
                for line in self.out.decode().splitlines():
                    if text in line:
                        return line
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"no {text!r} in {self.out.decode()!r}")
                self.out += chunk
        raise AssertionError("unreachable")

    async def type(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def finish(self, seconds: float = 30) -> int:
        assert self.process.stdout is not None and self.process.stderr is not None
        with trio.fail_after(seconds):
            async with trio.open_nursery() as nursery:

                async def drain(stream: Any, name: str) -> None:
                    for _ in range(100_000):
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        setattr(self, name, getattr(self, name) + chunk)

                nursery.start_soon(drain, self.process.stdout, "out")
                nursery.start_soon(drain, self.process.stderr, "err")
            return await self.process.wait()


async def run_login(mock: MockEnv, data_dir: Path, *args: str) -> Terminal:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOPROXY_")}
    env["PYTHONIOENCODING"] = "utf-8"  # as on a terminal that can draw a QR code
    process = await trio.lowlevel.open_process(
        [
            *TRIOPROXY,
            "accounts",
            "login",
            *args,
            "--data-dir",
            str(data_dir),
            "--auth-base-url",
            mock.root,
        ],
        stdin=-1,
        stdout=-1,
        stderr=-1,
        env=env,
    )
    return Terminal(process)


async def close(terminal: Terminal) -> None:
    if terminal.process.returncode is None:
        terminal.process.kill()
        await terminal.process.wait()
    for stream in (terminal.process.stdin, terminal.process.stdout, terminal.process.stderr):
        if stream is not None:
            await stream.aclose()


def stored_accounts(data_dir: Path) -> list[str]:
    with Store.open(f"sqlite:///{data_dir / 'trioproxy.db'}", data_dir=data_dir) as store:
        return [record.account_id for record in store.list_accounts()]


async def assert_no_tokens(mock: MockEnv, terminal: Terminal, account_id: str) -> None:
    tokens = await mock.control.account(account_id)
    for name in ("access_token", "refresh_token", "id_token"):
        assert tokens[name] not in terminal.out.decode() + terminal.err.decode()
    assert "Traceback" not in terminal.err.decode()


async def test_device_login_prints_the_code_and_stores_the_account(
    make_mock: MockFactory, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=2, device_interval=0))
    data = tmp_path / "data"
    terminal = await run_login(mock, data, "--device")
    try:
        await terminal.expect(f"Open {mock.root}/codex/device")
        code_line = await terminal.expect("one-time code")
        user_code = code_line.rsplit(" ", 1)[-1]
        await mock.control.approve_login("acct-mock-2", user_code=user_code)
        assert await terminal.finish() == 0, terminal.err
        assert terminal.out.decode().splitlines()[-1] == (
            "imported acct-mock-2 (user2@mock.example, plus)"
        )
        assert "Scan to open" not in terminal.out.decode()  # not a terminal: no QR code
        await assert_no_tokens(mock, terminal, "acct-mock-2")
    finally:
        await close(terminal)
    assert stored_accounts(data) == ["acct-mock-2"]

    # a re-login updates it in place; with --qr the URL is drawn as a QR code too
    again = await run_login(mock, data, "--device", "--qr")
    try:
        await again.expect(f"Scan to open {mock.root}/codex/device")
        user_code = (await again.expect("one-time code")).rsplit(" ", 1)[-1]
        await mock.control.approve_login("acct-mock-2", user_code=user_code)
        assert await again.finish() == 0, again.err
        assert "\u2588" in again.out.decode()  # the code's full blocks
        assert again.out.decode().splitlines()[-1].startswith("updated acct-mock-2 ")
    finally:
        await close(again)
    assert stored_accounts(data) == ["acct-mock-2"]


async def test_device_login_denied_or_interrupted_stores_nothing(
    make_mock: MockFactory, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=1, device_interval=0))
    data = tmp_path / "data"
    denied = await run_login(mock, data, "--device")
    try:
        user_code = (await denied.expect("one-time code")).rsplit(" ", 1)[-1]
        await mock.control.deny_login(user_code=user_code)
        assert await denied.finish() == 1
        assert "login failed: the sign-in was refused" in denied.err.decode()
    finally:
        await close(denied)

    interrupted = await run_login(mock, data, "--device")
    try:
        await interrupted.expect("Ctrl-C cancels")
        interrupted.process.send_signal(signal.SIGINT)
        assert await interrupted.finish() == 130, interrupted.err.decode()
        assert "login cancelled (Ctrl-C); nothing was stored" in interrupted.err.decode()
        assert "Traceback" not in interrupted.err.decode()
    finally:
        await close(interrupted)

    await mock.control.configure(device_code_ttl=0.5)
    expired = await run_login(mock, data, "--device")
    try:
        assert await expired.finish() == 1
        assert "login expired" in expired.err.decode()
    finally:
        await close(expired)
    assert stored_accounts(data) == []


async def test_browser_login_with_the_callback_and_with_a_pasted_url(
    make_mock: MockFactory, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    data = tmp_path / "data"
    terminal = await run_login(mock, data, "--browser", "--callback-port", "0")
    try:
        url = (await terminal.expect("/oauth/authorize?")).strip()
        await terminal.expect("Waiting for the browser's redirect to http://localhost:")
        redirect = await browser_approve(mock, url, "acct-mock-1")
        async with httpx.AsyncClient(timeout=30) as browser:
            landed = await browser.get(redirect.replace("localhost", "127.0.0.1"))
            assert landed.status_code == 200
        assert await terminal.finish() == 0, terminal.err
        assert terminal.out.decode().splitlines()[-1].startswith("imported acct-mock-1 ")
        await assert_no_tokens(mock, terminal, "acct-mock-1")
    finally:
        await close(terminal)

    pasted = await run_login(mock, data, "--browser", "--callback-port", "0")
    try:
        url = (await pasted.expect("/oauth/authorize?")).strip()
        redirect = await browser_approve(mock, url, "acct-mock-2")
        await pasted.type(redirect.replace("state=", "state=x"))  # another login's URL
        await pasted.type(redirect)
        assert await pasted.finish() == 0, pasted.err
        assert "the URL's state is not this login's" in pasted.err.decode()
        assert pasted.out.decode().splitlines()[-1].startswith("imported acct-mock-2 ")
    finally:
        await close(pasted)
    assert stored_accounts(data) == ["acct-mock-1", "acct-mock-2"]


async def test_login_needs_a_flow(tmp_path: Path) -> None:
    result = await trio.run_process(
        [*TRIOPROXY, "accounts", "login", "--data-dir", str(tmp_path / "d")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"choose --device or --browser" in result.stderr


async def test_list_names_the_relogin_command_which_fixes_the_account(
    make_mock: MockFactory, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=2, device_interval=0))
    data = tmp_path / "data"
    for account_id in ("acct-mock-1", "acct-mock-2"):
        auth = await mock.control.auth_json(account_id)
        (tmp_path / f"{account_id}.json").write_text(json.dumps(auth))
        assert (await admin(data, "accounts", "import", str(tmp_path / f"{account_id}.json")))[
            0
        ] == 0
    with Store.open(f"sqlite:///{data / 'trioproxy.db'}", data_dir=data) as store:
        store.set_account_state("acct-mock-2", "reauth_required", "refresh token was revoked")

    code, out = await admin(data, "accounts", "list")
    assert code == 0
    command = f"trioproxy accounts login --device --data-dir {data}"
    assert out.splitlines()[-2:] == [
        "1 account(s) need a new sign-in (their tokens no longer work). Run the command and"
        " sign in as the account; it is updated in place:",
        f"  acct-mock-2 (user2@mock.example, plus): {command}",
    ]
    code, out = await admin(data, "accounts", "list", "--json")
    listed = {a["account_id"]: a for a in json.loads(out)}
    assert listed["acct-mock-2"]["relogin_command"] == command
    assert listed["acct-mock-1"]["relogin_command"] is None

    # the command as printed (its words after `trioproxy`), against the mock's auth server
    terminal = await run_login(mock, data, *command.split()[3:])
    try:
        user_code = (await terminal.expect("one-time code")).rsplit(" ", 1)[-1]
        await mock.control.approve_login("acct-mock-2", user_code=user_code)
        assert await terminal.finish() == 0, terminal.err
        assert terminal.out.decode().splitlines()[-1] == (
            "updated acct-mock-2 (user2@mock.example, plus)"
        )
    finally:
        await close(terminal)
    code, out = await admin(data, "accounts", "list")
    assert code == 0 and "need a new sign-in" not in out
    assert [row.split()[3] for row in out.splitlines()[1:]] == ["active", "active"]


async def admin(data_dir: Path, *args: str) -> tuple[int, str]:
    """A ``trioproxy`` command that ends by itself: exit code and stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOPROXY_")}
    with trio.fail_after(60):
        result = await trio.run_process(
            [*TRIOPROXY, *args, "--data-dir", str(data_dir)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert b"Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout.decode()
