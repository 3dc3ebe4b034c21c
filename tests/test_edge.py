"""The edge: foreign Host names, foreign origins, forwarded requests (app/edge.py).

Every request here is real bytes on a loopback socket to a proxy started by the test: the
DNS-rebinding request (a page's own name resolved to 127.0.0.1, so its Host is that name and
its Origin is itself), cross-site requests and WebSocket upgrades from a page of another
origin, and requests through a real HAProxy (Debian's `haproxy`, started by the test on a
free loopback port) that is the reverse proxy on the same host.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import MockEnv, ProxyEnv, ProxyFactory
from tests.helpers import WS_BETA, request_body
from trioproxy.config import ConfigError, load_settings
from trioproxy.server import serve_proxy


async def raw_request(
    port: int, request: bytes, *, source: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is (from the loopback address ``source``, if given) and read
    the answer to its end (the server closes)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(body) >= length[0]:
                        break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(
        (k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])
    )
    return int(lines[0].split()[1]), headers, body


def post(path: str, host: str, body: bytes, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines.append("Connection: close")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def upgrade(path: str, host: str, **headers: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        f"OpenAI-Beta: {WS_BETA}",
    ]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def code_of(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


TURN = json.dumps(request_body()).encode()


async def test_a_rebinding_page_cannot_reach_the_proxy(proxy: ProxyEnv) -> None:
    """A page at http://evil.example:PORT whose name now resolves to 127.0.0.1: same-origin
    with itself, so its browser sends Host and Origin of its own name."""
    evil = f"evil.example:{proxy.port}"
    origin = f"http://{evil}"
    requests = [
        post(
            "/backend-api/codex/responses",
            evil,
            TURN,
            content_type="application/json",
            origin=origin,
        ),
        post("/v1/responses", evil, TURN, content_type="application/json"),
        b"GET /api/accounts HTTP/1.1\r\nHost: " + evil.encode() + b"\r\nConnection: close\r\n\r\n",
        upgrade("/backend-api/codex/responses", evil, origin=origin),
    ]
    for request in requests:
        status, headers, body = await raw_request(proxy.port, request)
        assert status == 421 and code_of(body) == "host_not_allowed", (request[:40], body)
        assert headers["content-type"] == "application/json"
    assert await proxy.mock.control.model_requests() == []  # nothing went upstream
    # probes answer whatever name a load balancer uses; the loopback names and IPs are served
    status, _, _ = await raw_request(
        proxy.port, b"GET /health/ready HTTP/1.1\r\nHost: evil\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    for host in (f"localhost:{proxy.port}", f"127.0.0.1:{proxy.port}", f"[::1]:{proxy.port}"):
        status, _, _ = await raw_request(
            proxy.port,
            post("/backend-api/codex/responses", host, TURN, content_type="application/json"),
        )
        assert status == 200, host


async def test_a_request_without_host_with_two_or_naming_another_authority_is_refused(
    proxy: ProxyEnv,
) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request without Host, or with two, is refused 400; an
    absolute-form target names the host it asks for, and a foreign one is refused 421."""
    here = f"127.0.0.1:{proxy.port}"
    turn = (
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(TURN)}\r\nConnection: close\r\n\r\n"
    ).encode() + TURN
    path = "/backend-api/codex/responses"
    cases = [
        (f"POST {path} HTTP/1.1\r\n".encode() + turn, 400, "bad_request"),
        (
            f"POST {path} HTTP/1.1\r\nHost: {here}\r\nHost: evil.example\r\n".encode() + turn,
            400,
            "bad_request",
        ),
        (
            f"POST http://evil.example{path} HTTP/1.1\r\nHost: {here}\r\n".encode() + turn,
            421,
            "host_not_allowed",
        ),
    ]
    for request, want, code in cases:
        status, _, body = await raw_request(proxy.port, request)
        assert (status, code_of(body)) == (want, code), request[:60]
    assert await proxy.mock.control.model_requests() == []  # nothing went upstream
    # the absolute form naming this proxy is served
    status, _, _ = await raw_request(
        proxy.port, f"POST http://{here}{path} HTTP/1.1\r\nHost: {here}\r\n".encode() + turn
    )
    assert status == 200


async def test_a_page_of_another_origin_cannot_use_the_pool(proxy: ProxyEnv) -> None:
    """Cross-site request forgery and cross-site WebSocket hijacking, as a browser sends them:
    a "simple" text/plain POST needs no preflight; a WebSocket may be opened to any origin."""
    host = f"127.0.0.1:{proxy.port}"
    evil = "http://evil.example"
    forged = post(
        "/backend-api/codex/responses",
        host,
        TURN,
        content_type="text/plain; charset=json",
        origin=evil,
    )
    status, _, body = await raw_request(proxy.port, forged)
    assert status == 403 and code_of(body) == "origin_not_allowed"
    status, _, body = await raw_request(proxy.port, upgrade("/v1/responses", host, origin=evil))
    assert status == 403 and code_of(body) == "origin_not_allowed"
    status, _, body = await raw_request(
        proxy.port, post("/api/accounts", host, b"{}", content_type="application/json", origin=evil)
    )
    assert status == 403 and code_of(body) == "origin_not_allowed"
    assert await proxy.mock.control.model_requests() == []
    # text/plain is not JSON, even without an Origin (curl, or a browser extension)
    status, _, body = await raw_request(
        proxy.port,
        post("/backend-api/codex/responses", host, TURN, content_type="text/plain; charset=json"),
    )
    assert status == 415 and code_of(body) == "unsupported_media_type"
    # the proxy's own origin passes (its dashboard), and so does JSON with parameters
    status, _, _ = await raw_request(
        proxy.port,
        post(
            "/backend-api/codex/responses",
            host,
            TURN,
            content_type="Application/JSON; charset=utf-8",
            origin=f"http://{host}",
        ),
    )
    assert status == 200


async def test_configured_hosts_and_origins_are_served(
    mock: MockEnv, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(
        mock, allowed_hosts="proxy.team.example", allowed_origins="https://tools.team.example"
    )
    request = post(
        "/backend-api/codex/responses",
        "proxy.team.example",
        TURN,
        content_type="application/json",
        origin="https://tools.team.example",
    )
    status, _, _ = await raw_request(proxy.port, request)
    assert status == 200
    status, _, body = await raw_request(
        proxy.port,
        post(
            "/backend-api/codex/responses",
            "other.team.example",
            TURN,
            content_type="application/json",
        ),
    )
    assert status == 421 and code_of(body) == "host_not_allowed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def haproxy(
    tmp_path: Path, backend_port: int, *, forwardfor: bool, source: str = "127.0.0.1"
) -> AsyncIterator[int]:
    """A real HAProxy on a free loopback port in front of ``backend_port``, connecting to it
    from ``source``."""
    binary = shutil.which("haproxy")
    assert binary, "haproxy is not installed (the CI script installs Debian's haproxy)"
    port = free_port()
    config = tmp_path / f"haproxy-{port}.cfg"
    config.write_text(
        "\n".join(
            [
                "global",
                "  maxconn 256",
                "defaults",
                "  mode http",
                "  timeout connect 5s",
                "  timeout client 30s",
                "  timeout server 30s",
                *(["  option forwardfor"] if forwardfor else []),
                "frontend front",
                f"  bind 127.0.0.1:{port}",
                "  default_backend proxy",
                "backend proxy",
                f"  server trioproxy 127.0.0.1:{backend_port} source {source}",
                "",
            ]
        )
    )
    process = await trio.lowlevel.open_process(
        [binary, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        yield port
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_reverse_proxy_on_the_same_host_does_not_make_its_clients_trusted(
    proxy: ProxyEnv, tmp_path: Path
) -> None:
    """HAProxy on this host forwards remote clients: they all arrive from 127.0.0.1, with
    X-Forwarded-For. A keyless proxy serves loopback clients only, and those are not."""
    async with haproxy(tmp_path, proxy.port, forwardfor=True) as front:
        status, _, body = await raw_request(
            front,
            post(
                "/backend-api/codex/responses",
                f"127.0.0.1:{front}",
                TURN,
                content_type="application/json",
            ),
        )
    assert status == 401 and code_of(body) == "api_key_required"
    assert await proxy.mock.control.model_requests() == []


async def test_behind_a_trusted_proxy_the_original_client_is_the_client(
    mock: MockEnv, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    # HAProxy connects from 127.0.0.2, the one trusted address; the test's own client is
    # 127.0.0.1, a peer nobody vouched for
    proxy = await make_proxy(mock, api_key=True, trusted_proxies="127.0.0.2/32")
    key = f"Bearer {proxy.api_key}"
    async with haproxy(tmp_path, proxy.port, forwardfor=True, source="127.0.0.2") as front:
        # a remote client, as far as loopback can show one: 127.0.0.3, claiming another address
        status, headers, _ = await raw_request(
            front,
            source="127.0.0.3",
            request=post(
                "/backend-api/codex/responses",
                f"127.0.0.1:{front}",
                TURN,
                content_type="application/json",
                authorization=key,
                x_forwarded_for="203.0.113.7",
            ),
        )
        assert status == 200
        request_id = headers["x-request-id"]
    # HAProxy added the address it saw (127.0.0.3): the client is the rightmost hop that is
    # not a trusted proxy, and the address the client claimed before it counts for nothing.
    # A peer that is not trusted cannot claim an address at all:
    response = await proxy.client.post(
        proxy.codex_url, json=request_body(), headers={"x-forwarded-for": "198.51.100.9"}
    )
    assert response.status_code == 200
    claimed = response.headers["x-request-id"]
    records = await logged(proxy, [request_id, claimed])
    assert records[request_id]["client"] == "127.0.0.3"
    assert records[claimed]["client"] == "127.0.0.1"


async def test_trusted_proxies_without_a_key_refuse_to_start(mock: MockEnv, tmp_path: Path) -> None:
    settings = load_settings(
        environ={},
        overrides={
            "port": 0,
            "data_dir": str(tmp_path / "data"),
            "upstream_base_url": mock.base_url,
            "trusted_proxies": "10.0.0.0/8",
        },
    )
    with pytest.raises(ConfigError, match="trusted_proxies"), trio.fail_after(10):
        await serve_proxy(settings)  # refuses before it listens
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(environ={}, overrides={"trusted_proxies": "not-a-network"})


async def logged(proxy: ProxyEnv, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The request-log records of ``request_ids``, once written (the log batches)."""
    with trio.fail_after(5):
        while True:
            rows = (await proxy.client.get(f"{proxy.root}/api/requests")).json()["requests"]
            found = {r["request_id"]: r for r in rows if r["request_id"] in request_ids}
            if len(found) == len(request_ids):
                return found
            await trio.sleep(0.02)
