"""What the bench runs against: the mock Codex backend and a proxy, each a process of its own
on loopback (started here), or an already running proxy (``--target``) with our mock behind
it (``--mock``).

Both processes run as ``trioproxy mock-upstream`` and ``trioproxy serve`` through
``trio.run_process`` in the caller's nursery: cancelling the nursery sends SIGTERM (and
SIGKILL after five seconds), so the processes never outlive the bench. Their output goes to
``mock.log`` and ``proxy.log`` in the output folder.
"""

from __future__ import annotations

import socket
import sys
from functools import partial
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from trioproxy.harness.mock_upstream.client import MockControl

MOCK_LIMIT = 1_000_000_000  # requests per window: the bench never exhausts an account by use


class StackError(Exception):
    """A process of the stack did not start, or a target did not answer."""


@attrs.frozen
class Endpoint:
    """One thing to send load to: the proxy or the mock directly."""

    name: str  # "proxy" or "direct"
    root: str  # http://host:port
    path: str  # the Responses path, e.g. /backend-api/codex/responses
    headers: tuple[tuple[str, str], ...] = ()
    # direct: one (authorization, account id) header pair per account, spread over clients
    account_headers: tuple[tuple[tuple[str, str], ...], ...] = ()

    @property
    def host(self) -> str:
        return urlsplit(self.root).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.root)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def ws_url(self) -> str:
        return self.root.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + self.path

    def headers_for(self, client: int) -> list[tuple[str, str]]:
        extra = (
            self.account_headers[client % len(self.account_headers)] if self.account_headers else ()
        )
        return [*self.headers, *extra]


@attrs.define(eq=False)
class Stack:
    proxy: Endpoint
    direct: Endpoint | None
    mock: MockControl | None
    proxy_pid: int | None
    mock_pid: int | None
    managed: bool  # started here (gauges and processes are ours to read)
    accounts: list[str] = attrs.field(factory=list)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_ready(url: str, seconds: float = 30.0) -> None:
    """Poll ``url`` until it answers 200 (a process that just started)."""
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        with trio.move_on_after(seconds):
            while True:
                try:
                    if (await client.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)
    raise StackError(f"{url} did not answer within {seconds:.0f} s")


async def _start_process(nursery: trio.Nursery, command: list[str], log: TextIO) -> trio.Process:
    process: trio.Process = await nursery.start(
        partial(trio.run_process, command, check=False, stdout=log, stderr=log)
    )
    return process


async def direct_endpoint(control: MockControl, root: str, path: str) -> tuple[Endpoint, list[str]]:
    """The mock as a target: every account's bearer token and account id."""
    accounts = [a["account_id"] for a in await control.accounts()]
    pairs = []
    for account_id in accounts:
        tokens = (await control.auth_json(account_id))["tokens"]
        pairs.append(
            (
                ("authorization", f"Bearer {tokens['access_token']}"),
                ("chatgpt-account-id", tokens["account_id"]),
            )
        )
    return Endpoint("direct", root, path, account_headers=tuple(pairs)), accounts


async def start_stack(
    nursery: trio.Nursery,
    workdir: Path,
    *,
    accounts: int,
    proxy_options: dict[str, Any],
    logs: list[TextIO],
    path: str = "/backend-api/codex/responses",
) -> Stack:
    """Start the mock and a proxy in front of it (accounts imported through the management
    API, like ``trioproxy accounts import``); both stop when ``nursery`` is cancelled."""
    host = "127.0.0.1"
    python = sys.executable
    mock_port, proxy_port = free_port(), free_port()
    mock_log = (workdir / "mock.log").open("w")
    proxy_log = (workdir / "proxy.log").open("w")
    logs += [mock_log, proxy_log]
    mock_process = await _start_process(
        nursery,
        [
            python, "-m", "trioproxy.cli", "mock-upstream",
            "--host", host, "--port", str(mock_port),
            "--accounts", str(accounts),
            "--primary-limit", str(MOCK_LIMIT), "--secondary-limit", str(MOCK_LIMIT),
            "--no-record", "--no-record-frames",
        ],
        mock_log,
    )  # fmt: skip
    mock_root = f"http://{host}:{mock_port}"
    await wait_ready(f"{mock_root}/__mock__/health")
    data_dir = workdir / "proxy-data"
    options = {
        "host": host,
        "port": proxy_port,
        "data-dir": str(data_dir),
        "upstream-base-url": f"{mock_root}/backend-api",
        "auth-base-url": mock_root,
        "log-level": "warning",
        "log-format": "json",
        **proxy_options,
    }
    command = [python, "-m", "trioproxy.cli", "serve"]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    proxy_process = await _start_process(nursery, command, proxy_log)
    proxy_root = f"http://{host}:{proxy_port}"
    await wait_ready(f"{proxy_root}/health/live")
    control = MockControl(mock_root)
    direct, account_ids = await direct_endpoint(control, mock_root, path)
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
        for account_id in account_ids:
            auth = await control.auth_json(account_id)
            answer = await client.post(f"{proxy_root}/api/accounts", json=auth)
            if answer.status_code not in (200, 201):
                raise StackError(f"importing {account_id} into the proxy: {answer.text}")
    await wait_ready(f"{proxy_root}/health/ready")
    return Stack(
        proxy=Endpoint("proxy", proxy_root, path),
        direct=direct,
        mock=control,
        proxy_pid=proxy_process.pid,
        mock_pid=mock_process.pid,
        managed=True,
        accounts=account_ids,
    )


async def attach_stack(
    target: str,
    *,
    mock_url: str | None,
    api_key: str | None,
    proxy_pid: int | None,
    path: str,
) -> Stack:
    """An already running proxy at ``target`` (and, with ``mock_url``, our mock behind it,
    used as the direct baseline and for fault injection)."""
    headers = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    proxy = Endpoint("proxy", target.rstrip("/"), path, headers=headers)
    control = None
    direct = None
    accounts: list[str] = []
    if mock_url:
        root = mock_url.rstrip("/")
        await wait_ready(f"{root}/__mock__/health", 10.0)
        control = MockControl(root)
        direct, accounts = await direct_endpoint(control, root, path)
    return Stack(
        proxy=proxy,
        direct=direct,
        mock=control,
        proxy_pid=proxy_pid,
        mock_pid=None,
        managed=False,
        accounts=accounts,
    )
