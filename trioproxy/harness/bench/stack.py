"""What the bench runs against: the mock Codex backend and a proxy, each a process of its own
on loopback (started here), or an already running proxy (``--target``) with our mock behind
it (``--mock``).

Both processes run as ``trioproxy mock-upstream`` and ``trioproxy serve`` through
``trio.run_process`` in the caller's nursery: cancelling the nursery sends SIGTERM (and
SIGKILL after five seconds), so the processes never outlive the bench. Their output goes to
``mock.log`` and ``proxy.log`` in the output folder.

With ``keys`` the proxy's store gets that many API keys before the proxy starts (each with
:data:`KEY_POLICY`: budgets checked and charged on every request, never reached), its
clients spread over the keys, and a second proxy without keys (``proxy-nokeys.log``, the
endpoint :data:`NO_KEYS`) runs beside it as the reference of what the keys cost.
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

from trioproxy.config import Settings, load_settings
from trioproxy.harness.mock_upstream.client import MockControl
from trioproxy.keys.policy import parse_policy
from trioproxy.store import Store

MOCK_LIMIT = 1_000_000_000  # requests per window: the bench never exhausts an account by use
NO_KEYS = "proxy_nokeys"  # the endpoint of the proxy without keys beside a proxy with keys
#: the policy of each key the bench creates: every request is checked against its model and
#: effort rules and both budgets and charged to them, and no budget is reached in a run
KEY_POLICY: dict[str, Any] = {
    "budgets": [
        {"window": "5h", "tokens": 10**12, "requests": 10**9},
        {"window": "monthly", "reset": "calendar", "cost_usd": 10**6},
    ],
    "models": ["gpt-*"],
    "max_reasoning_effort": "xhigh",
}


class StackError(Exception):
    """A process of the stack did not start, or a target did not answer."""


@attrs.frozen
class Endpoint:
    """One thing to send load to: the proxy or the mock directly."""

    name: str  # "proxy", "direct" or NO_KEYS
    root: str  # http://host:port
    path: str  # the Responses path, e.g. /backend-api/codex/responses
    headers: tuple[tuple[str, str], ...] = ()
    # headers spread over the clients (client i sends set i % len): direct, one
    # (authorization, account id) pair per account; a proxy with keys, one key's authorization
    account_headers: tuple[tuple[tuple[str, str], ...], ...] = ()
    # the management API's (a proxy with keys: an operator key's); default: client 0's
    operator_headers: tuple[tuple[str, str], ...] | None = None

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

    def management_headers(self) -> dict[str, str]:
        """The headers of a call to the proxy's management API (``/api/...``)."""
        if self.operator_headers is not None:
            return dict(self.operator_headers)
        return dict(self.headers_for(0))


@attrs.define(eq=False)
class Stack:
    proxy: Endpoint
    direct: Endpoint | None
    mock: MockControl | None
    proxy_pid: int | None
    mock_pid: int | None
    managed: bool  # started here (gauges and processes are ours to read)
    accounts: list[str] = attrs.field(factory=list)
    data_dir: Path | None = None  # the started proxy's store
    keys: int = 0  # API keys in that store
    # beside a proxy with keys: the same proxy without keys (NO_KEYS) and its process
    nokeys: Endpoint | None = None
    nokeys_pid: int | None = None


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


def store_settings(data_dir: Path, proxy_options: dict[str, Any]) -> Settings:
    """The settings a proxy started with ``proxy_options`` and ``data_dir`` opens its store
    with (the environment's ``TRIOPROXY_*`` included, as the process inherits them)."""
    overrides: dict[str, Any] = {"data_dir": str(data_dir)}
    for name, value in proxy_options.items():
        name = name.replace("-", "_")
        if name in ("data_dir", "database_url", "secret_key"):
            overrides[name] = value
    return load_settings(overrides=overrides)


def create_keys(settings: Settings, count: int) -> tuple[list[str], str]:
    """``count`` API keys with :data:`KEY_POLICY` and one operator key (no policy: the
    management API takes no other) in the store of ``settings``; their secrets."""
    parse_policy(KEY_POLICY)  # what the management API would refuse is never stored
    with Store.open(
        settings.resolved_database_url, data_dir=settings.data_dir, secret_key=settings.secret_key
    ) as store:
        secrets = [
            store.create_api_key(f"bench-{index}", policy=KEY_POLICY)[1] for index in range(count)
        ]
        return secrets, store.create_api_key("bench-operator")[1]


def _bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def _start_proxy(
    nursery: trio.Nursery,
    workdir: Path,
    name: str,
    mock_root: str,
    proxy_options: dict[str, Any],
    logs: list[TextIO],
    keys: int,
    endpoint: Endpoint,
) -> tuple[trio.Process, Endpoint]:
    """A ``trioproxy serve`` with its store in ``workdir/<name>-data`` (holding ``keys``
    API keys and an operator key, created before it starts) and its log in ``<name>.log``;
    the process, and ``endpoint`` at its address with the keys' headers."""
    host = "127.0.0.1"
    log = (workdir / f"{name}.log").open("w")
    logs.append(log)
    data_dir = workdir / f"{name}-data"
    options = {
        "host": host,
        "port": free_port(),
        "data-dir": str(data_dir),
        "upstream-base-url": f"{mock_root}/backend-api",
        "auth-base-url": mock_root,
        "log-level": "warning",
        "log-format": "json",
        **proxy_options,
    }
    root = f"http://{host}:{options['port']}"
    endpoint = attrs.evolve(endpoint, root=root)
    if keys:
        settings = store_settings(data_dir, proxy_options)
        secrets, operator = await trio.to_thread.run_sync(create_keys, settings, keys)
        endpoint = attrs.evolve(
            endpoint,
            account_headers=tuple(_bearer(secret) for secret in secrets),
            operator_headers=_bearer(operator),
        )
    command = [sys.executable, "-m", "trioproxy.cli", "serve"]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    process = await _start_process(nursery, command, log)
    await wait_ready(f"{root}/health/live")
    return process, endpoint


async def _import_accounts(control: MockControl, account_ids: list[str], proxy: Endpoint) -> None:
    """Give the proxy the mock's accounts (``POST /api/accounts``, as ``trioproxy accounts
    import`` does), then wait until it is ready."""
    headers = proxy.management_headers()
    async with httpx.AsyncClient(timeout=30.0, trust_env=False, headers=headers) as client:
        for account_id in account_ids:
            auth = await control.auth_json(account_id)
            answer = await client.post(f"{proxy.root}/api/accounts", json=auth)
            if answer.status_code not in (200, 201):
                raise StackError(f"importing {account_id} into the proxy: {answer.text}")
    await wait_ready(f"{proxy.root}/health/ready")


async def start_stack(
    nursery: trio.Nursery,
    workdir: Path,
    *,
    accounts: int,
    proxy_options: dict[str, Any],
    logs: list[TextIO],
    path: str = "/backend-api/codex/responses",
    keys: int = 0,
) -> Stack:
    """Start the mock and a proxy in front of it (accounts imported through the management
    API, like ``trioproxy accounts import``); both stop when ``nursery`` is cancelled.

    With ``keys``, the proxy's store holds that many keys (:data:`KEY_POLICY`), the proxy
    endpoint spreads its clients over them, and a second proxy without keys is started
    beside it (``Stack.nokeys``)."""
    host = "127.0.0.1"
    mock_port = free_port()
    mock_log = (workdir / "mock.log").open("w")
    logs.append(mock_log)
    mock_process = await _start_process(
        nursery,
        [
            sys.executable, "-m", "trioproxy.cli", "mock-upstream",
            "--host", host, "--port", str(mock_port),
            "--accounts", str(accounts),
            "--primary-limit", str(MOCK_LIMIT), "--secondary-limit", str(MOCK_LIMIT),
            "--no-record", "--no-record-frames",
        ],
        mock_log,
    )  # fmt: skip
    mock_root = f"http://{host}:{mock_port}"
    await wait_ready(f"{mock_root}/__mock__/health")
    proxy_process, proxy = await _start_proxy(
        nursery, workdir, "proxy", mock_root, proxy_options, logs, keys, Endpoint("proxy", "", path)
    )
    control = MockControl(mock_root)
    direct, account_ids = await direct_endpoint(control, mock_root, path)
    await _import_accounts(control, account_ids, proxy)
    nokeys = nokeys_pid = None
    if keys:
        process, nokeys = await _start_proxy(
            nursery,
            workdir,
            "proxy-nokeys",
            mock_root,
            proxy_options,
            logs,
            0,
            Endpoint(NO_KEYS, "", path),
        )
        nokeys_pid = process.pid
        await _import_accounts(control, account_ids, nokeys)
    return Stack(
        proxy=proxy,
        direct=direct,
        mock=control,
        proxy_pid=proxy_process.pid,
        mock_pid=mock_process.pid,
        managed=True,
        accounts=account_ids,
        data_dir=workdir / "proxy-data",
        keys=keys,
        nokeys=nokeys,
        nokeys_pid=nokeys_pid,
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
