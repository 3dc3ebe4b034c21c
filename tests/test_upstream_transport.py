"""The upstream HTTP transport (h11, O(1) idle pool) against the mock: connections are reused
after a body read to its end, closed when a body is abandoned, and errors are httpx's."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from tests.conftest import MockEnv
from tests.helpers import parse_sse, request_body, wait_until
from trioproxy.upstream.transport import LeanTransport, Timeouts


def _client(transport: LeanTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10.0), trust_env=False)


async def test_a_connection_is_reused_after_a_whole_body(mock: MockEnv) -> None:
    transport = LeanTransport()
    async with _client(transport) as client:
        for _ in range(3):
            response = await client.post(
                mock.responses_url, headers=mock.auth(), json=request_body()
            )
            assert response.status_code == 200
            events = parse_sse(response.text)
            assert events[-1]["type"] == "response.completed"
            assert transport.statistics() == {"open": 1, "idle": 1}
        usage = await client.get(f"{mock.base_url}/wham/usage", headers=mock.auth())
        assert usage.json()["plan_type"] == "plus"
        assert transport.statistics() == {"open": 1, "idle": 1}
    assert transport.statistics() == {"open": 0, "idle": 0}


async def test_an_abandoned_body_closes_its_connection(mock: MockEnv) -> None:
    await mock.control.add_fault("slow", event_delay=0.05, count=1)
    transport = LeanTransport()
    async with _client(transport) as client:
        request = client.build_request(
            "POST", mock.responses_url, headers=mock.auth(), content=json.dumps(request_body())
        )
        response = await client.send(request, stream=True)
        chunks = response.aiter_raw()
        first = await chunks.__anext__()
        assert first
        assert transport.statistics() == {"open": 1, "idle": 0}
        await response.aclose()
        assert transport.statistics() == {"open": 0, "idle": 0}
        await wait_until(lambda: mock.backend.stats.http_streams_open == 0)  # the mock saw it


async def test_connect_errors_are_httpx_errors() -> None:
    transport = LeanTransport()
    async with _client(transport) as client:
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # bound, not listening: connection refused
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/")
    assert transport.statistics() == {"open": 0, "idle": 0}


async def test_a_connection_the_server_dropped_is_not_reused(mock: MockEnv) -> None:
    transport = LeanTransport(max_connections=1)
    async with _client(transport) as client:
        await mock.control.add_fault("close_after_created", transport="http", count=1)
        # the stream starts, then the connection drops: httpx's error, the socket closed
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(mock.responses_url, headers=mock.auth(), json=request_body())
        assert transport.statistics() == {"open": 0, "idle": 0}
        response = await client.post(mock.responses_url, headers=mock.auth(), json=request_body())
        assert parse_sse(response.text)[-1]["type"] == "response.completed"
        assert transport.statistics() == {"open": 1, "idle": 1}


async def test_streams_on_the_hot_path_reuse_connections_and_time_out_on_silence(
    mock: MockEnv,
) -> None:
    """``LeanTransport.stream`` and ``relay``: the turn's path (no httpx objects). A body read
    to its end pools the connection; upstream silence past the read timeout (within its
    tenth) ends the relay with ``ReadTimeout`` and closes the connection."""
    transport = LeanTransport()
    timeouts: Timeouts = {"connect": 5.0, "read": 0.5, "write": 5.0, "pool": 5.0}
    headers = [(k.encode(), v.encode()) for k, v in mock.auth().items()]
    headers.append((b"content-type", b"application/json"))
    body = json.dumps(request_body()).encode()
    received = bytearray()

    async def forward(data: bytes) -> None:
        received.extend(data)

    for _ in range(2):
        received.clear()
        response = await transport.stream("POST", mock.responses_url, headers, body, timeouts)
        assert response.status_code == 200
        await response.body.relay(forward)
        await response.aclose()
        assert parse_sse(received.decode())[-1]["type"] == "response.completed"
        assert transport.statistics() == {"open": 1, "idle": 1}
    await mock.control.add_fault("slow", event_delay=3.0, count=1)
    response = await transport.stream("POST", mock.responses_url, headers, body, timeouts)
    started = trio.current_time()
    with pytest.raises(httpx.ReadTimeout):
        await response.body.relay(forward)
    silent = trio.current_time() - started
    assert 0.45 <= silent < 2.0  # 90-100 % of the timeout after the last bytes
    await response.aclose()
    assert transport.statistics() == {"open": 0, "idle": 0}
    await wait_until(lambda: mock.backend.stats.http_streams_open == 0)
    await transport.aclose()
