"""Bytes a WebSocket client sends per turn over a 20-turn session with one forced account
switch, with re-anchoring and without (the client resending its history, as the Codex CLI
does after ``previous_response_not_found``).

    python -m trioproxy.harness.continuity_bytes [--turns 20] [--switch-at 10] [--http | --chat]

``--http`` measures the same conversation over HTTP instead: through the HTTP bridge (each
request carries only the new message and ``previous_response_id``; on ``502
stream_incomplete`` the client resends the history) against plain HTTP, where the client
has to send its whole history every turn (upstream keeps no HTTP state).

``--chat`` measures a Chat Completions client (``POST /v1/chat/completions``), which sends
its whole history every turn whatever the proxy does: what differs is what goes upstream,
with the bridge (a turn that continues the last one goes as its continuation) and without.

Everything runs on loopback: the mock backend with two accounts, the proxy (fill_first
routing) in front, and a scripted client that behaves like the Codex CLI: the first request
carries the base instructions, each later one only the new user message with
``previous_response_id``; on ``previous_response_not_found`` it reconnects and sends the
whole history without an anchor. At turn ``switch_at`` the pinned account answers
``usage_limit_reached``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

from trioproxy.accounts.authfile import parse_auth_json
from trioproxy.config import load_settings
from trioproxy.harness.mock_upstream import MockBackend, MockConfig, fault_from_dict, serve_mock
from trioproxy.server import serve_proxy
from trioproxy.store import Store

BASE_INSTRUCTIONS = "You are a coding agent. " * 900  # about 21 KB, like the Codex CLI's


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


@attrs.define
class Run:
    client_bytes: list[int] = attrs.field(factory=list)
    upstream_bytes: list[int] = attrs.field(factory=list)
    reconnects: int = 0


async def conversation(url: str, turns: int, switch_at: int, backend: MockBackend) -> Run:
    run = Run()
    history: list[Any] = [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": BASE_INSTRUCTIONS}],
        }
    ]
    headers = [(b"openai-beta", b"responses_websockets=2026-02-06"), (b"session-id", b"bytes-run")]
    previous: str | None = None
    ws = await trio_websocket.connect_websocket_url(
        nursery, url, extra_headers=headers, max_message_size=1 << 26
    )
    for turn in range(1, turns + 1):
        if turn == switch_at:
            pinned = next(r.account for r in reversed(backend.recorder.records) if r.method == "WS")
            backend.faults.add(
                fault_from_dict({"kind": "usage_limit", "account": pinned, "count": 1})
            )
        new = [user(f"turn {turn}: please continue the work on module {turn} " * 4)]
        message = {
            "type": "response.create",
            "model": "gpt-5.5",
            "input": new if previous else history + new,
            "store": False,
        }
        if previous:
            message["previous_response_id"] = previous
        sent = 0
        while True:
            text = json.dumps(message)
            sent += len(text)
            await ws.send_message(text)
            events = []
            while True:
                event = json.loads(await ws.get_message())
                events.append(event)
                if event["type"] in ("response.completed", "response.failed", "error"):
                    break
            if (
                events[-1]["type"] == "error"
                and events[-1]["error"].get("code") == "previous_response_not_found"
            ):
                run.reconnects += 1  # the Codex CLI's recovery: new socket, full history, no anchor
                await ws.aclose()
                await ws._stream.aclose()
                ws = await trio_websocket.connect_websocket_url(
                    nursery, url, extra_headers=headers, max_message_size=1 << 26
                )
                message = {
                    "type": "response.create",
                    "model": "gpt-5.5",
                    "input": history + new,
                    "store": False,
                }
                continue
            break
        assert events[-1]["type"] == "response.completed", events[-1]
        history += new + [e["item"] for e in events if e["type"] == "response.output_item.done"]
        previous = events[-1]["response"]["id"]
        run.client_bytes.append(sent)
    await ws.aclose()
    await ws._stream.aclose()
    bodies = [r for r in backend.recorder.records if r.method == "WS" and r.status == 200]
    run.upstream_bytes = [len(json.dumps(r.body)) for r in bodies[-turns:]]
    return run


def limit_pinned_account(backend: MockBackend) -> None:
    """The account that served the last model request answers its next one with a usage
    limit."""
    pinned = next(
        r.account
        for r in reversed(backend.recorder.records)
        if r.method in ("WS", "POST") and r.account
    )
    backend.faults.add(fault_from_dict({"kind": "usage_limit", "account": pinned, "count": 1}))


def upstream_bytes(backend: MockBackend, turns: int) -> list[int]:
    """The sizes of the last ``turns`` model requests upstream answered."""
    bodies = [r for r in backend.recorder.records if r.method in ("WS", "POST") and r.status == 200]
    return [len(json.dumps(r.body)) for r in bodies[-turns:]]


async def conversation_http(
    url: str, turns: int, switch_at: int, backend: MockBackend, *, anchored: bool
) -> Run:
    """The same conversation over HTTP: anchored (the bridge) or full history every turn."""
    run = Run()
    history: list[Any] = [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": BASE_INSTRUCTIONS}],
        }
    ]
    previous: str | None = None
    async with httpx.AsyncClient(timeout=60, headers={"session-id": "bytes-run"}) as client:
        for turn in range(1, turns + 1):
            if turn == switch_at:
                limit_pinned_account(backend)
            new = [user(f"turn {turn}: please continue the work on module {turn} " * 4)]
            body: dict[str, Any] = {
                "model": "gpt-5.5",
                "stream": True,
                "input": new if previous and anchored else history + new,
                "store": False,
            }
            if previous and anchored:
                body["previous_response_id"] = previous
            sent = 0
            while True:
                data = json.dumps(body).encode()
                sent += len(data)
                response = await client.post(
                    url, content=data, headers={"content-type": "application/json"}
                )
                if response.status_code == 502 and "stream_incomplete" in response.text:
                    run.reconnects += 1  # the anchor is gone: resend the history without it
                    body = {**body, "input": history + new}
                    body.pop("previous_response_id", None)
                    continue
                break
            events = [
                json.loads(line[5:])
                for line in response.text.splitlines()
                if line.startswith("data:")
            ]
            assert events and events[-1]["type"] == "response.completed", response.text[:300]
            history += new + [e["item"] for e in events if e["type"] == "response.output_item.done"]
            previous = events[-1]["response"]["id"]
            run.client_bytes.append(sent)
    run.upstream_bytes = upstream_bytes(backend, turns)
    return run


async def conversation_chat(url: str, turns: int, switch_at: int, backend: MockBackend) -> Run:
    """The conversation as a Chat Completions client has it: the whole history every turn."""
    run = Run()
    messages: list[dict[str, Any]] = [{"role": "system", "content": BASE_INSTRUCTIONS}]
    async with httpx.AsyncClient(timeout=60) as client:
        for turn in range(1, turns + 1):
            if turn == switch_at:
                limit_pinned_account(backend)
            text = f"turn {turn}: please continue the work on module {turn} " * 4
            messages.append({"role": "user", "content": text})
            data = json.dumps({"model": "gpt-5.5", "messages": messages}).encode()
            response = await client.post(
                url, content=data, headers={"content-type": "application/json"}
            )
            assert response.status_code == 200, response.text[:300]
            messages.append(response.json()["choices"][0]["message"])
            run.client_bytes.append(len(data))
    run.upstream_bytes = upstream_bytes(backend, turns)
    return run


nursery: trio.Nursery  # set in main: connect_websocket_url needs a nursery for its reader


async def measure(
    reanchor: bool, turns: int, switch_at: int, http: bool = False, chat: bool = False
) -> Run:
    global nursery
    backend = MockBackend(MockConfig(accounts=2, rate_limit_events=False))
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_mock, backend, "127.0.0.1", 0)
            root = f"http://127.0.0.1:{port}"
            settings = load_settings(
                environ={},
                overrides={
                    "port": 0,
                    "data_dir": tmp,
                    "upstream_base_url": f"{root}/backend-api",
                    "auth_base_url": root,
                    "routing_strategy": "fill_first",
                    "reanchor_max_bytes": 64 << 20 if reanchor else 1,
                    "bridge_max_sessions": 256 if reanchor else 0,
                    "log_level": "warning",
                },
            )
            with Store.open(settings.resolved_database_url, data_dir=Path(tmp)) as store:
                now = backend.clock.now()
                for account in backend.accounts.values():
                    store.upsert_account(parse_auth_json(account.auth_json(now), now=now))
            proxy_port = await nursery.start(serve_proxy, settings)
            if chat:
                run = await conversation_chat(
                    f"http://127.0.0.1:{proxy_port}/v1/chat/completions", turns, switch_at, backend
                )
            elif http:
                run = await conversation_http(
                    f"http://127.0.0.1:{proxy_port}/backend-api/codex/responses",
                    turns,
                    switch_at,
                    backend,
                    anchored=reanchor,
                )
            else:
                run = await conversation(
                    f"ws://127.0.0.1:{proxy_port}/backend-api/codex/responses",
                    turns,
                    switch_at,
                    backend,
                )
            async with httpx.AsyncClient() as client:
                stats = (await client.get(f"http://127.0.0.1:{proxy_port}/api/stats")).json()[
                    "counters"
                ]
            if not http and not chat:
                run.reconnects = max(run.reconnects, stats.get("websocket_sessions", 1) - 1)
            nursery.cancel_scope.cancel()
    return run


def report(
    turns: int, switch_at: int, with_: Run, without: Run, http: bool = False, chat: bool = False
) -> str:
    if chat:
        return report_chat(turns, switch_at, with_, without)
    title = (
        f"{turns}-turn HTTP conversation, pinned account usage-limited at turn {switch_at}"
        if http
        else f"{turns}-turn WebSocket session, pinned account usage-limited at turn {switch_at}"
    )
    columns = (
        "| turn | client bytes, HTTP bridge | client bytes, plain HTTP (full history) | upstream bytes, HTTP bridge |"
        if http
        else "| turn | client bytes, re-anchoring | client bytes, client resends | upstream bytes, re-anchoring |"
    )
    lines = [
        title,
        "",
        columns,
        "| ---: | ---: | ---: | ---: |",
    ]
    for i in range(turns):
        lines.append(
            f"| {i + 1} | {with_.client_bytes[i]} | {without.client_bytes[i]} | {with_.upstream_bytes[i] if i < len(with_.upstream_bytes) else ''} |"
        )
    lines += [
        f"| total | {sum(with_.client_bytes)} | {sum(without.client_bytes)} | {sum(with_.upstream_bytes)} |",
        "",
        f"client reconnects/resends: with {with_.reconnects}, without {without.reconnects}",
    ]
    return "\n".join(lines)


def report_chat(turns: int, switch_at: int, with_: Run, without: Run) -> str:
    lines = [
        f"{turns}-turn Chat Completions conversation, pinned account usage-limited at turn "
        f"{switch_at}",
        "",
        "| turn | client bytes (both) | upstream bytes, bridge | upstream bytes, bridge off |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for i in range(turns):
        lines.append(
            f"| {i + 1} | {with_.client_bytes[i]} | {with_.upstream_bytes[i]} "
            f"| {without.upstream_bytes[i]} |"
        )
    lines.append(
        f"| total | {sum(with_.client_bytes)} | {sum(with_.upstream_bytes)} "
        f"| {sum(without.upstream_bytes)} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--switch-at", type=int, default=10)
    parser.add_argument("--http", action="store_true", help="HTTP: the bridge vs plain HTTP")
    parser.add_argument(
        "--chat", action="store_true", help="Chat Completions: upstream bytes, bridge on and off"
    )
    args = parser.parse_args()

    async def both() -> tuple[Run, Run]:
        shape = (args.turns, args.switch_at, args.http, args.chat)
        return await measure(True, *shape), await measure(False, *shape)

    with_, without = trio.run(both)
    print(report(args.turns, args.switch_at, with_, without, args.http, args.chat))


if __name__ == "__main__":
    main()
