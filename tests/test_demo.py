"""``trioproxy demo`` prints a Codex CLI config and a curl command that work as printed."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.codex_cli import codex_binary_async, hermetic_config, run_codex_exec
from tests.helpers import final_text, parse_sse


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes, seconds: float = 30) -> bytes:
    data = b""
    with trio.fail_after(seconds):
        while marker not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise AssertionError(f"demo ended early: {data.decode(errors='replace')}")
            data += chunk
    return data


@pytest.mark.codex_cli
async def test_demo_config_and_curl_work_as_printed(tmp_path: Path) -> None:
    await codex_binary_async()
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "trioproxy.cli",
            "demo",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        stdout=-1,
        stderr=-1,
    )
    try:
        assert process.stdout is not None
        text = (await read_until(process.stdout, b"curl -N")).decode()
        text += (
            (await read_until(process.stdout, b"\n")).decode()
            if not text.rstrip().endswith("}'")
            else ""
        )
        config = text.split("----8<----")[1].strip() + "\n"
        key = re.search(r"export TRIOPROXY_API_KEY=(\S+)", text)
        assert key is not None
        curl = shlex.split(text[text.index("curl -N") :].splitlines()[0])
        url = curl[2]
        body = json.loads(curl[curl.index("-d") + 1])
        headers = dict(
            h.split(": ", 1) for h in (curl[i + 1] for i, a in enumerate(curl) if a == "-H")
        )
        async with httpx.AsyncClient() as client:
            response = await client.post(url, content=json.dumps(body), headers=headers)
        assert response.status_code == 200
        assert final_text(parse_sse(response.text)) == "hello through trioproxy"

        home = tmp_path / "codex-home"
        home.mkdir()
        # the printed config, plus the switches that keep the CLI off the network in tests
        (home / "config.toml").write_text(config + hermetic_config())
        result = await run_codex_exec(
            home,
            "mock:say hello from the Codex CLI",
            cwd=tmp_path,
            env={"TRIOPROXY_API_KEY": key.group(1)},
        )
        assert result.ok, result.describe()
        assert result.final_message == "hello from the Codex CLI"
    finally:
        process.kill()
        await process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()
