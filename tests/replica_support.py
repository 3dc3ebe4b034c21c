"""Several ``trioproxy serve`` processes (replicas) on one PostgreSQL database, behind a real
HAProxy running the shipped ``deploy/haproxy.cfg``, for tests that kill, drain and restart
replicas.

Use::

    async with open_cluster(tmp_path, mock, pg_server.database(), replicas=3) as cluster:
        answer = await client.post(f"{cluster.url}/backend-api/codex/responses",
                                   headers=cluster.headers, json=...)
        await cluster.kill(0)      # SIGKILL; returns when the process is gone
        await cluster.drain(1)     # SIGTERM; returns when it has drained and exited
        await cluster.start(1)     # the same replica again (same name, port and database)
        await cluster.wait_state(1, "UP")   # as HAProxy's health checks see it

What the cluster is made of:

- The mock's accounts and one API key without a policy (``cluster.api_key``, sent by
  ``cluster.headers``) are written to the database before any replica starts. A key is
  needed: HAProxy adds ``X-Forwarded-For``, and the replicas trust it from 127.0.0.1
  (``trusted_proxies``), which makes their clients remote ones.
- Replica *i* is ``trioproxy serve`` named ``replica<i+1>`` (``--replica-name``, the same as
  its server name in HAProxy) on a loopback port chosen once, so that a restarted replica is
  where HAProxy looks for it. Its log (JSON lines) is ``tmp_path/replica<i+1>.log``.
- HAProxy gets the replicas through ``REPLICA_<n>``, its front on ``BIND`` and its status
  page on ``STATS_BIND`` (``cluster.stats_url``); its log is ``tmp_path/haproxy.log``.

Resource handling: processes only, no tasks. Leaving the block stops HAProxy and every
replica by process id (SIGTERM, then SIGKILL after a few seconds), and closes the logs.
Every wait is bounded (``fail_after``) and says what it waited for when it gives up.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import attrs
import httpx
import trio

from tests.conftest import MockEnv

HAPROXY_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
SECRET = "replicas-behind-haproxy-share-this-secret"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DRAIN_LIMIT = 60.0  # a drained replica exits within this (drain_grace + drain_timeout)
STATE_LIMIT = 20.0  # HAProxy sees a replica's new state within this


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define(eq=False)
class Replica:
    """One ``trioproxy serve`` process slot: its name and port stay, its process changes."""

    name: str
    port: int
    log_path: Path
    command: list[str]
    process: trio.Process | None = None
    log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@attrs.define(eq=False)
class Cluster:
    """N replicas behind HAProxy. ``url`` is HAProxy's front; ``headers`` carry the key."""

    port: int
    stats_port: int
    api_key: str
    replicas: list[Replica]
    client: httpx.AsyncClient
    haproxy: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}/stats"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    async def start(self, index: int) -> None:
        """Start replica ``index`` (again) and wait until it answers ``/health/ready``."""
        replica = self.replicas[index]
        assert not replica.running, f"{replica.name} is running"
        if replica.log_file is not None:
            replica.log_file.close()
        replica.log_file = replica.log_path.open("ab")
        replica.process = await trio.lowlevel.open_process(
            replica.command, stdin=None, stdout=replica.log_file, stderr=replica.log_file
        )
        await self._wait_ready(replica)

    async def kill(self, index: int) -> None:
        """SIGKILL replica ``index``; return when the process is gone."""
        process = self.replicas[index].process
        assert process is not None
        process.kill()
        with trio.fail_after(STOP_TIMEOUT):
            await process.wait()

    async def drain(self, index: int) -> int:
        """SIGTERM replica ``index`` (it drains, README "Drain"); return its exit status once
        it has exited (within ``DRAIN_LIMIT`` seconds)."""
        process = self.replicas[index].process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(DRAIN_LIMIT):
            return await process.wait()

    async def served(self) -> list[int | None]:
        """Requests each replica has admitted (proxied HTTP requests and WebSocket sessions),
        from its own ``/api/admission``; ``None`` for a replica that is not running."""
        counts: list[int | None] = []
        for replica in self.replicas:
            if not replica.running:
                counts.append(None)
                continue
            answer = await self.client.get(f"{replica.url}/api/admission", headers=self.headers)
            assert answer.status_code == 200, answer.text
            lanes = answer.json()["lanes"]
            counts.append(
                lanes["proxy_http"]["admitted_total"] + lanes["proxy_websocket"]["admitted_total"]
            )
        return counts

    async def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it (``UP``, ``DOWN``, ``UP 1/2``, ...)."""
        answer = await self.client.get(f"{self.stats_url};csv")
        assert answer.status_code == 200, answer.text
        rows = csv.DictReader(io.StringIO(answer.text.lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "replicas"}

    async def wait_state(self, index: int, state: str) -> None:
        """Wait until HAProxy reports replica ``index`` in ``state`` (``"UP"``, ``"DOWN"``)."""
        name = self.replicas[index].name
        seen = ""
        with trio.move_on_after(STATE_LIMIT):
            while True:
                try:
                    seen = (await self.states()).get(name, "")
                except httpx.TransportError:
                    seen = "(no status page yet)"
                if seen == state:
                    return
                await trio.sleep(0.05)
        raise AssertionError(f"HAProxy sees {name} {seen!r}, not {state!r}, after {STATE_LIMIT} s")

    async def _wait_ready(self, replica: Replica) -> None:
        with trio.move_on_after(START_TIMEOUT):
            while True:
                assert replica.running, f"{replica.name} exited:\n{replica.log_tail()}"
                try:
                    answer = await self.client.get(f"{replica.url}/health/ready")
                    if answer.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)
        raise AssertionError(
            f"{replica.name} not ready in {START_TIMEOUT} s:\n{replica.log_tail()}"
        )

    async def _stop_all(self) -> None:
        processes = [r.process for r in self.replicas if r.process is not None]
        if self.haproxy is not None:
            processes.append(self.haproxy)
        for process in processes:
            if process.returncode is None:
                process.terminate()
        with trio.move_on_after(STOP_TIMEOUT):
            for process in processes:
                await process.wait()
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        for replica in self.replicas:
            if replica.log_file is not None:
                replica.log_file.close()
                replica.log_file = None


def _store_setup(database_url: str, data_dir: Path, auths: list[dict[str, Any]], now: float) -> str:
    """Write the accounts and an operator key to the shared database; return the key."""
    from trioproxy.accounts.authfile import parse_auth_json
    from trioproxy.store import Store

    with Store.open(database_url, data_dir=data_dir, secret_key=SECRET) as store:
        for auth in auths:
            store.upsert_account(parse_auth_json(auth, now=now))
        _, key = store.create_api_key("cluster-operator")
    return key


@asynccontextmanager
async def open_cluster(
    tmp_path: Path,
    mock: MockEnv,
    database_url: str,
    *,
    replicas: int = 3,
    options: Mapping[str, object] | None = None,
    check_interval_ms: int = 250,
) -> AsyncIterator[Cluster]:
    """Start ``replicas`` replicas on ``database_url`` in front of ``mock`` and HAProxy on
    ``deploy/haproxy.cfg`` in front of them; yield when HAProxy sees every replica up.

    ``options`` are more ``trioproxy serve`` options (``{"drain_grace": 1.0}`` becomes
    ``--drain-grace 1.0``). ``check_interval_ms`` is HAProxy's ``CHECK_INTERVAL``.
    """
    binary = shutil.which("haproxy")
    assert binary, "haproxy is not installed (the CI script installs Debian's haproxy)"
    auths = [await mock.control.auth_json(account) for account in mock.account_ids()]
    key = await trio.to_thread.run_sync(
        _store_setup, database_url, tmp_path / "setup", auths, mock.backend.clock.now()
    )
    extra: list[str] = []
    for name, value in (options or {}).items():
        extra += [f"--{name.replace('_', '-')}", str(value)]
    members = []
    for index in range(replicas):
        name, port = f"replica{index + 1}", free_port()
        command = [
            sys.executable, "-m", "trioproxy.cli", "serve",
            "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(tmp_path / name), "--database-url", database_url,
            "--secret-key", SECRET, "--replica-name", name, "--log-format", "json",
            "--upstream-base-url", mock.base_url, "--auth-base-url", mock.root,
            "--usage-poll-interval", "0", "--trusted-proxies", "127.0.0.1",
            *extra,
        ]  # fmt: skip
        members.append(Replica(name, port, tmp_path / f"{name}.log", command))
    client = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
    cluster = Cluster(free_port(), free_port(), key, members, client)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REPLICA_")}
    environment |= {f"REPLICA_{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(members)}
    environment |= {
        "BIND": f"127.0.0.1:{cluster.port}",
        "STATS_BIND": f"127.0.0.1:{cluster.stats_port}",
        "CHECK_INTERVAL": str(check_interval_ms),
    }
    try:
        async with trio.open_nursery() as nursery:
            for index in range(replicas):
                nursery.start_soon(cluster.start, index)
        with (tmp_path / "haproxy.log").open("ab") as haproxy_log:
            cluster.haproxy = await trio.lowlevel.open_process(
                [binary, "-f", str(HAPROXY_CONFIG), "-db"],
                env=environment,
                stdin=None,
                stdout=haproxy_log,
                stderr=haproxy_log,
            )
        for index in range(replicas):
            await cluster.wait_state(index, "UP")
        yield cluster
    finally:
        with trio.CancelScope(shield=True):
            await cluster._stop_all()
            await client.aclose()
