"""The proxy's HTTP routes through real sockets, in front of the mock backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import zstandard

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory, start_mock, start_proxy
from tests.helpers import (
    WS_BETA,
    final_text,
    parse_sse,
    post_responses,
    request_body,
    user_message,
)
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER
from trioproxy.upstream.ws import open_upstream_websocket


async def test_sse_turn_is_relayed_as_upstream_sent_it(proxy: ProxyEnv) -> None:
    body = request_body("mock:say relayed")
    direct = await proxy.mock.client.post(
        proxy.mock.responses_url, headers=proxy.mock.auth(), json=body
    )
    response = await proxy.client.post(proxy.codex_url, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    relayed = parse_sse(response.text)
    expected = parse_sse(direct.text)
    assert [e["type"] for e in relayed] == [e["type"] for e in expected]
    assert final_text(relayed) == "relayed"
    # the frames are upstream's bytes: same framing, same JSON text (ids differ per response)
    assert response.text.count("event: ") == direct.text.count("event: ")
    for header in (
        "x-codex-primary-used-percent",
        "x-codex-turn-state",
        "openai-model",
        "x-models-etag",
    ):
        assert header in response.headers


async def test_zstd_body_is_forwarded_byte_for_byte(proxy: ProxyEnv) -> None:
    raw = zstandard.ZstdCompressor().compress(
        json.dumps(request_body("mock:say zstd through")).encode()
    )
    response = await proxy.client.post(
        proxy.codex_url,
        content=raw,
        headers={"content-type": "application/json", "content-encoding": "zstd"},
    )
    assert response.status_code == 200
    assert final_text(parse_sse(response.text)) == "zstd through"
    record = (await proxy.mock.control.model_requests())[-1]
    assert ["content-encoding", "zstd"] in record["headers"]
    assert record["body"]["input"][0]["content"][0]["text"] == "mock:say zstd through"


ALLOWED_EXTRA = {
    "session-id",
    "x-codex-turn-metadata",
    "originator",
    "user-agent",
    "openai-beta",
    "x-codex-window-id",
    "accept",
    "content-type",
    "version",
    "connection",
}


async def test_only_allowed_headers_reach_upstream(mock: MockEnv, make_proxy: ProxyFactory) -> None:
    # the plain HTTP path (a session-id would otherwise send this over the HTTP bridge,
    # whose upstream WebSocket handshake is checked in test_bridge.py)
    # with an API key: a request carrying x-forwarded-for came through a reverse proxy, and
    # is never trusted for being on loopback
    proxy = await make_proxy(mock, bridge_max_sessions=0, api_key=True)
    sent = {
        "authorization": f"Bearer {proxy.api_key}",
        "chatgpt-account-id": "acct-of-the-client",
        "cookie": "session=abc",
        "connection": "keep-alive, x-custom-thing",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "trailer": "x",
        "proxy-authorization": "Basic xyz",
        "proxy-connection": "keep-alive",
        "x-forwarded-for": "10.1.2.3",
        "session-id": "thread-42",
        "x-codex-turn-metadata": '{"turn_id":"t1"}',
        "originator": "codex_exec",
        "openai-beta": "responses=experimental",
        "x-custom-thing": "named in Connection: hop-by-hop",
        "x-codex-window-id": "thread-42:0",
        "version": "0.169.0",
    }
    response = await proxy.client.post(proxy.codex_url, json=request_body(), headers=sent)
    assert response.status_code == 200
    record = (await proxy.mock.control.model_requests())[-1]
    names = [k for k, _ in record["headers"]]
    for dropped in (
        "cookie",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "x-forwarded-for",
        "x-custom-thing",
    ):
        assert dropped not in names, dropped
    headers = dict(record["headers"])
    assert headers.get("connection") != sent["connection"]  # upstream's own hop, not the client's
    account = record["account"]
    assert headers["chatgpt-account-id"] == account != "acct-of-the-client"
    assert headers["authorization"] != f"Bearer {proxy.api_key}"
    assert names.count("authorization") == 1 and names.count("chatgpt-account-id") == 1
    assert headers["session-id"] == "thread-42" and headers["x-codex-window-id"] == "thread-42:0"
    assert headers["accept-encoding"] == "identity"
    unexpected = (
        set(names)
        - ALLOWED_EXTRA
        - {"authorization", "chatgpt-account-id", "host", "content-length", "accept-encoding"}
    )
    assert not unexpected, unexpected


async def test_v1_responses_streaming_and_not(proxy: ProxyEnv) -> None:
    body = {"model": "gpt-5.5", "input": "mock:say plain input", "stream": True}
    response = await proxy.client.post(proxy.v1_url, json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    assert final_text(parse_sse(response.text)) == "plain input"
    response = await proxy.client.post(
        proxy.v1_url, json={"model": "gpt-5.5", "input": "mock:say unary"}
    )
    assert response.status_code == 200
    obj = response.json()
    assert obj["object"] == "response" and obj["status"] == "completed"
    assert obj["output"][0]["content"][0]["text"] == "unary"
    upstream = (await proxy.mock.control.model_requests())[-1]["body"]
    assert upstream["stream"] is True and upstream["store"] is False
    assert upstream["input"][0]["role"] == "user"


async def test_compact_sends_a_compaction_trigger_and_answers_unary(proxy: ProxyEnv) -> None:
    body = {
        "model": "gpt-5.5",
        "instructions": "be brief",
        "input": [
            user_message("first"),
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "ok"}],
            },
        ],
    }
    for path in ("/backend-api/codex/responses/compact", "/v1/responses/compact"):
        response = await proxy.client.post(proxy.root + path, json=body)
        assert response.status_code == 200, response.text
        output = response.json()["output"]
        assert [i.get("role") or i["type"] for i in output] == ["user", "compaction"]
        upstream = (await proxy.mock.control.model_requests())[-1]
        assert upstream["path"] == "/backend-api/codex/responses"
        assert upstream["body"]["input"][-1] == {"type": "compaction_trigger"}
        assert upstream["body"]["stream"] is True


async def test_failover_on_usage_limit_before_the_first_byte(proxy: ProxyEnv) -> None:
    mock = proxy.mock
    session = {"session-id": "thread-1"}  # soft stickiness keeps a conversation on its account
    first = (await post_responses(proxy.client, proxy.codex_url, session, request_body()))[0]
    assert first.status_code == 200
    served_by = (await mock.control.model_requests())[-1]["account"]
    await post_responses(proxy.client, proxy.codex_url, session, request_body())
    assert {r["account"] for r in await mock.control.model_requests()} == {served_by}
    await mock.control.patch_account(served_by, exhaust="primary", resets_in=3600)
    await mock.control.clear_requests()
    response, events = await post_responses(proxy.client, proxy.codex_url, session, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    records = await mock.control.model_requests()
    assert [r["status"] for r in records] == [429, 200]
    assert records[0]["account"] == served_by and records[1]["account"] != served_by
    # the pool learned: the exhausted account is not tried again before its reset
    await mock.control.clear_requests()
    await post_responses(proxy.client, proxy.codex_url, session, request_body())
    assert [r["account"] for r in await mock.control.model_requests()] == [records[1]["account"]]
    accounts = {
        a["account_id"]: a
        for a in (await proxy.client.get(proxy.root + "/api/accounts")).json()["accounts"]
    }
    assert accounts[served_by]["state"] == "exhausted" and accounts[served_by]["exhausted_until"]


async def test_failover_on_server_errors_and_overload(proxy: ProxyEnv) -> None:
    await proxy.mock.control.add_fault("server_error", count=1)
    await proxy.mock.control.add_fault("overloaded", count=1)
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    statuses = [r["status"] for r in await proxy.mock.control.model_requests()]
    assert statuses == [500, 503, 200]


async def test_pool_exhausted_answers_the_usage_limit_429(proxy: ProxyEnv) -> None:
    resets = {"acct-mock-1": 7200, "acct-mock-2": 600, "acct-mock-3": 3600}
    for account, seconds in resets.items():
        await proxy.mock.control.patch_account(account, exhaust="primary", resets_in=seconds)
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == "usage_limit_reached"
    earliest = int(proxy.mock.backend.accounts["acct-mock-2"].primary.reset_at)
    assert abs(error["resets_at"] - earliest) <= 2
    assert int(response.headers["retry-after"]) > 0
    # the proxy now knows: the next request does not even reach upstream
    await proxy.mock.control.clear_requests()
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 429
    assert await proxy.mock.control.model_requests() == []


async def test_refresh_is_single_flight_under_100_concurrent_401s(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    mock = await start_mock(nursery, MockConfig(accounts=1))
    proxy = await start_proxy(nursery, mock, tmp_path)
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True)
    await mock.control.add_fault(
        "stall", on="token", seconds=0.3, count=1
    )  # keep the refresh in flight
    statuses: list[int] = []

    async def one() -> None:
        response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        statuses.append(response.status_code)
        assert final_text(events) == DEFAULT_ANSWER

    async with trio.open_nursery() as group:
        for _ in range(100):
            group.start_soon(one)
    assert statuses == [200] * 100
    assert (await mock.control.stats())["refreshes"] == 1
    assert len(await mock.control.requests(path="/oauth/token")) == 1
    await proxy.client.aclose()
    await mock.client.aclose()
    await mock.control.aclose()


async def test_permanent_refresh_failure_takes_the_account_out(proxy: ProxyEnv) -> None:
    mock = proxy.mock
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True, refresh_mode="invalidated")
    for _ in range(4):
        response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    accounts = {
        a["account_id"]: a
        for a in (await proxy.client.get(proxy.root + "/api/accounts")).json()["accounts"]
    }
    assert accounts["acct-mock-1"]["state"] == "reauth_required"
    assert len(await mock.control.requests(path="/oauth/token")) == 1


async def test_bad_input_gets_clear_errors_and_the_proxy_keeps_serving(
    nursery: trio.Nursery, mock: MockEnv, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, mock, tmp_path, max_body_bytes=4096)
    url = proxy.codex_url
    cases = [
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            {"content": b"[1, 2]", "headers": {"content-type": "application/json"}},
            400,
            "invalid_body",
        ),
        (
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        (
            {"content": b"x" * 5000, "headers": {"content-type": "application/json"}},
            413,
            "payload_too_large",
        ),
        (
            {
                "content": b"\x28\xb5\x2f\xfd garbage",
                "headers": {"content-type": "application/json", "content-encoding": "zstd"},
            },
            400,
            "invalid_body",
        ),
        (
            {
                "content": b"{}",
                "headers": {"content-type": "application/json", "content-encoding": "br"},
            },
            415,
            "unsupported_content_encoding",
        ),
    ]
    for kwargs, status, code in cases:
        response = await proxy.client.post(url, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == status, (code, response.text)
        assert response.json()["error"]["code"] == code
    assert await mock.control.model_requests() == []
    response, events = await post_responses(proxy.client, url, {}, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    missing = await proxy.client.get(proxy.root + "/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    await proxy.client.aclose()


@pytest.mark.parametrize("path", ["/backend-api/codex/models", "/v1/models"])
async def test_models_are_passed_through(proxy: ProxyEnv, path: str) -> None:
    response = await proxy.client.get(proxy.root + path, params={"client_version": "0.169.0"})
    assert response.status_code == 200
    body = response.json()
    if path == "/v1/models":
        assert body["object"] == "list" and "gpt-5.5" in [m["id"] for m in body["data"]]
    else:
        assert "gpt-5.5" in [m["slug"] for m in body["models"]]
        assert response.headers["x-models-etag"]


async def test_request_log_records_every_request(proxy: ProxyEnv) -> None:
    await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    await proxy.client.post(
        proxy.codex_url, content=b"{bad", headers={"content-type": "application/json"}
    )
    with trio.fail_after(10):
        while True:
            rows = (await proxy.client.get(proxy.root + "/api/requests")).json()["requests"]
            if len(rows) >= 2:
                break
            await trio.sleep(0.05)
    bad, good = rows[0], rows[1]
    assert bad["status"] == 400 and bad["error_code"] == "invalid_json"
    assert good["status"] == 200 and good["account_id"].startswith("acct-mock-")
    assert (
        good["input_tokens"] > 0
        and good["ttfb_ms"] is not None
        and good["duration_ms"] >= good["ttfb_ms"]
    )
    assert good["decision"][0]["chosen"] == good["account_id"]


async def test_proactive_refresh_before_use(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    # tokens that expire in 30 s: within the refresh margin, so the proxy refreshes first
    mock = await make_mock(MockConfig(accounts=1, token_ttl=30))
    proxy = await make_proxy(mock)
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    refreshes = await mock.control.requests(path="/oauth/token")
    assert len(refreshes) == 1 and refreshes[0]["body"]["refresh_reason"] == "proactive_expiry"
    turn = (await mock.control.model_requests())[-1]
    fresh = mock.backend.accounts["acct-mock-1"].current_access_token(mock.backend.clock.now())
    assert dict(turn["headers"])["authorization"] == f"Bearer {fresh}"


async def test_transient_refresh_failure_cools_down_and_fails_over(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, routing_strategy="fill_first", refresh_cooldown=600)
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True)
    await mock.control.add_fault("server_error", on="token", status=502)  # the auth server is down
    for _ in range(5):
        response, events = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        assert response.status_code == 200 and final_text(events) == DEFAULT_ANSWER
    # one refresh attempt, then the cooldown: no storm against the auth server
    assert len(await mock.control.requests(path="/oauth/token")) == 1
    served = {r["account"] for r in await mock.control.model_requests() if r["status"] == 200}
    assert served == {"acct-mock-2"}
    accounts = {
        a["account_id"]: a
        for a in (await proxy.client.get(proxy.root + "/api/accounts")).json()["accounts"]
    }
    assert accounts["acct-mock-1"]["state"] == "active"  # transient: still in the pool


async def test_h2_anchored_http_continuation_fails_closed_never_400(proxy: ProxyEnv) -> None:
    body = request_body("more please", previous_response_id="resp_0123456789abcdef")
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, body)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "stream_incomplete"
    assert "resp_" not in response.text


async def test_h3_self_contained_http_request_is_retried_without_the_stale_anchor(
    proxy: ProxyEnv,
) -> None:
    body = request_body("mock:say full resend works", previous_response_id="resp_0123456789abcdef")
    body["input"] = [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "be brief"}],
        },
        *body["input"],
    ]
    response, events = await post_responses(proxy.client, proxy.codex_url, {}, body)
    assert response.status_code == 200 and final_text(events) == "full resend works"
    records = await proxy.mock.control.model_requests()
    assert [r["status"] for r in records] == [400, 200]
    assert "previous_response_id" not in records[1]["body"]


async def test_every_answer_carries_one_request_id_and_upstreams_goes_to_the_log(
    proxy: ProxyEnv,
) -> None:
    answers = [
        await proxy.client.post(proxy.codex_url, json=request_body()),  # SSE
        await proxy.client.post(proxy.v1_url, json={"model": "gpt-5.5", "input": "hi"}),  # JSON
        await proxy.client.post(proxy.codex_url, content=b"{}"),  # the proxy's own error
        await proxy.client.post(
            proxy.codex_url, json=request_body(), headers={"session-id": "conv-ids"}
        ),  # the bridge
    ]
    await proxy.mock.control.add_fault("server_error", status=400, count=3)
    answers.append(await proxy.client.post(proxy.codex_url, json=request_body()))  # upstream's
    assert [a.status_code for a in answers] == [200, 200, 415, 200, 400]
    ids = []
    for answer in answers:
        values = answer.headers.get_list("x-request-id")
        assert len(values) == 1 and values[0].startswith("req_"), answer.headers
        ids.append(values[0])
    url = proxy.codex_url.replace("http://", "ws://", 1)
    async with open_upstream_websocket(url, [("openai-beta", WS_BETA)]) as ws:
        handshake = [v for k, v in ws.handshake_headers if k == "x-request-id"]
        assert len(handshake) == 1 and handshake[0].startswith("req_")
    # the request log keeps upstream's id beside the proxy's
    with trio.fail_after(5):
        while True:
            rows = (await proxy.client.get(f"{proxy.root}/api/requests")).json()["requests"]
            logged = {r["request_id"]: r for r in rows}
            if all(i in logged for i in ids):
                break
            await trio.sleep(0.02)
    for request_id in (ids[0], ids[1], ids[3]):
        upstream_id = logged[request_id]["upstream_request_id"]
        assert upstream_id and upstream_id.startswith("req_") and upstream_id != request_id
    assert logged[ids[2]]["upstream_request_id"] is None  # never went upstream
