"""Each fault kind of the mock, observed by a client as the real backend would show it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from tests.conftest import MockEnv
from tests.helpers import (
    final_text,
    open_ws,
    parse_sse,
    post_responses,
    rejected_upgrade,
    request_body,
    response_id,
    wait_until,
    ws_turn,
)
from trioproxy.harness.mock_upstream import FaultSpecError, parse_fault_spec

HTTP_ERRORS = [
    ("usage_limit", 429, "usage_limit_reached"),
    ("token_invalidated", 401, "token_invalidated"),
    ("account_deactivated", 401, "account_deactivated"),
    ("server_error", 500, "server_error"),
    ("overloaded", 503, "server_is_overloaded"),
    ("previous_response_not_found", 400, "previous_response_not_found"),
]


def error_code(body: dict[str, Any]) -> str:
    error = body["error"]
    return str(error.get("code") or error.get("type"))


@pytest.mark.parametrize(("kind", "status", "code"), HTTP_ERRORS)
async def test_error_faults_over_http(mock: MockEnv, kind: str, status: int, code: str) -> None:
    await mock.control.add_fault(kind, count=1)
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    assert response.status_code == status
    assert error_code(response.json()) == code
    if kind == "usage_limit":
        error = response.json()["error"]
        assert error["resets_at"] > 0 and error["plan_type"] == "plus"
        assert response.headers["x-codex-primary-used-percent"] == "100.0"
    if kind == "account_deactivated":
        assert "deactivated" in response.json()["error"]["message"]
    # count=1: the next request is served
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    assert response.status_code == 200
    assert (await mock.control.faults()) == []


@pytest.mark.parametrize(("kind", "status", "code"), HTTP_ERRORS)
async def test_error_faults_over_websocket(
    mock: MockEnv, kind: str, status: int, code: str
) -> None:
    await mock.control.add_fault(kind, count=1, transport="ws")
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        events = await ws_turn(ws, request_body())
        event = events[-1]
        assert event["type"] == "error" and event["status"] == status
        assert (event["error"].get("code") or event["error"].get("type")) == code
        if kind == "usage_limit":
            assert event["error"]["resets_at"] > 0
            assert event["headers"]["x-codex-primary-used-percent"] == "100.0"
        # the socket stays usable, as with the real backend's error events
        events = await ws_turn(ws, request_body())
        assert events[-1]["type"] == "response.completed"


async def test_faults_at_the_websocket_upgrade_are_http_answers(mock: MockEnv) -> None:
    await mock.control.add_fault("usage_limit", on="upgrade", count=1)
    await mock.control.add_fault("overloaded", on="upgrade", count=1)
    first = await rejected_upgrade(mock.client, mock.responses_url, mock.ws_headers())
    assert first.status_code == 429 and first.json()["error"]["type"] == "usage_limit_reached"
    second = await rejected_upgrade(mock.client, mock.responses_url, mock.ws_headers())
    assert second.status_code == 503 and second.json()["error"]["code"] == "server_is_overloaded"
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        assert (await ws_turn(ws, request_body()))[-1]["type"] == "response.completed"


async def test_close_1011_before_response_created(mock: MockEnv) -> None:
    await mock.control.add_fault("close_before_created", count=1)
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        await ws.send_message(json.dumps({"type": "response.create", **request_body()}))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1011
    records = await mock.control.requests(method="GET")
    assert records[-1]["close_code"] == 1011 and not records[-1]["open"]


async def test_close_1011_after_response_created(mock: MockEnv) -> None:
    await mock.control.add_fault("close_after_created", count=1, after_events=3)
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        await ws.send_message(json.dumps({"type": "response.create", **request_body()}))
        seen = []
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                seen.append(json.loads(await ws.get_message())["type"])
        assert closed.value.reason is not None and closed.value.reason.code == 1011
    assert seen == [
        "codex.rate_limits",
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]


async def test_close_faults_over_http_drop_the_connection(mock: MockEnv) -> None:
    await mock.control.add_fault("close_before_created", count=1)
    # a drop shows as "disconnected without a response" or as a reset, depending on timing
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await mock.client.post(mock.responses_url, headers=mock.auth(), json=request_body())
    await mock.control.add_fault("close_after_created", count=1, after_events=2)
    async with mock.client.stream(
        "POST", mock.responses_url, headers=mock.auth(), json=request_body()
    ) as response:
        assert response.status_code == 200
        received = b""
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async for chunk in response.aiter_bytes():
                received += chunk
    types = [e["type"] for e in parse_sse(received.decode())]
    assert "response.created" in types and "response.completed" not in types


async def test_previous_response_not_found_even_for_a_known_id(mock: MockEnv) -> None:
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        first = await ws_turn(ws, request_body())
        await mock.control.add_fault("previous_response_not_found", count=1)
        events = await ws_turn(ws, request_body(previous_response_id=response_id(first)))
        assert events[-1]["error"]["code"] == "previous_response_not_found"
        assert events[-1]["error"]["param"] == "previous_response_id"
        # without the fault the same id is known on this connection
        events = await ws_turn(ws, request_body(previous_response_id=response_id(first)))
        assert events[-1]["type"] == "response.completed"


async def test_websocket_connection_limit(mock: MockEnv) -> None:
    await mock.control.add_fault("connection_limit", count=1)
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        events = await ws_turn(ws, request_body())
        assert events[-1]["error"]["code"] == "websocket_connection_limit_reached"
        assert "60 minutes" in events[-1]["error"]["message"]
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_response_failed(mock: MockEnv, transport: str) -> None:
    await mock.control.add_fault(
        "response_failed", count=1, code="context_length_exceeded", message="too long"
    )
    if transport == "http":
        _, events = await post_responses(
            mock.client, mock.responses_url, mock.auth(), request_body()
        )
    else:
        async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
            events = await ws_turn(ws, request_body())
    assert [e["type"] for e in events][-3:] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {
        "code": "context_length_exceeded",
        "message": "too long",
        "type": "invalid_request_error",
    }


async def test_stall_sends_no_byte_for_the_stall(mock: MockEnv) -> None:
    await mock.control.add_fault("stall", count=1, seconds=0.4)
    start = trio.current_time()
    async with mock.client.stream(
        "POST", mock.responses_url, headers=mock.auth(), json=request_body()
    ) as response:
        first_byte_at = trio.current_time()
        body = await response.aread()
    assert first_byte_at - start >= 0.4
    assert final_text(parse_sse(body.decode()))


async def test_stalled_handler_ends_when_the_client_leaves(mock: MockEnv) -> None:
    await mock.control.add_fault("stall", count=1, seconds=3600)
    stats = mock.backend.stats
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: client.post(mock.responses_url, headers=mock.auth(), json=request_body())
        )
        await wait_until(lambda: stats.in_flight == 1)
        nursery.cancel_scope.cancel()
    # the client is gone: the mock's handler must not sit out its hour-long stall
    await wait_until(lambda: stats.in_flight == 0)


async def test_slow_streaming(mock: MockEnv) -> None:
    await mock.control.add_fault(
        "slow", count=1, first_event_delay=0.2, event_delay=0.01, deltas=12
    )
    start = trio.current_time()
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        await ws.send_message(json.dumps({"type": "response.create", **request_body()}))
        await ws.get_message()
        first = trio.current_time() - start
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "response.completed":
            events.append(json.loads(await ws.get_message()))
    assert first >= 0.2
    assert sum(e["type"] == "response.output_text.delta" for e in events) == 12


async def test_fault_scoping_by_account_skip_and_transport(mock: MockEnv) -> None:
    await mock.control.add_fault(
        "server_error", account="acct-mock-2", skip=1, count=1, transport="http"
    )
    statuses = []
    for account in ("acct-mock-1", "acct-mock-2", "acct-mock-2", "acct-mock-2"):
        response, _ = await post_responses(
            mock.client, mock.responses_url, mock.auth(account), request_body()
        )
        statuses.append(response.status_code)
    assert statuses == [200, 200, 500, 200]
    await mock.control.add_fault("server_error", transport="http")
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        assert (await ws_turn(ws, request_body()))[-1]["type"] == "response.completed"
    faults = await mock.control.faults()
    assert len(faults) == 1 and faults[0]["fired"] == 0


async def test_fault_probability(mock: MockEnv) -> None:
    await mock.control.add_fault("overloaded", probability=0.5)
    statuses = [
        (await post_responses(mock.client, mock.responses_url, mock.auth(), request_body()))[
            0
        ].status_code
        for _ in range(40)
    ]
    assert 5 <= statuses.count(503) <= 35 and statuses.count(200) + statuses.count(503) == 40


async def test_faults_on_other_endpoints(mock: MockEnv) -> None:
    await mock.control.add_fault("server_error", on="token", count=1)
    auth = await mock.control.auth_json("acct-mock-1")
    body = {
        "grant_type": "refresh_token",
        "refresh_token": auth["tokens"]["refresh_token"],
        "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
    }
    response = await mock.client.post(f"{mock.root}/oauth/token", json=body)
    assert response.status_code == 500
    response = await mock.client.post(f"{mock.root}/oauth/token", json=body)
    assert response.status_code == 200  # a transient failure did not spend the refresh token
    await mock.control.add_fault("token_invalidated", on="usage", count=1)
    response = await mock.client.get(f"{mock.base_url}/wham/usage", headers=mock.auth())
    assert response.status_code == 401 and response.json()["error"]["code"] == "token_invalidated"


async def test_bad_fault_specs_are_rejected(mock: MockEnv) -> None:
    for spec in (
        {"kind": "nope"},
        {"kind": "stall", "seconds": "x"},
        {"kind": "stall", "bogus": 1},
        {"kind": "stall", "on": "moon"},
    ):
        response = await mock.client.post(f"{mock.root}/__mock__/faults", json=spec)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_fault"
    with pytest.raises(FaultSpecError):
        parse_fault_spec("usage_limit:account")
    fault = parse_fault_spec("usage_limit:account=acct-mock-1,count=2,resets_in=60")
    assert (fault.kind, fault.account, fault.count, fault.params["resets_in"]) == (
        "usage_limit",
        "acct-mock-1",
        2,
        60.0,
    )


async def _turn_events(mock: MockEnv, transport: str, **headers: str) -> list[dict[str, Any]]:
    if transport == "http":
        _, events = await post_responses(
            mock.client, mock.responses_url, {**mock.auth(), **headers}, request_body()
        )
        return events
    async with open_ws(mock.responses_url, {**mock.ws_headers(), **headers}) as ws:
        return await ws_turn(ws, request_body())


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_stream_error_replaces_an_event_of_a_200_stream(
    mock: MockEnv, transport: str
) -> None:
    await mock.control.add_fault("stream_error", count=1)
    events = await _turn_events(mock, transport)
    assert [e["type"] for e in events][-3:] == ["response.created", "response.in_progress", "error"]
    assert "status" not in events[-1]
    assert events[-1]["error"]["code"] == "server_is_overloaded"
    await mock.control.add_fault(
        "stream_error", count=1, event="response.failed", code="server_error", after_events=4
    )
    events = await _turn_events(mock, transport)
    kinds = [e["type"] for e in events]
    assert "response.output_item.added" in kinds and kinds[-1] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    await mock.control.add_fault("stream_error", count=1, status=503)
    assert (await _turn_events(mock, transport))[-1]["status"] == 503
    records = await mock.control.model_requests()
    assert [r["error_code"] for r in records] == [
        "server_is_overloaded",
        "server_error",
        "server_is_overloaded",
    ]


async def test_stream_error_can_be_written_as_multi_line_json(mock: MockEnv) -> None:
    await mock.control.add_fault("stream_error", count=1, pretty=1, transport="http")
    response, events = await post_responses(
        mock.client, mock.responses_url, mock.auth(), request_body()
    )
    error_frame = response.text.split("\n\n")[-2]
    assert error_frame.count("\ndata: ") > 3  # one data: line per line of indented JSON
    assert events[-1]["type"] == "error"
    await mock.control.add_fault("stream_error", count=1, pretty=1, transport="ws")
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        await ws.send_message(json.dumps({"type": "response.create", **request_body()}))
        messages = [await ws.get_message() for _ in range(4)]  # rate limits, created, ...
    assert "\n" in messages[-1] and json.loads(messages[-1])["type"] == "error"


async def test_connection_limit_without_status_and_as_multi_line_json(mock: MockEnv) -> None:
    await mock.control.add_fault("connection_limit", count=1, status=0, pretty=1)
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        await ws.send_message(json.dumps({"type": "response.create", **request_body()}))
        message = await ws.get_message()
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()
    event = json.loads(message)
    assert "\n" in message and "status" not in event
    assert event["error"]["code"] == "websocket_connection_limit_reached"


async def test_response_processed_gets_no_answer(mock: MockEnv) -> None:
    async with open_ws(mock.responses_url, mock.ws_headers()) as ws:
        events = await ws_turn(ws, request_body())
        processed = {"type": "response.processed", "response_id": response_id(events)}
        await ws.send_message(json.dumps(processed))
        # the next message on the socket is the next turn's
        assert (await ws_turn(ws, request_body()))[-1]["type"] == "response.completed"
        await ws.send_message(json.dumps({"type": "response.cancel"}))
        assert json.loads(await ws.get_message())["error"]["code"] == "invalid_message_type"
    assert (await mock.control.stats())["processed_messages"] == 1


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_turn_state_is_issued_per_account_and_a_foreign_one_is_refused(
    mock: MockEnv, transport: str
) -> None:
    response, _ = await post_responses(
        mock.client, mock.responses_url, mock.auth("acct-mock-1"), request_body()
    )
    state = response.headers["x-codex-turn-state"]
    assert state.startswith("ts_acct-mock-1_")
    # echoed to its own account: accepted and given back
    response, _ = await post_responses(
        mock.client,
        mock.responses_url,
        {**mock.auth("acct-mock-1"), "x-codex-turn-state": state},
        request_body(),
    )
    assert response.headers["x-codex-turn-state"] == state
    # echoed to another account: counted; refused when strict
    await mock.control.configure(strict_turn_state=True)
    headers = {"x-codex-turn-state": state}
    if transport == "http":
        response, _ = await post_responses(
            mock.client, mock.responses_url, {**mock.auth("acct-mock-2"), **headers}, request_body()
        )
        status, body = response.status_code, response.json()
    else:
        response = await rejected_upgrade(
            mock.client, mock.responses_url, {**mock.ws_headers("acct-mock-2"), **headers}
        )
        status, body = response.status_code, response.json()
    assert status == 400 and body["error"]["code"] == "invalid_turn_state"
    assert (await mock.control.stats())["foreign_turn_states"] == 1


async def test_weekly_only_accounts_report_no_primary_window(mock: MockEnv) -> None:
    await mock.control.patch_account("acct-mock-1", weekly_only=True)
    response, events = await post_responses(
        mock.client, mock.responses_url, mock.auth(), request_body()
    )
    assert "x-codex-primary-used-percent" not in response.headers
    assert float(response.headers["x-codex-secondary-used-percent"]) >= 0
    limits = next(e for e in events if e["type"] == "codex.rate_limits")["rate_limits"]
    assert limits["primary"] is None and limits["secondary"]["window_minutes"] == 10080
    usage = (await mock.client.get(f"{mock.base_url}/wham/usage", headers=mock.auth())).json()
    assert usage["rate_limit"]["primary_window"] is None
    assert usage["rate_limit"]["secondary_window"]["limit_window_seconds"] == 604800
    # only the weekly window refuses it
    await mock.control.patch_account("acct-mock-1", primary_used=10**6)
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    assert response.status_code == 200
    await mock.control.patch_account("acct-mock-1", exhaust="secondary", resets_in=7200)
    response, _ = await post_responses(mock.client, mock.responses_url, mock.auth(), request_body())
    assert response.status_code == 429
    assert "x-codex-primary-used-percent" not in response.headers


CODEX_CLIENT = "app_EMoamEEZ73f0CkXaXp7hrann"


async def _device_code(mock: MockEnv) -> dict[str, Any]:
    answer = await mock.client.post(
        f"{mock.root}/api/accounts/deviceauth/usercode", json={"client_id": CODEX_CLIENT}
    )
    assert answer.status_code == 200
    return dict(answer.json())


async def _poll(mock: MockEnv, device: dict[str, Any]) -> httpx.Response:
    return await mock.client.post(
        f"{mock.root}/api/accounts/deviceauth/token",
        json={"device_auth_id": device["device_auth_id"], "user_code": device["user_code"]},
    )


async def test_login_faults_at_the_auth_server(mock: MockEnv) -> None:
    await mock.control.configure(device_interval=0)
    # the user code request: 5xx, then slow
    await mock.control.add_fault("server_error", on="usercode", status=503, count=1)
    refused = await mock.client.post(
        f"{mock.root}/api/accounts/deviceauth/usercode", json={"client_id": CODEX_CLIENT}
    )
    assert refused.status_code == 503
    await mock.control.add_fault("slow", on="usercode", first_event_delay=0.3, count=1)
    started = trio.current_time()
    device = await _device_code(mock)
    assert trio.current_time() - started >= 0.3
    assert device["interval"] == "0" and device["user_code"]
    # polls: pending, then each fault's answer, in the real shapes
    pending = await _poll(mock, device)
    assert (pending.status_code, error_code(pending.json())) == (403, "authorization_pending")
    await mock.control.add_fault("slow_down", count=1)
    slowed = await _poll(mock, device)
    assert (slowed.status_code, error_code(slowed.json())) == (403, "slow_down")
    await mock.control.add_fault("expired_code", count=1)
    expired = await _poll(mock, device)
    assert (expired.status_code, error_code(expired.json())) == (400, "expired_token")
    device = await _device_code(mock)
    await mock.control.add_fault("denied", count=1)
    denied = await _poll(mock, device)
    assert (denied.status_code, error_code(denied.json())) == (400, "access_denied")
    # the authorize endpoint: a denial redirects with error=access_denied and the state
    await mock.control.add_fault("denied", on="authorize", count=1)
    query = {
        "response_type": "code",
        "client_id": CODEX_CLIENT,
        "redirect_uri": "http://localhost:1455/auth/callback",
        "code_challenge": "x" * 43,
        "code_challenge_method": "S256",
        "state": "s1",
    }
    redirect = await mock.client.get(f"{mock.root}/oauth/authorize", params=query)
    assert redirect.status_code == 302
    assert redirect.headers["location"].startswith("http://localhost:1455/auth/callback?error=")
    assert redirect.headers["location"].endswith("&state=s1")
    # the code exchange of an approved device code, refused as expired by the fault
    device = await _device_code(mock)
    await mock.control.approve_login("acct-mock-1", user_code=device["user_code"])
    grant = (await _poll(mock, device)).json()
    await mock.control.add_fault("expired_code", on="token", count=1)
    exchange = await mock.client.post(
        f"{mock.root}/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": grant["authorization_code"],
            "redirect_uri": f"{mock.root}/deviceauth/callback",
            "client_id": CODEX_CLIENT,
            "code_verifier": grant["code_verifier"],
        },
    )
    assert (exchange.status_code, error_code(exchange.json())) == (400, "invalid_grant")
    # without a fault: PKCE is checked (a wrong verifier is refused, and spends the code)
    device = await _device_code(mock)
    await mock.control.approve_login("acct-mock-1", user_code=device["user_code"])
    grant = (await _poll(mock, device)).json()
    form = {
        "grant_type": "authorization_code",
        "code": grant["authorization_code"],
        "redirect_uri": f"{mock.root}/deviceauth/callback",
        "client_id": CODEX_CLIENT,
    }
    wrong = await mock.client.post(
        f"{mock.root}/oauth/token", data={**form, "code_verifier": "not-the-verifier"}
    )
    assert "code_verifier" in wrong.json()["error"]["message"]
    spent = await mock.client.post(
        f"{mock.root}/oauth/token", data={**form, "code_verifier": grant["code_verifier"]}
    )
    assert (spent.status_code, error_code(spent.json())) == (400, "invalid_grant")
    with pytest.raises(FaultSpecError, match="slow_down fault applies at deviceauth only"):
        parse_fault_spec("slow_down:on=token")
