"""Sans-IO protocol pieces: SSE framing, header hygiene, error classification, routing."""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.accounts.pool import Pool, RequestInfo, UnixClock
from trioproxy.protocol.errors import upstream_envelope
from trioproxy.protocol.failures import (
    AccountFailure,
    RequestFailure,
    ServiceFailure,
    classify,
    classify_event,
    parse_body,
)
from trioproxy.protocol.headers import (
    merge_beta,
    response_headers,
    upstream_http_headers,
    upstream_ws_headers,
)
from trioproxy.protocol.sse import SSEFrameSplitter, frame_data
from trioproxy.store import AccountRecord


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_sse_splitter_finds_the_same_frames_whatever_the_chunking(cuts: list[int]) -> None:
    frames = [f'event: e{i}\ndata: {{"type":"e{i}","n":{i}}}\n\n'.encode() for i in range(8)]
    frames.insert(3, b": comment\r\n\r\n")
    stream = b"".join(frames)
    splitter = SSEFrameSplitter()
    out: list[bytes] = []
    position = 0
    for cut in cuts:
        out += splitter.feed(stream[position : position + cut])
        position += cut
    out += splitter.feed(stream[position:])
    assert out == frames
    assert [frame_data(f) for f in out if frame_data(f)] == [
        {"type": f"e{i}", "n": i} for i in range(8)
    ]


def test_http_headers_are_cleaned_and_replaced() -> None:
    client = [
        ("Host", "proxy"), ("Content-Length", "10"), ("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"),
        ("Authorization", "Bearer client"), ("ChatGPT-Account-Id", "theirs"), ("Cookie", "c"), ("Proxy-Foo", "p"),
        ("TE", "trailers"), ("Session-Id", "s1"), ("OpenAI-Beta", "responses=experimental"),
        ("Accept-Encoding", "gzip, zstd"),
    ]  # fmt: skip
    raw = [(k.encode(), v.encode()) for k, v in client]
    out = upstream_http_headers(raw, "tok", "acct-1")
    assert out == [
        (b"session-id", b"s1"),
        (b"openai-beta", b"responses=experimental"),
        (b"authorization", b"Bearer tok"),
        (b"chatgpt-account-id", b"acct-1"),
        (b"accept-encoding", b"identity"),
    ]


def test_websocket_handshake_headers() -> None:
    client = [
        ("Sec-WebSocket-Key", "k"), ("Sec-WebSocket-Extensions", "permessage-deflate"), ("Accept", "*/*"),
        ("Content-Type", "application/json"), ("OpenAI-Beta", "responses=experimental, feature_x=1"),
        ("Upgrade", "websocket"), ("x-codex-turn-state", "ts"),
    ]  # fmt: skip
    out = dict(upstream_ws_headers(client, "tok", "acct-1"))
    assert out == {
        "x-codex-turn-state": "ts",
        "openai-beta": "responses_websockets=2026-02-06, feature_x=1",
        "authorization": "Bearer tok",
        "chatgpt-account-id": "acct-1",
    }
    assert (
        merge_beta(["responses_websockets=2026-02-04"], websocket=True)
        == "responses_websockets=2026-02-06"
    )
    assert merge_beta([], websocket=False) is None


def test_answers_carry_the_upstream_headers_a_client_reads_and_one_request_id() -> None:
    upstream = [
        (b"x-codex-primary-used-percent", b"1"),
        (b"x-codex-turn-state", b"t"),
        (b"openai-model", b"m"),
        (b"set-cookie", b"x"),
        (b"server", b"cf"),
        (b"x-request-id", b"upstream-id"),
        (b"x-other-primary-used-percent", b"2"),
    ]
    head = response_headers("req_1", "sse", upstream=upstream)
    assert [k for k, _ in head] == [
        b"content-type",
        b"cache-control",
        b"x-accel-buffering",
        b"x-request-id",
        b"x-codex-primary-used-percent",
        b"x-codex-turn-state",
        b"openai-model",
        b"x-other-primary-used-percent",
    ]
    assert dict(head)[b"x-request-id"] == b"req_1"
    json_head = response_headers("req_2", length=7, extra=[("retry-after", "2")], close=True)
    assert json_head == [
        (b"content-type", b"application/json"),
        (b"content-length", b"7"),
        (b"connection", b"close"),
        (b"retry-after", b"2"),
        (b"x-request-id", b"req_2"),
    ]


def test_error_classification() -> None:
    def kind(status: int, body: dict[str, object]) -> str:
        return classify(status, body).kind.value

    assert kind(429, {"error": {"type": "usage_limit_reached", "resets_at": 5}}) == "usage_limit"
    assert classify(429, {"error": {"type": "usage_limit_reached", "resets_at": 5}}).resets_at == 5
    assert kind(429, {"error": {"type": "rate_limit_exceeded"}}) == "request"
    assert kind(401, {"error": {"code": "token_invalidated"}}) == "unauthorized"
    assert (
        kind(401, {"error": {"message": "Your OpenAI account has been deactivated"}})
        == "deactivated"
    )
    assert kind(403, {"error": {"message": "This workspace has been disabled"}}) == "deactivated"
    assert kind(402, {}) == "forbidden"
    assert kind(503, {"error": {"code": "server_is_overloaded"}}) == "overloaded"
    assert kind(502, {}) == "server_error"
    assert kind(400, {"error": {"code": "previous_response_not_found"}}) == "continuity"
    assert kind(400, {"error": {"code": "context_length_exceeded"}}) == "request"
    assert parse_body(b"<html>oops</html>")["error"]["message"] == "<html>oops</html>"
    assert parse_body(b'{"detail": "Unauthorized"}')["error"]["message"] == "Unauthorized"
    assert isinstance(classify(402, {}), AccountFailure)
    assert isinstance(classify(503, {"error": {"code": "server_is_overloaded"}}), ServiceFailure)
    assert isinstance(classify(400, {}), RequestFailure)
    failed = classify_event(
        {
            "type": "response.failed",
            "response": {"error": {"code": "usage_limit_reached", "message": "x"}},
        }
    )
    assert failed is not None and failed.kind.value == "usage_limit"
    ws = classify_event({"type": "error", "status": 429, "error": {"type": "usage_limit_reached"}})
    assert ws is not None and ws.kind.value == "usage_limit"


def test_sanitizer_removes_upstream_response_ids() -> None:
    body = {
        "error": {
            "message": "Previous response with id 'resp_abc123' not found.",
            "code": "previous_response_not_found",
        }
    }
    clean = upstream_envelope(body)
    assert "resp_abc123" not in str(clean)
    assert clean["error"]["code"] == "previous_response_not_found"
    assert set(clean["error"]) >= {"message", "type", "code", "param"}


def record(account_id: str, created: float, state: str = "active") -> AccountRecord:
    return AccountRecord(
        account_id=account_id,
        email=f"{account_id}@x",
        plan="plus",
        user_id="u",
        access_token="a",
        refresh_token="r",
        id_token="i",
        access_expires_at=None,
        last_refresh=0.0,
        state=state,
        state_reason=None,
        created_at=created,
        updated_at=created,
    )


def used(pool: Pool, account_id: str, percent: float) -> None:
    pool.learn_headers(account_id, [("x-codex-primary-used-percent", str(percent))])


def make_pool(strategy: str = "headroom") -> Pool:
    pool = Pool(strategy=strategy, clock=UnixClock(offset=1_000_000.0))
    pool.sync(
        [record("a", 1), record("b", 2), record("c", 3), record("d", 4, state="reauth_required")]
    )
    return pool


async def test_headroom_with_soft_stickiness_and_exclusions() -> None:
    pool = make_pool()
    used(pool, "a", 80.0)
    used(pool, "b", 10.0)
    used(pool, "c", 50.0)
    first = pool.select(RequestInfo(session_key="s1"))
    assert (first.chosen, first.reason) == ("b", "headroom")
    assert ("d", "reauth_required") in first.excluded
    used(pool, "b", 95.0)  # b is fuller now, but the session stays
    assert pool.select(RequestInfo(session_key="s1")).reason == "sticky"
    assert pool.select(RequestInfo(session_key="s2")).chosen == "c"
    moved = pool.select(RequestInfo(session_key="s1"), exclude={"b": "usage_limit"})
    assert moved.chosen == "c" and ("b", "usage_limit") in moved.excluded


async def test_exhausted_accounts_are_skipped_until_their_reset() -> None:
    pool = make_pool("fill_first")
    now = pool.clock.now()
    pool.mark_exhausted("a", now + 600)
    assert pool.select(RequestInfo()).chosen == "b"
    pool.mark_exhausted("b", now + 60)
    pool.mark_exhausted("c", now + 300)
    decision = pool.select(RequestInfo())
    assert decision.chosen is None and pool.all_usage_limited()
    assert pool.earliest_reset() == now + 60
    pool.clock.offset = (pool.clock.offset or 0) + 61
    assert pool.select(RequestInfo()).chosen == "b"


async def test_round_robin_rotates() -> None:
    pool = make_pool("round_robin")
    assert [pool.select(RequestInfo(session_key="same")).chosen for _ in range(4)] == [
        "a",
        "b",
        "c",
        "a",
    ]


async def test_sync_keeps_runtime_state_and_drops_removed_accounts() -> None:
    pool = make_pool()
    used(pool, "a", 42.0)
    pool.sync([attrs.evolve(record("a", 1), email="new@x"), record("b", 2)])
    assert set(pool.accounts) == {"a", "b"}
    primary = pool.accounts["a"].quota.primary
    assert primary is not None and primary.used_percent == 42.0
    assert pool.accounts["a"].record.email == "new@x"


def test_passthrough_keeps_what_clients_read_and_codex_headers_what_quota_reads() -> None:
    from trioproxy.protocol.headers import (
        codex_headers,
        passthrough_raw_headers,
    )

    upstream = [
        ("content-type", "text/event-stream"),
        ("x-codex-primary-used-percent", "12"),
        ("x-codex-turn-state", "ts_1"),
        ("openai-model", "gpt-5.5"),
        ("x-oai-primary-reset", "3"),
        ("set-cookie", "a=b"),
        ("x-request-id", "req"),
        ("etag", '"e"'),
    ]
    raw = [(k.encode(), v.encode()) for k, v in upstream]
    assert passthrough_raw_headers(raw) == [
        (b"x-codex-primary-used-percent", b"12"),
        (b"x-codex-turn-state", b"ts_1"),
        (b"openai-model", b"gpt-5.5"),
        (b"x-oai-primary-reset", b"3"),
        (b"etag", b'"e"'),
    ]
    assert codex_headers(raw) == {
        "x-codex-primary-used-percent": "12",
        "x-codex-turn-state": "ts_1",
    }
