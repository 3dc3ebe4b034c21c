"""The server's guards (server.py, web/), through real sockets."""

from __future__ import annotations

import trio

from tests.conftest import MockFactory, ProxyFactory
from tests.helpers import final_text, post_responses, request_body, wait_until
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.web.serving import Server
from trioproxy.web.state import ServerConfig


async def test_malformed_websocket_upgrade_does_not_kill_the_server(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    upgrade = (
        b"GET /backend-api/codex/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    for tail in (b"x", b"\x00", b"\r\n", b"GET / HTTP/1.1\r\n\r\n"):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(upgrade + tail)
        with trio.move_on_after(0.5):
            while await stream.receive_some(4096):
                pass
        await stream.aclose()
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER


async def test_a_client_that_stops_reading_is_cut_off_and_its_upstream_released(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    # an answer of ~80 MB on the wire: far more than the socket buffers between proxy and client
    mock = await make_mock(MockConfig(accounts=1, deltas=4000, delta_bytes=4096))
    proxy = await make_proxy(mock, stalled_client_timeout=2.0)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    body = b'{"model":"gpt-5.5","stream":true,"input":"hi"}'
    await stream.send_all(
        b"POST /backend-api/codex/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await stream.receive_some(1024)  # the answer started; from now on this client reads nothing
    await wait_until(lambda: mock.backend.stats.in_flight == 1)
    # the stalled client keeps its socket open; the proxy must give up on it by itself
    await wait_until(lambda: mock.backend.stats.in_flight == 0, seconds=30)
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200
    await stream.aclose()


class ExplodingStream(trio.abc.HalfCloseableStream):
    """A connection whose socket query fails in a way the server does not expect."""

    def __init__(self) -> None:
        self.closed = False

    @property
    def socket(self) -> object:
        raise RuntimeError("boom: unexpected failure inside one connection")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def test_an_exception_escaping_one_connection_is_contained() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("never reached")

    server = Server(app, ServerConfig())
    stream = ExplodingStream()
    # the failure is logged and closes that connection only; nothing reaches the listener
    await server.handle(stream)  # type: ignore[arg-type]
    assert stream.closed
    assert server.statistics().connections_open == 0
