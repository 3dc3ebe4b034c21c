"""However upstream's answer is cut into reads, every route gets it whole.

A fast upstream or a short answer arrives in one read (the mock's ``whole`` segmentation: the
head, every event and the end of the body in one write); a slow network cuts events anywhere
(``split``: events cut mid-line, WebSocket messages in fragments). Each route, streamed or
aggregated, over HTTP, the bridge and WebSocket, the Chat Completions and Messages fronts
included, must give the client the complete answer,
and the request log must record the turn as completed, with its usage.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
import trio

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import final_text, open_ws, request_body, user_message, ws_turn
from trioproxy.harness.mock_upstream import MockConfig

MODES = ["whole", "split"]
ANSWER = "every event of this answer arrives"


async def start(make_mock: MockFactory, make_proxy: ProxyFactory, mode: str) -> ProxyEnv:
    mock = await make_mock(MockConfig(accounts=2, segmentation=mode, deltas=4, seed=7))
    return await make_proxy(mock)


async def log_record(proxy: ProxyEnv, request_id: str) -> dict[str, Any]:
    """The request's record, once the log writer has written it (it batches)."""
    with trio.fail_after(5):
        while True:
            response = await proxy.client.get(proxy.root + "/api/requests?limit=50")
            for row in response.json()["requests"]:
                if row["request_id"] == request_id:
                    return dict(row)
            await trio.sleep(0.02)


def completed_record(record: dict[str, Any]) -> None:
    assert record["status"] == 200 and record["error_code"] is None, record
    assert record["input_tokens"] and record["output_tokens"], record


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bridged", [False, True], ids=["http", "bridge"])
async def test_a_streamed_answer_is_relayed_whole_and_logged_as_completed(
    make_mock: MockFactory, make_proxy: ProxyFactory, mode: str, bridged: bool
) -> None:
    proxy = await start(make_mock, make_proxy, mode)
    headers = {"session-id": secrets.token_hex(4)} if bridged else {}
    async with proxy.client.stream(
        "POST", proxy.codex_url, headers=headers, json=request_body(f"mock:say {ANSWER}")
    ) as response:
        assert response.status_code == 200
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        request_id = response.headers["x-request-id"]
    events = [
        json.loads(line[5:])
        for line in body.decode().splitlines()
        if line.startswith("data:") and "keepalive" not in line
    ]
    assert final_text(events) == ANSWER
    assert events[-1]["type"] == "response.completed"
    completed_record(await log_record(proxy, request_id))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bridged", [False, True], ids=["http", "bridge"])
async def test_a_non_streamed_answer_is_aggregated_from_every_event(
    make_mock: MockFactory, make_proxy: ProxyFactory, mode: str, bridged: bool
) -> None:
    proxy = await start(make_mock, make_proxy, mode)
    headers = {"session-id": secrets.token_hex(4)} if bridged else {}
    body = {"model": "gpt-5.5", "input": f"mock:say {ANSWER}"}  # stream: false by default
    response = await proxy.client.post(proxy.v1_url, headers=headers, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == "completed"
    texts = [
        part["text"]
        for item in answer["output"]
        if item["type"] == "message"
        for part in item["content"]
    ]
    assert texts == [ANSWER]
    completed_record(await log_record(proxy, response.headers["x-request-id"]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["/backend-api/codex/responses/compact", "/v1/responses/compact"])
async def test_a_compaction_is_answered_from_every_event(
    make_mock: MockFactory, make_proxy: ProxyFactory, mode: str, path: str
) -> None:
    proxy = await start(make_mock, make_proxy, mode)
    body = {"model": "gpt-5.5", "input": [user_message("first"), user_message("second")]}
    response = await proxy.client.post(proxy.root + path, json=body)
    assert response.status_code == 200, response.text
    output = response.json()["output"]
    assert [i.get("type", "message") for i in output] == ["message", "message", "compaction"]
    completed_record(await log_record(proxy, response.headers["x-request-id"]))


@pytest.mark.parametrize("mode", MODES)
async def test_a_websocket_turn_is_relayed_whole(
    make_mock: MockFactory, make_proxy: ProxyFactory, mode: str
) -> None:
    proxy = await start(make_mock, make_proxy, mode)
    async with open_ws(proxy.codex_url, {"openai-beta": "responses_websockets=2026-02-06"}) as ws:
        for _ in range(2):
            events = await ws_turn(ws, request_body(f"mock:say {ANSWER}"))
            assert final_text(events) == ANSWER
            assert events[-1]["type"] == "response.completed"


def front_answer(front: str, stream: bool, body: bytes) -> str:
    """The answer's text as a Chat Completions or Messages client reads it."""
    if not stream:
        value = json.loads(body)
        if front == "chat":
            return str(value["choices"][0]["message"]["content"])
        return "".join(b["text"] for b in value["content"] if b["type"] == "text")
    text = ""
    lines = [line for line in body.decode().splitlines() if line]
    if front == "chat":
        assert lines[-1] == "data: [DONE]", lines[-3:]
    else:
        assert json.loads(lines[-1][5:])["type"] == "message_stop", lines[-3:]
    for line in lines:
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        if front == "chat":
            text += "".join(c["delta"].get("content") or "" for c in event["choices"])
        elif event["type"] == "content_block_delta":
            text += event["delta"].get("text", "")
    return text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("front", ["chat", "messages"])
async def test_a_translated_conversation_gets_every_answer_whole(
    make_mock: MockFactory, make_proxy: ProxyFactory, mode: str, front: str
) -> None:
    """Three turns of a Chat Completions or Messages conversation, streamed and not: over
    plain HTTP, then whole on a bridge session's socket, then as its continuation."""
    proxy = await start(make_mock, make_proxy, mode)
    path = "/v1/chat/completions" if front == "chat" else "/v1/messages"
    messages: list[dict[str, Any]] = []
    for turn, stream in enumerate([True, False, True]):
        said = f"{ANSWER} {turn}"
        messages.append({"role": "user", "content": f"mock:say {said}"})
        body: dict[str, Any] = {"model": "gpt-5.5", "messages": messages, "stream": stream}
        if front == "messages":
            body["max_tokens"] = 100
        async with proxy.client.stream("POST", proxy.root + path, json=body) as response:
            assert response.status_code == 200
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
            request_id = response.headers["x-request-id"]
        assert front_answer(front, stream, raw) == said
        messages.append({"role": "assistant", "content": said})
        completed_record(await log_record(proxy, request_id))
    sent = await proxy.mock.control.model_requests()
    assert sent[0]["transport"] == "http" and sent[2]["method"] == "WS"
    assert sent[2]["body"].get("previous_response_id") == sent[1]["response_id"]
