"""What a request costs the proxy before its turn, through real sockets: a body is read
before the request takes a lane slot (clients that trickle their bodies hold none), and what
parsing a body costs is charged to the request-memory budget (app/responses_http.py,
protocol/requests.py)."""

from __future__ import annotations

import json
from typing import Any

import trio
import zstandard

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import (
    WS_BETA,
    final_text,
    open_ws,
    post_responses,
    request_body,
    user_message,
    wait_until,
    ws_turn,
)
from tests.test_abandonment_storm import admission
from tests.test_web_guards import answer_while_trickling
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.protocol.requests import parse_cost

MIB = 1024 * 1024
JSON = {"content-type": "application/json"}


async def test_a_thousand_trickled_bodies_hold_no_lane_slot(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    """1,000 clients send a request head and then its body at one byte a second, against a
    lane of four slots. A normal client is served all along (its lane is never full: a body
    is read before its request takes a slot), and every trickler is cut with 408 once the
    grace period is over."""
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(
        mock, lane_proxy_http_limit=4, body_min_rate=1024, body_min_rate_grace=2.0
    )
    body = json.dumps(request_body()).encode()
    head = (
        f"POST /backend-api/codex/responses HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    heads_sent = 0
    cut: list[tuple[int, float]] = []
    started = trio.current_time()

    async def trickler() -> None:
        nonlocal heads_sent
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        try:
            await stream.send_all(head)
            heads_sent += 1
            answer = await answer_while_trickling(stream, body, 1.0)
            assert json.loads(answer.body)["error"]["code"] == "request_timeout"
            cut.append((answer.status, trio.current_time() - started))
        finally:
            await trio.aclose_forcefully(stream)

    served: list[int] = []
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(trickler)
            await wait_until(lambda: heads_sent == 1000, seconds=30)
            # the tricklers are inside their grace period: every slot would be theirs if a
            # request took one before its body had come
            for _ in range(20):
                response, events = await post_responses(
                    proxy.client, proxy.codex_url, {}, request_body()
                )
                served.append(response.status_code)
                assert final_text(events) == DEFAULT_ANSWER
                if len(cut) == 1000:
                    break
            stats = await admission(proxy.client, proxy)
    print(
        f"1000 trickled bodies cut after {min(t for _, t in cut):.2f} to "
        f"{max(t for _, t in cut):.2f} s; {len(served)} normal requests meanwhile"
    )
    assert served == [200] * len(served) and len(served) >= 5
    assert {status for status, _ in cut} == {408} and len(cut) == 1000
    assert stats["lanes"]["proxy_http"]["rejected_total"] == 0


async def start_small_budget(
    make_mock: MockFactory, make_proxy: ProxyFactory, limit: int, **options: Any
) -> ProxyEnv:
    mock = await make_mock(MockConfig(accounts=1))
    return await make_proxy(mock, request_memory_limit=limit, **options)


def many_items(count: int) -> dict[str, Any]:
    """A request whose input is ``count`` small items: a small body, many objects."""
    return {**request_body(), "input": [user_message("x") for _ in range(count)]}


async def test_a_body_that_would_parse_past_the_whole_budget_is_refused_413(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await start_small_budget(make_mock, make_proxy, 8 * MIB)
    body = json.dumps(many_items(20_000)).encode()
    assert len(body) < 2 * MIB and parse_cost(body) > 8 * MIB  # small on the wire, not parsed
    response = await proxy.client.post(proxy.codex_url, content=body, headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert "memory" in response.json()["error"]["message"]
    # a zstd body is charged what it inflates to as well
    packed = zstandard.ZstdCompressor().compress(body)
    response = await proxy.client.post(
        proxy.codex_url, content=packed, headers={**JSON, "content-encoding": "zstd"}
    )
    assert response.status_code == 413
    # nothing stays charged, and a normal request is served
    memory = (await admission(proxy.client, proxy))["memory"]["requests"]
    assert memory["held"] == 0 and memory["refused_total"] == 2
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER


async def test_parsed_bodies_share_the_budget_and_give_it_back(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    """A request in flight keeps what its parsed body costs; a second one that the budget
    cannot hold as well gets 429 (memory) while the first runs, and is served after."""
    body = json.dumps(many_items(6_000)).encode()
    cost = parse_cost(body)
    proxy = await start_small_budget(make_mock, make_proxy, int(cost * 1.5))
    await proxy.mock.control.add_fault("slow", first_event_delay=1.5, count=1)
    first: list[int] = []
    async with trio.open_nursery() as nursery:

        async def slow() -> None:
            response = await proxy.client.post(proxy.codex_url, content=body, headers=JSON)
            first.append(response.status_code)

        nursery.start_soon(slow)
        await wait_until(lambda: proxy.mock.backend.stats.in_flight == 1)
        memory = (await admission(proxy.client, proxy))["memory"]["requests"]
        assert memory["held"] >= cost
        refused = await proxy.client.post(proxy.codex_url, content=body, headers=JSON)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "proxy_overloaded"
        assert refused.headers["x-trioproxy-overload"] == "memory"
        assert refused.headers["retry-after"] == "2"
        # the refused request's body was read: the connection carries the next request
        assert refused.headers.get("connection") != "close"
    assert first == [200]
    memory = (await admission(proxy.client, proxy))["memory"]["requests"]
    assert memory["held"] == 0 and memory["reservations"] <= 1  # (this very request's)
    response = await proxy.client.post(proxy.codex_url, content=body, headers=JSON)
    assert response.status_code == 200
    metrics = (await proxy.client.get(f"{proxy.root}/metrics")).text
    assert "trioproxy_request_memory_limit_bytes" in metrics


async def test_json_nested_past_the_stack_is_invalid_json(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    proxy = await start_small_budget(make_mock, make_proxy, 64 * MIB)
    deep = b'{"input":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    response = await proxy.client.post(proxy.codex_url, content=deep, headers=JSON)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200


async def test_websocket_messages_are_charged_until_their_turn_ends(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    """A WebSocket session's messages cost the budget from the moment they are read to the
    end of their turn: one that never fits is refused 413, one that does not fit while
    another turn runs 429 (memory); both as error events, and the session goes on."""
    message = {"type": "response.create", **many_items(6_000)}
    text = json.dumps(message)
    cost = parse_cost(text)
    proxy = await start_small_budget(make_mock, make_proxy, int(cost * 1.6))
    headers = {"openai-beta": WS_BETA}
    async with open_ws(proxy.codex_url, headers) as ws:
        # never fits: the whole input is far larger parsed than the budget
        await ws.send_message(json.dumps({"type": "response.create", **many_items(20_000)}))
        refused = json.loads(await ws.get_message())
        assert refused["type"] == "error" and refused["status"] == 413
        assert refused["error"]["code"] == "payload_too_large"
        # one turn runs (slowly) and holds its message; a second does not fit meanwhile
        await proxy.mock.control.add_fault("slow", first_event_delay=1.0, count=1)
        await ws.send_message(text)
        for _ in range(1000):  # read, charged, and on its way upstream (10 s at most)
            if (await admission(proxy.client, proxy))["memory"]["requests"]["held"] >= cost:
                break
            await trio.sleep(0.01)
        else:
            raise AssertionError("the running turn's message was never charged")
        await ws.send_message(text)
        events: list[dict[str, Any]] = []
        while not events or events[-1].get("type") not in ("response.completed", "error"):
            events.append(json.loads(await ws.get_message()))
        # the refusal comes first (the first turn is still waiting for upstream)
        assert events[0]["type"] == "error" and events[0]["status"] == 429
        assert events[0]["error"]["code"] == "proxy_overloaded"
        while events[-1].get("type") != "response.completed":
            events.append(json.loads(await ws.get_message()))
        # the turn is over: its message is given back, and the next one is served
        answered = await ws_turn(ws, many_items(6_000))
        assert answered[-1]["type"] == "response.completed"
    await wait_until(lambda: proxy.mock.backend.stats.ws_open == 0)
    memory = (await admission(proxy.client, proxy))["memory"]["requests"]
    assert memory["held"] == 0
