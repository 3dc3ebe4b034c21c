"""Client-side helpers for tests: SSE parsing, WebSocket turns, auth headers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import trio_websocket

TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}
WS_BETA = "responses_websockets=2026-02-06"


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Events of an SSE body (the ``data:`` JSON of each frame)."""
    events = []
    for frame in text.split("\n\n"):
        data = [line[5:].lstrip() for line in frame.split("\n") if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def request_body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-5.5",
        "stream": True,
        "input": [user_message(text)],
        "store": False,
        "include": ["reasoning.encrypted_content"],
    }
    body.update(extra)
    return body


def final_text(events: list[dict[str, Any]]) -> str:
    texts = []
    for event in events:
        if (
            event.get("type") == "response.output_item.done"
            and event["item"].get("type") == "message"
        ):
            texts += [p.get("text", "") for p in event["item"].get("content", [])]
    return "".join(texts)


async def post_responses(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: Any, **kw: Any
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    response = await client.post(url, headers=headers, json=body, **kw)
    events = (
        parse_sse(response.text)
        if response.headers.get("content-type", "").startswith("text/event-stream")
        else []
    )
    return response, events


@asynccontextmanager
async def open_ws(
    url: str, headers: dict[str, str]
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    ws_url = url.replace("http://", "ws://", 1)
    async with trio_websocket.open_websocket_url(
        ws_url,
        extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()],
        max_message_size=64 * 1024 * 1024,
    ) as ws:
        try:
            yield ws
        finally:
            # trio-websocket never closes a client's TCP stream when the server starts the
            # close handshake (its aclose() returns early once a close reason is set)
            await ws._stream.aclose()


async def ws_turn(
    ws: trio_websocket.WebSocketConnection, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """Send one ``response.create`` and read events until a terminal one."""
    await ws.send_message(json.dumps({"type": "response.create", **body}))
    events = []
    while True:
        message = await ws.get_message()
        event = json.loads(message)
        events.append(event)
        if event.get("type") in TERMINAL:
            return events


def response_id(events: list[dict[str, Any]]) -> str:
    for event in events:
        if event.get("type") == "response.created":
            return str(event["response"]["id"])
    raise AssertionError(f"no response.created in {[e.get('type') for e in events]}")


async def rejected_upgrade(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> httpx.Response:
    """Send a WebSocket upgrade that is expected to be refused; return the HTTP answer.

    (trio-websocket leaks its socket when a handshake is rejected, so rejections are checked
    with a plain HTTP/1.1 upgrade request.)"""
    upgrade = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        **headers,
    }
    response = await client.get(url, headers=upgrade)
    assert response.status_code != 101, "the upgrade was accepted"
    return response


async def wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll an in-process gauge (there is no event to wait on across sockets)."""
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.005)


def sdk_stream(client: Any, prompt: str) -> tuple[list[str], str]:
    """One streamed ``responses.create`` through an OpenAI SDK client (blocking: run it in a
    thread): the event types in order and the text of the output deltas."""
    types: list[str] = []
    text = ""
    with client.responses.create(model="gpt-5.5", input=prompt, stream=True) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
    return types, text
