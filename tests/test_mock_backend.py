"""The mock Codex backend over real sockets: turns, continuity, auth, quota, endpoints."""

from __future__ import annotations

import json
from typing import Any

import trio
import zstandard

from tests.conftest import MockEnv
from tests.helpers import (
    final_text,
    open_ws,
    parse_sse,
    post_responses,
    rejected_upgrade,
    request_body,
    response_id,
    user_message,
    ws_turn,
)
from trioproxy.harness.mock_upstream.accounts import jwt_claims
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER


async def test_sse_text_turn_has_the_full_event_sequence(mock: MockEnv) -> None:
    response, events = await post_responses(
        mock.client, mock.responses_url, mock.auth(), request_body()
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    types = [e["type"] for e in events]
    assert types[0] == "codex.rate_limits"
    assert types[1:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert "response.output_text.delta" in types
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    seqs = [e["sequence_number"] for e in events[1:]]
    assert seqs == list(range(len(seqs)))
    assert final_text(events) == DEFAULT_ANSWER
    completed = events[-1]["response"]
    assert completed["status"] == "completed" and completed["usage"]["total_tokens"] > 0
    for header in (
        "x-codex-primary-used-percent",
        "x-codex-secondary-reset-at",
        "x-codex-turn-state",
        "openai-model",
        "x-models-etag",
    ):
        assert header in response.headers


async def test_sse_accepts_zstd_bodies(mock: MockEnv) -> None:
    raw = json.dumps(request_body("mock:say compressed ok")).encode()
    headers = {**mock.auth(), "content-encoding": "zstd", "content-type": "application/json"}
    response = await mock.client.post(
        mock.responses_url, headers=headers, content=zstandard.ZstdCompressor().compress(raw)
    )
    assert response.status_code == 200
    assert final_text(parse_sse(response.text)) == "compressed ok"
    record = (await mock.control.model_requests())[-1]
    assert record["body"]["input"][0]["content"][0]["text"] == "mock:say compressed ok"


async def test_tool_call_turn_and_follow_up(mock: MockEnv) -> None:
    body = request_body("please mock:exec echo hello-from-tool")
    _, events = await post_responses(mock.client, mock.responses_url, mock.auth(), body)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [i["type"] for i in done] == ["reasoning", "function_call"]
    assert done[0]["encrypted_content"]
    call = done[1]
    assert (
        call["name"] == "exec_command"
        and json.loads(call["arguments"])["cmd"] == "echo hello-from-tool"
    )
    deltas = "".join(
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
    )
    assert deltas == call["arguments"]
    # HTTP follow-up: the full history plus the tool output
    follow = request_body("please mock:exec echo hello-from-tool")
    follow["input"] += [
        *done,
        {
            "type": "function_call_output",
            "call_id": call["call_id"],
            "output": "Process exited with code 0\nOutput:\nhello-from-tool\n",
        },
    ]
    _, events = await post_responses(mock.client, mock.responses_url, mock.auth(), follow)
    assert final_text(events) == "Tool output received: hello-from-tool"


def event_kinds(events: list[dict[str, Any]]) -> list[str]:
    """The event types in order, a run of deltas counted once (their number follows the
    arguments' length)."""
    kinds = [e["type"] for e in events]
    return [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]


async def test_a_scripted_function_call_names_any_function_in_the_same_events(
    mock: MockEnv,
) -> None:
    _, plain = await post_responses(
        mock.client, mock.responses_url, mock.auth(), request_body("mock:exec echo x")
    )
    await mock.control.script(
        {"function_call": {"name": "Bash", "arguments": {"command": "echo hi-from-bash"}}},
        {"function_call": {"name": "Read", "arguments": '{"file_path": "/tmp/x"}'}},
    )
    shapes, names = [], []
    for expected in ({"command": "echo hi-from-bash"}, {"file_path": "/tmp/x"}):
        _, events = await post_responses(
            mock.client, mock.responses_url, mock.auth(), request_body()
        )
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        call = done[-1]
        assert call["type"] == "function_call" and json.loads(call["arguments"]) == expected
        deltas = "".join(
            e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
        )
        assert deltas == call["arguments"]
        shapes.append((event_kinds(events), [sorted(i) for i in done]))
        names.append(call["name"])
    assert names == ["Bash", "Read"]
    # the same events and item shapes as the ``exec_command`` call a directive asks for
    plain_done = [e["item"] for e in plain if e["type"] == "response.output_item.done"]
    for types, items in shapes:
        assert types == event_kinds(plain)
        assert items == [sorted(i) for i in plain_done]
    # a follow-up with the tool's output is answered by quoting it, as for exec_command
    follow = request_body()
    follow["input"] += [
        *done,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "read-it"},
    ]
    _, events = await post_responses(mock.client, mock.responses_url, mock.auth(), follow)
    assert final_text(events) == "Tool output received: read-it"
    bad_entries: list[dict[str, Any]] = [
        {"function_call": {"arguments": {}}},
        {"function_call": {"name": "x", "arguments": 3}},
    ]
    for bad in bad_entries:
        answer = await mock.client.post(f"{mock.root}/__mock__/script", json=[bad])
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_script"


async def test_function_call_output_without_its_call_is_rejected(mock: MockEnv) -> None:
    body = request_body()
    body["input"].append({"type": "function_call_output", "call_id": "call_unknown", "output": "x"})
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), body)
    assert response.status_code == 400
    assert "call_unknown" in response.json()["error"]["message"]


async def test_http_never_knows_a_previous_response_id(mock: MockEnv) -> None:
    _, events = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    rid = response_id(events)
    response, _ = await post_responses(
        mock.client, mock.responses_url, mock.auth(), request_body(previous_response_id=rid)
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error == {
        "message": f"Previous response with id '{rid}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }


async def test_websocket_multi_turn_keeps_state_per_connection(mock: MockEnv) -> None:
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        prewarm = await ws_turn(ws, request_body("warm", generate=False))
        assert [e["type"] for e in prewarm] == [
            "codex.rate_limits",
            "response.created",
            "response.completed",
        ]
        assert prewarm[-1]["response"]["output"] == []
        first = await ws_turn(
            ws, request_body("mock:exec echo hi", previous_response_id=response_id(prewarm))
        )
        call = next(
            e["item"]
            for e in first
            if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"
        )
        # incremental follow-up: only the tool output, the server remembers the call
        second = await ws_turn(
            ws,
            {
                "model": "gpt-5.5",
                "previous_response_id": response_id(first),
                "input": [
                    {"type": "function_call_output", "call_id": call["call_id"], "output": "hi"}
                ],
            },
        )
        assert final_text(second) == "Tool output received: hi"
        assert second[-1]["response"]["usage"]["input_tokens_details"]["cached_tokens"] > 0
        first_id = response_id(first)
    # another connection does not know these ids
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        events = await ws_turn(ws, request_body(previous_response_id=first_id))
        assert events[-1]["type"] == "error" and events[-1]["status"] == 400
        assert events[-1]["error"]["code"] == "previous_response_not_found"
    records = await mock.control.model_requests(transport="ws")
    assert [r["status"] for r in records] == [200, 200, 200, 400]


async def test_websocket_upgrade_carries_rate_limit_headers_and_needs_the_beta(
    mock: MockEnv,
) -> None:
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        assert ws.handshake_headers is not None
        names = {k.decode().lower() for k, _ in ws.handshake_headers}
        assert {"x-codex-primary-used-percent", "x-codex-turn-state", "x-models-etag"} <= names
    rejected = await rejected_upgrade(mock.client, mock.responses_url, mock.auth())
    assert rejected.status_code == 400
    assert rejected.json()["error"]["code"] == "invalid_beta_header"


async def test_inline_compaction_answers_exactly_one_compaction_item(mock: MockEnv) -> None:
    body = request_body()
    body["input"].append({"type": "compaction_trigger"})
    _, events = await post_responses(mock.client, mock.responses_url, mock.auth(), body)
    output = events[-1]["response"]["output"]
    assert [i["type"] for i in output] == ["compaction"] and output[0]["encrypted_content"]
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        events = await ws_turn(ws, body)
    assert [i["type"] for i in events[-1]["response"]["output"]] == ["compaction"]


async def test_legacy_compact_endpoint(mock: MockEnv) -> None:
    body = {
        "model": "gpt-5.5",
        "instructions": "be brief",
        "input": [
            user_message("one"),
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "two"}],
            },
        ],
    }
    response = await mock.client.post(
        f"{mock.base_url}/codex/responses/compact", headers=mock.auth(), json=body
    )
    assert response.status_code == 200
    output = response.json()["output"]
    assert output[0]["role"] == "user" and output[-1]["type"] == "compaction" and len(output) == 2


async def test_auth_failures_are_401(mock: MockEnv) -> None:
    url = mock.responses_url
    cases = {
        "missing_authorization": {},
        "token_invalidated": {
            "authorization": "Bearer not-a-token",
            "chatgpt-account-id": "acct-mock-1",
        },
        "account_mismatch": {**mock.auth("acct-mock-1"), "chatgpt-account-id": "acct-mock-2"},
    }
    for code, headers in cases.items():
        response, _ = await post_responses(mock.client, url, headers, request_body())
        assert response.status_code == 401, code
        assert response.json()["error"]["code"] == code
    headers = mock.auth()
    await mock.control.patch_account("acct-mock-1", expire_tokens=True)
    response, _ = await post_responses(mock.client, url, headers, request_body())
    assert response.status_code == 401 and response.json()["error"]["code"] == "token_expired"
    rejected = await rejected_upgrade(
        mock.client, url, {**headers, "openai-beta": "responses_websockets=2026-02-06"}
    )
    assert rejected.status_code == 401 and rejected.json()["error"]["code"] == "token_expired"


async def test_refresh_rotates_and_detects_reuse(mock: MockEnv) -> None:
    auth = await mock.control.auth_json("acct-mock-2")
    old_refresh = auth["tokens"]["refresh_token"]
    body = {
        "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
        "grant_type": "refresh_token",
        "refresh_reason": "unauthorized_recovery",
        "refresh_token": old_refresh,
    }
    response = await mock.client.post(f"{mock.root}/oauth/token", json=body)
    assert response.status_code == 200
    tokens = response.json()
    assert tokens["refresh_token"] != old_refresh
    claims = jwt_claims(tokens["access_token"])
    assert claims["https://api.openai.com/auth"]["chatgpt_account_id"] == "acct-mock-2"
    assert jwt_claims(tokens["id_token"])["email"] == "user2@mock.example"
    # the new access token works
    headers = {
        "authorization": f"Bearer {tokens['access_token']}",
        "chatgpt-account-id": "acct-mock-2",
    }
    assert (
        await mock.client.get(f"{mock.base_url}/wham/usage", headers=headers)
    ).status_code == 200
    # the old refresh token is spent
    again = await mock.client.post(f"{mock.root}/oauth/token", json=body)
    assert again.status_code == 401 and again.json()["error"]["code"] == "refresh_token_reused"
    unknown = await mock.client.post(
        f"{mock.root}/oauth/token", json={**body, "refresh_token": "rt_nope"}
    )
    assert unknown.json()["error"]["code"] == "refresh_token_invalidated"
    await mock.control.patch_account("acct-mock-2", refresh_mode="expired")
    expired = await mock.client.post(
        f"{mock.root}/oauth/token", json={**body, "refresh_token": tokens["refresh_token"]}
    )
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "refresh_token_expired"
    assert (await mock.control.stats())["refreshes"] == 1


async def test_quota_window_exhaustion_gives_usage_limit_reached(nursery: trio.Nursery) -> None:
    from tests.conftest import start_mock
    from trioproxy.harness.mock_upstream import MockConfig

    env = await start_mock(nursery, MockConfig(accounts=1, primary_limit=2))
    try:
        for _ in range(2):
            response, _ = await post_responses(
                env.client, env.responses_url, env.auth(), request_body()
            )
            assert response.status_code == 200
        assert response.headers["x-codex-primary-used-percent"] == "50.0"
        response, _ = await post_responses(
            env.client, env.responses_url, env.auth(), request_body()
        )
        assert response.status_code == 429
        error = response.json()["error"]
        assert error["type"] == "usage_limit_reached" and error["plan_type"] == "plus"
        assert error["resets_at"] == int(env.backend.accounts["acct-mock-1"].primary.reset_at)
        assert response.headers["x-codex-primary-used-percent"] == "100.0"
        usage = (await env.client.get(f"{env.base_url}/wham/usage", headers=env.auth())).json()
        assert usage["rate_limit"]["limit_reached"] is True
        assert usage["rate_limit"]["primary_window"]["used_percent"] == 100
        # over WebSocket the handshake is accepted and each request (a prewarm too) gets
        # the usage-limit error event, as in the ws_error_429 capture
        async with open_ws(env.responses_url, env.ws_headers()) as ws:
            events = await ws_turn(ws, request_body(generate=False))
            assert events[-1]["type"] == "error" and events[-1]["status"] == 429
            assert events[-1]["error"]["type"] == "usage_limit_reached"
            assert events[-1]["headers"]["x-codex-primary-used-percent"] == "100.0"
    finally:
        await env.client.aclose()
        await env.control.aclose()


async def test_quota_resets_when_the_window_rolls_over(
    mock: MockEnv,
) -> None:
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=600)
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    assert response.status_code == 429
    assert response.json()["error"]["resets_in_seconds"] == 600
    await mock.control.advance_clock(599)
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    assert response.status_code == 429
    await mock.control.advance_clock(2)
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    assert response.status_code == 200


async def test_usage_counts_per_account_and_rate_limit_events(mock: MockEnv) -> None:
    for account in ("acct-mock-1", "acct-mock-1", "acct-mock-2"):
        _, events = await post_responses(
            mock.client, mock.responses_url, mock.auth(account), request_body()
        )
    assert events[0]["type"] == "codex.rate_limits"
    assert set(events[0]["rate_limits"]) == {"primary", "secondary"}
    accounts = {a["account_id"]: a for a in await mock.control.accounts()}
    assert accounts["acct-mock-1"]["requests"] == 2 and accounts["acct-mock-2"]["requests"] == 1
    assert accounts["acct-mock-3"]["requests"] == 0
    usage = (
        await mock.client.get(f"{mock.base_url}/wham/usage", headers=mock.auth("acct-mock-1"))
    ).json()
    assert set(usage) >= {"plan_type", "rate_limit", "credits"}
    assert usage["rate_limit"]["primary_window"]["limit_window_seconds"] == 18000


async def test_models_and_accounts_check(mock: MockEnv) -> None:
    response = await mock.client.get(
        f"{mock.base_url}/codex/models?client_version=0.169.0", headers=mock.auth()
    )
    assert response.status_code == 200 and response.headers["x-models-etag"]
    slugs = [m["slug"] for m in response.json()["models"]]
    assert "gpt-5.5" in slugs
    check = (
        await mock.client.get(f"{mock.base_url}/wham/accounts/check", headers=mock.auth())
    ).json()
    assert check["accounts"][0] == {
        **check["accounts"][0],
        "id": "acct-mock-1",
        "workspace_backend_origin": "https://chatgpt.com",
        "account_routing_override": "NO_CONSTRAINT",
    }
    unknown = await mock.client.get(f"{mock.base_url}/ps/plugins/installed", headers=mock.auth())
    assert unknown.status_code == 404


async def test_every_request_and_frame_is_recorded(mock: MockEnv) -> None:
    async with open_ws(mock.responses_url, {**mock.ws_headers(), "session-id": "thread-1"}) as ws:
        await ws_turn(ws, request_body("one"))
    records = await mock.control.requests(frames=True)
    upgrade = next(r for r in records if r["method"] == "GET")
    assert ["session-id", "thread-1"] in upgrade["headers"]
    directions = [f["dir"] for f in upgrade["frames"]]
    assert directions[0] == "in" and directions.count("out") >= 5
    assert upgrade["frames"][0]["data"]["type"] == "response.create"
    message = next(r for r in records if r["method"] == "WS")
    assert message["parent"] == upgrade["id"] and message["body"]["input"][0]["role"] == "user"
    assert message["account"] == "acct-mock-1" and message["response_id"].startswith("resp_")


async def test_bad_input_gets_clear_errors_and_the_mock_keeps_serving(mock: MockEnv) -> None:
    response = await mock.client.post(
        mock.responses_url,
        headers={**mock.auth(), "content-type": "application/json"},
        content=b"{nope",
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        await ws.send_message("not json")
        event = json.loads(await ws.get_message())
        assert event["type"] == "error" and event["error"]["code"] == "invalid_json"
        await ws.send_message(b"\x00\x01")
        event = json.loads(await ws.get_message())
        assert event["error"]["code"] == "invalid_frame"
        events = await ws_turn(ws, request_body())
        assert events[-1]["type"] == "response.completed"
    # a raw garbage request line
    stream = await trio.open_tcp_stream("127.0.0.1", mock.port)
    await stream.send_all(b"\x16\x03\x01 garbage\r\n\r\n")
    reply = await stream.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 400")
    await stream.aclose()
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    assert response.status_code == 200


async def test_control_api_adds_accounts_and_writes_auth_json(mock: MockEnv) -> None:
    created = await mock.control.add_account(plan="pro", primary_limit=5)
    assert created["account_id"] == "acct-mock-4" and created["plan"] == "pro"
    auth = await mock.control.auth_json("acct-mock-4")
    assert auth["tokens"]["account_id"] == "acct-mock-4"
    claims = jwt_claims(auth["tokens"]["id_token"])
    assert claims["https://api.openai.com/auth"]["chatgpt_plan_type"] == "pro"
    headers = {
        "authorization": f"Bearer {auth['tokens']['access_token']}",
        "chatgpt-account-id": "acct-mock-4",
    }
    response, _ = await post_responses(mock.client, mock.responses_url, headers, request_body())
    assert response.status_code == 200
