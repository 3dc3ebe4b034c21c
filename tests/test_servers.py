"""The proxy behaves the same under both HTTP servers: the project's own (``--server
trioproxy``, the default) and hypercorn's trio worker (``--server hypercorn``). Each check of
the first part runs against each server; the second part checks what only hypercorn brings
(TLS, HTTP/2 over TLS and h2c) and its guards (``trioproxy/serving_hypercorn.py``)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import SERVERS, MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import (
    WS_BETA,
    final_text,
    open_ws,
    parse_sse,
    post_responses,
    rejected_upgrade,
    request_body,
    response_id,
    sdk_stream,
    user_message,
    wait_until,
    ws_turn,
)
from tests.test_abandonment_storm import admission, idle_admission, mock_idle
from tests.test_proxy_lifecycle import direct_settings, seed_accounts
from trioproxy.config import ConfigError, load_settings
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.server import serve_proxy

BETA = {"openai-beta": WS_BETA}
JSON = {"content-type": "application/json"}


# -- the same application under either server ------------------------------------------------
async def test_a_streamed_turn_is_relayed_as_sse(proxy_on_server: ProxyEnv) -> None:
    proxy = proxy_on_server
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"].startswith("req_")
    assert final_text(events) == DEFAULT_ANSWER
    assert events[-1]["type"] == "response.completed"


async def test_a_non_streamed_v1_request_gets_the_completed_response(
    proxy_on_server: ProxyEnv,
) -> None:
    proxy = proxy_on_server
    response = await proxy.client.post(
        proxy.v1_url, json={"model": "gpt-5.5", "input": "mock:say unary"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == "unary"


async def test_a_websocket_session_chains_two_turns(proxy_on_server: ProxyEnv) -> None:
    proxy = proxy_on_server
    async with open_ws(proxy.codex_url, {**BETA, "session-id": "ws-servers"}) as ws:
        first = await ws_turn(ws, request_body("mock:say one"))
        second = await ws_turn(
            ws,
            {
                "model": "gpt-5.5",
                "previous_response_id": response_id(first),
                "input": [user_message("mock:say two")],
            },
        )
    assert final_text(first) == "one" and final_text(second) == "two"
    assert second[-1]["type"] == "response.completed"
    messages = await proxy.mock.control.model_requests(transport="ws")
    assert len({m["parent"] for m in messages}) == 1  # one upstream socket for both turns
    assert messages[1]["body"]["previous_response_id"] == response_id(first)


async def test_an_upgrade_is_refused_with_an_http_answer(proxy_on_server: ProxyEnv) -> None:
    proxy = proxy_on_server
    # the ASGI WebSocket denial extension: an envelope, never an accepted socket
    refused = await rejected_upgrade(proxy.client, f"{proxy.root}/v1/nope", BETA)
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "not_found"


async def test_the_http_bridge_chains_two_turns(proxy_on_server: ProxyEnv) -> None:
    proxy = proxy_on_server
    session = {"session-id": "bridge-servers"}
    first, events = await post_responses(
        proxy.client, proxy.codex_url, session, request_body("mock:say one")
    )
    assert first.status_code == 200 and final_text(events) == "one"
    anchor = response_id(events)
    second, events = await post_responses(
        proxy.client,
        proxy.codex_url,
        session,
        request_body("mock:say two", previous_response_id=anchor),
    )
    assert second.status_code == 200, second.text
    assert final_text(events) == "two"
    messages = await proxy.mock.control.model_requests()
    assert [m["transport"] for m in messages] == ["ws", "ws"]
    assert messages[0]["parent"] == messages[1]["parent"]


async def test_bad_input_gets_error_envelopes(proxy_on_server: ProxyEnv) -> None:
    proxy = proxy_on_server
    malformed = await proxy.client.post(proxy.codex_url, content=b"{not json", headers=JSON)
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "invalid_json"
    text = await proxy.client.post(
        proxy.codex_url, content=b"hello", headers={"content-type": "text/plain"}
    )
    assert text.status_code == 415
    assert text.json()["error"]["code"] == "unsupported_media_type"
    assert await proxy.mock.control.model_requests() == []
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER


async def test_a_client_leaving_mid_stream_gives_everything_back(
    make_mock: MockFactory, make_proxy: ProxyFactory, server: str
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, server=server)
    await mock.control.add_fault("slow", event_delay=0.2, count=1)  # a turn of ~3 s
    async with (
        httpx.AsyncClient(timeout=10) as leaving,
        leaving.stream("POST", proxy.codex_url, json=request_body()) as response,
    ):
        assert response.status_code == 200
        async for _ in response.aiter_bytes():
            break  # the answer started; the client goes away
    await wait_until(lambda: mock_idle(mock), seconds=10)
    # gauges across sockets: polled within a bound
    with trio.fail_after(10):
        while not idle_admission(await admission(proxy.client, proxy)):  # noqa: ASYNC110
            await trio.sleep(0.05)
        while not (rows := await recent_requests(proxy)):  # noqa: ASYNC110
            await trio.sleep(0.05)  # the request log is written in batches
    assert rows[0]["error_code"] == "client_disconnected"


async def recent_requests(proxy: ProxyEnv) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (await proxy.client.get(f"{proxy.root}/api/requests")).json()[
        "requests"
    ]
    return rows


async def test_drain_finishes_a_turn_in_flight_and_serves_new_requests_in_its_grace(
    make_mock: MockFactory, tmp_path: Path, server: str
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    settings = direct_settings(
        mock, tmp_path / "data", server=server, drain_grace=0.5, drain_timeout=10.0
    )
    await seed_accounts(settings, mock, "acct-mock-1")
    await mock.control.add_fault("slow", event_delay=0.1, count=1)  # a turn of ~1.5 s
    shutdown = trio.Event()
    seen: dict[str, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_proxy, settings, shutdown_event=shutdown))
            base = f"http://127.0.0.1:{port}"

            async def in_flight() -> None:
                async with httpx.AsyncClient(timeout=30) as http:
                    response = await http.post(
                        f"{base}/backend-api/codex/responses", json=request_body("mock:say done")
                    )
                    seen["in_flight"] = (response.status_code, final_text(parse_sse(response.text)))

            nursery.start_soon(in_flight)
            await wait_until(lambda: mock.backend.stats.in_flight == 1)
            shutdown.set()  # what SIGTERM does
            await trio.sleep(0.1)
            # inside drain_grace: not ready, but a request a load balancer still sends here
            # is served as usual
            async with httpx.AsyncClient(timeout=10) as http:
                ready = await http.get(f"{base}/health/ready")
                fresh = await http.post(
                    f"{base}/backend-api/codex/responses", json=request_body("mock:say late")
                )
            seen["ready"] = ready.status_code
            seen["fresh"] = (fresh.status_code, final_text(parse_sse(fresh.text)))
    # serve_proxy returned: the listener closed and the turn in flight finished first
    assert seen == {"in_flight": (200, "done"), "ready": 503, "fresh": (200, "late")}
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


# -- the guards, under either server -------------------------------------------------------
UPGRADE = (
    b"GET /backend-api/codex/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOpenAI-Beta: " + WS_BETA.encode() + b"\r\n"
)
MALFORMED = [
    UPGRADE + b"\r\nx",
    UPGRADE + b"\r\n\x00",
    UPGRADE + b"\r\n\r\n",
    UPGRADE + b"\r\nGET / HTTP/1.1\r\n\r\n",
    UPGRADE + b"\r\n\x81\xff" + b"\x00" * 12,  # a frame before the handshake's answer
    # an offer wsproto cannot parse, found when the upgrade is accepted
    UPGRADE + b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=x\r\n\r\n",
    # an h2c upgrade whose settings are not a SETTINGS payload
    b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAAA\r\n\r\n",
]


async def test_a_malformed_upgrade_closes_that_connection_only(
    make_mock: MockFactory, make_proxy: ProxyFactory, server: str
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, server=server)
    for request in MALFORMED:
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as stream:
            await stream.send_all(request)
            with trio.move_on_after(1.0):
                while await stream.receive_some(4096):
                    pass
        response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER, request


async def test_a_client_that_stops_reading_is_cut_off(
    make_mock: MockFactory, make_proxy: ProxyFactory, server: str
) -> None:
    # an answer of ~80 MB on the wire: far more than the socket buffers between proxy and client
    mock = await make_mock(MockConfig(accounts=1, deltas=4000, delta_bytes=4096))
    proxy = await make_proxy(mock, server=server, stalled_client_timeout=2.0)
    body = b'{"model":"gpt-5.5","stream":true,"input":"hi"}'
    async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as stream:
        await stream.send_all(
            b"POST /backend-api/codex/responses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await stream.receive_some(1024)  # the answer started; now this client reads nothing
        assert head.startswith(b"HTTP/1.1 200")
        await wait_until(lambda: mock.backend.stats.in_flight == 1)
        # the stalled client keeps its socket open; the proxy must give up on it by itself
        await wait_until(lambda: mock.backend.stats.in_flight == 0, seconds=30)
        response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        assert response.status_code == 200


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
async def test_a_connection_its_client_closed_is_released_at_once(
    proxy_on_server: ProxyEnv,
) -> None:
    proxy = proxy_on_server
    # warm up: the proxy's own client, its upstream pool and the store are open already
    await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    baseline = open_descriptors()
    for _ in range(10):
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port) as stream:
            await stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        # closed by its client after a request: an idle keep-alive connection
    for _ in range(10):
        async with await trio.open_tcp_stream("127.0.0.1", proxy.port):
            await trio.sleep(0.01)  # accepted, never used, closed by its client
    # both ends of each connection live in this process: all of them must be gone (well
    # before the 75 s keep-alive timeout)
    await wait_until(lambda: open_descriptors() <= baseline, seconds=5)


# -- what only hypercorn brings -------------------------------------------------------------
def test_tls_needs_hypercorn(tmp_path: Path) -> None:
    cert, key, _ = make_certificate(tmp_path)
    with pytest.raises(ConfigError, match="--server hypercorn"):
        load_settings(environ={}, overrides={"certfile": str(cert), "keyfile": str(key)})
    with pytest.raises(ConfigError, match="both"):
        load_settings(environ={}, overrides={"server": "hypercorn", "certfile": str(cert)})
    with pytest.raises(ConfigError, match="unknown server"):
        load_settings(environ={}, overrides={"server": "uvicorn"})
    assert load_settings(environ={}).server == SERVERS[0]


async def test_a_certificate_that_cannot_be_loaded_is_a_config_error(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match="certfile"):
        await make_proxy(mock, server="hypercorn", certfile=str(missing), keyfile=str(missing))


def make_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost: the server's
    chain, its key, and the CA a client trusts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trioproxy test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    cert_path, key_path, ca_path = folder / "server.pem", folder / "server.key", folder / "ca.pem"
    cert_path.write_bytes(leaf.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ca_path.write_bytes(ca.public_bytes(pem))
    return cert_path, key_path, ca_path


async def tls_proxy(
    make_mock: MockFactory, make_proxy: ProxyFactory, folder: Path, **options: Any
) -> tuple[ProxyEnv, ssl.SSLContext]:
    """A proxy on hypercorn serving https with a fresh certificate, and a client TLS context
    that trusts it (the proxy's own client uses it too)."""
    cert, key, ca = make_certificate(folder)
    trust = ssl.create_default_context(cafile=str(ca))
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(
        mock, server="hypercorn", certfile=str(cert), keyfile=str(key), verify=trust, **options
    )
    return proxy, trust


async def test_the_openai_sdk_streams_over_https(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    import openai

    proxy, trust = await tls_proxy(make_mock, make_proxy, tmp_path)
    assert proxy.root.startswith("https://")

    def run() -> tuple[list[str], str]:
        # the SDK's own HTTP client, trusting the test's CA
        with openai.DefaultHttpxClient(verify=trust, timeout=30) as http:
            client = openai.OpenAI(
                base_url=f"{proxy.root}/v1", api_key="unused", http_client=http, max_retries=0
            )
            return sdk_stream(client, "mock:say over tls")

    types, text = await trio.to_thread.run_sync(run)
    assert text == "over tls"
    assert "response.created" in types and types[-1] == "response.completed"
    # a client that does not trust the certificate is refused by its own TLS check
    async with httpx.AsyncClient() as untrusting:
        with pytest.raises(httpx.ConnectError):
            await untrusting.get(f"{proxy.root}/health/live")


async def test_http2_over_tls_serves_streams_and_refusals(
    make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy, trust = await tls_proxy(make_mock, make_proxy, tmp_path, lane_proxy_http_limit=1)
    async with httpx.AsyncClient(http2=True, verify=trust, timeout=30) as h2:
        response, events = await post_responses(h2, proxy.codex_url, {}, request_body())
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
        unary = await h2.post(proxy.v1_url, json={"model": "gpt-5.5", "input": "mock:say h2"})
        assert unary.http_version == "HTTP/2"
        assert unary.json()["output"][0]["content"][0]["text"] == "h2"
        # a refusal whose body was not read carries `Connection: close` over HTTP/1.1; over
        # HTTP/2 that header is not allowed, and the refusal must still arrive
        await proxy.mock.control.add_fault("slow", first_event_delay=1.0, count=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(h2.post, proxy.codex_url, json=request_body()))
            await wait_until(lambda: proxy.mock.backend.stats.in_flight == 1)
            with trio.fail_after(10):
                refused = await h2.post(proxy.codex_url, json=request_body())
        assert refused.http_version == "HTTP/2"
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "proxy_overloaded"


async def test_h2c_by_prior_knowledge(make_mock: MockFactory, make_proxy: ProxyFactory) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, server="hypercorn")
    async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as h2c:
        response, events = await post_responses(h2c, proxy.codex_url, {}, request_body())
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
