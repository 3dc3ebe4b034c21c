"""The ``trioproxy`` commands as users run them: real processes, real ports."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

TRIOPROXY = [sys.executable, "-m", "trioproxy.cli"]


class LogReader:
    """Reads a process's JSON log lines (stderr), keeping unread lines between calls."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stderr is not None
        self.stream = process.stderr
        self.buffer = b""
        self.lines: list[bytes] = []
        self.seen: list[str] = []

    async def expect(self, event: str, seconds: float = 30) -> dict[str, Any]:
        with trio.fail_after(seconds):
            while True:
                while self.lines:
                    line = self.lines.pop(0)
                    self.seen.append(line.decode(errors="replace"))
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and record.get("event") == event:
                        return record
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"process ended before logging {event!r}: {self.seen}")
                self.buffer += chunk
                *lines, self.buffer = self.buffer.split(b"\n")
                self.lines += lines


async def test_serve_answers_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process = await trio.lowlevel.open_process(
        [*TRIOPROXY, "serve", "--port", "0", "--data-dir", str(data), "--log-format", "json"],
        stderr=-1,
    )
    try:
        log = LogReader(process)
        serving = await log.expect("serving")
        url = serving["url"]
        hint = await log.expect("no accounts yet")
        assert "accounts import" in hint["hint"]
        async with httpx.AsyncClient(base_url=url) as client:
            live = await client.get("/health/live")
            assert live.status_code == 200 and live.json() == {"status": "ok"}
            assert (await client.get("/health/ready")).status_code == 200
            missing = await client.get("/nope")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
        assert data.is_dir()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def test_serve_rejects_bad_configuration(tmp_path: Path) -> None:
    result = await trio.run_process(
        [*TRIOPROXY, "serve", "--port", "0"],
        env={"TRIOPROXY_PROT": "1", "PATH": "/usr/bin:/bin"},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"unknown environment variable TRIOPROXY_PROT" in result.stderr


async def test_mock_upstream_command(tmp_path: Path) -> None:
    auth_dir = tmp_path / "auth"
    scenario = tmp_path / "scenario.toml"
    scenario.write_text('primary_limit = 50\n\n[[faults]]\nkind = "overloaded"\ncount = 1\n')
    process = await trio.lowlevel.open_process(
        [
            *TRIOPROXY,
            "mock-upstream",
            "--port",
            "0",
            "--accounts",
            "3",
            "--write-auth",
            str(auth_dir),
            "--scenario",
            str(scenario),
            "--fault",
            "server_error:status=502,count=1,skip=1",
        ],
        stderr=-1,
    )
    try:
        started = await LogReader(process).expect("mock backend serving")
        assert started["accounts"] == ["acct-mock-1", "acct-mock-2", "acct-mock-3"]
        assert [f["kind"] for f in started["faults"]] == ["overloaded", "server_error"]
        auth = json.loads((auth_dir / "acct-mock-3" / "auth.json").read_text())
        headers = {
            "authorization": f"Bearer {auth['tokens']['access_token']}",
            "chatgpt-account-id": auth["tokens"]["account_id"],
        }
        body = {"model": "gpt-5.5", "input": [{"type": "message", "role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=started["url"]) as client:
            statuses = [
                (await client.post("/codex/responses", headers=headers, json=body)).status_code
                for _ in range(3)
            ]
            # faults are checked in order: request 1 is answered by the first, so the
            # second (skip=1) lets request 2 through and fires on request 3
            assert statuses == [503, 200, 502]
            usage = (await client.get("/wham/usage", headers=headers)).json()
            assert usage["rate_limit"]["primary_window"]["used_percent"] == 2  # 1 of 50
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def test_serve_refuses_a_public_address_without_api_keys(tmp_path: Path) -> None:
    result = await trio.run_process(
        [
            *TRIOPROXY,
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"refusing to listen on 0.0.0.0 with no API key" in result.stderr
