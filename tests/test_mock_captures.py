"""Replay the captured Codex CLI 0.169.0 client requests against the mock backend.

Requirement: each capture in ``tests/captures/`` that is a client request, replayed against the
mock, gets a response of the captured shape.

One test per capture scenario (folder). Its client requests are replayed in file order against
a fresh mock: HTTP requests are rebuilt from method/target/headers/body (auth swapped for the
mock account's, zstd bodies re-encoded), WebSocket frames are sent on a socket opened with the
captured upgrade headers. Answers are compared with the captured ``ws_send`` frames, which are
the reference response shapes (the events a Codex CLI consumes): same terminal kind, same key
sets (top level, and the ``response`` / ``item`` / ``part`` sub-objects).

The captures keep only the first frame of each event type per scenario, so the frames that
follow a ``ws_recv`` file describe its answer only partially (see ``expected_answer``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket
import zstandard

from tests.conftest import MockEnv
from tests.helpers import TERMINAL, open_ws, parse_sse

CAPTURES = Path(__file__).resolve().parent / "captures"
MISSING = "<captures folder missing>"
ACCOUNT = "acct-mock-1"
REQUEST_TIMEOUT = 10.0
QUICK_TIMEOUT = 5.0
SCENARIO_TIMEOUT = 30.0

_FILE = re.compile(r"^(\d+)_(http|ws_upgrade|ws_recv|ws_send)_.*\.json$")

# Headers a client never copies from a capture: per-hop, handshake and length headers.
DROP_HTTP = {"host", "content-length"}
DROP_UPGRADE = {
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "content-length",
}

# Event types of a Responses stream that the Codex CLI consumes.
KNOWN_EVENTS = {
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.output_item.done",
    "response.content_part.added",
    "response.content_part.done",
    "response.output_text.delta",
    "response.output_text.done",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.reasoning_summary_text.delta",
    "response.reasoning_summary_part.added",
    "response.reasoning_text.delta",
    "response.custom_tool_call_input.delta",
    "response.metadata",
    "response.completed",
    "response.failed",
    "response.incomplete",
    "codex.rate_limits",
    "error",
}
# Out-of-band events: not part of a response's sequence_number chain.
OUT_OF_BAND = {"codex.rate_limits", "response.metadata"}

# Item shapes of the Responses stream for item types no capture has an example of.
DOC_ITEM_KEYS: dict[str, frozenset[str]] = {
    "function_call": frozenset({"type", "id", "status", "arguments", "call_id", "name"}),
    "compaction": frozenset({"type", "id", "encrypted_content"}),
}


# -- loading the captures -------------------------------------------------------------------


@attrs.frozen
class Capture:
    """One capture file: ``kind`` is http, ws_upgrade, ws_recv or ws_send."""

    name: str
    number: int
    kind: str
    data: Any


def scenario_names() -> list[str]:
    if not CAPTURES.is_dir():
        return [MISSING]
    return sorted(p.name for p in CAPTURES.iterdir() if p.is_dir()) or [MISSING]


def load_scenario(name: str) -> list[Capture]:
    captures = []
    for path in sorted((CAPTURES / name).iterdir(), key=lambda p: p.name):
        match = _FILE.match(path.name)
        assert match, f"{name}/{path.name}: not a NN_<kind>_... capture file name"
        data = json.loads(path.read_text())
        captures.append(Capture(path.name, int(match.group(1)), match.group(2), data))
    numbers = [c.number for c in captures]
    assert numbers == list(range(1, len(captures) + 1)), f"{name}: files not numbered 01..NN"
    return captures


def example_key(event: dict[str, Any]) -> str:
    """Error events differ by status (429 usage limit vs 400 request errors)."""
    if event.get("type") == "error":
        return f"error/{event.get('status')}"
    return str(event.get("type"))


@attrs.frozen
class Shapes:
    """Key sets of the captured server frames, collected over every scenario."""

    events: dict[str, frozenset[str]]
    subs: dict[tuple[str, str], frozenset[str]]  # (example key, "response"|"part") -> keys
    items: dict[str, frozenset[str]]  # item type -> keys


@functools.cache
def captured_shapes() -> Shapes:
    events: dict[str, frozenset[str]] = {}
    subs: dict[tuple[str, str], frozenset[str]] = {}
    items: dict[str, frozenset[str]] = {}
    first: dict[str, str] = {}  # shape name -> file of its first example

    def put(table: dict[Any, frozenset[str]], key: Any, keys: frozenset[str], src: str) -> None:
        name = f"{key}" if table is not items else f"item[{key}]"
        if key not in table:
            table[key], first[name] = keys, src
        assert table[key] == keys, (
            f"captures disagree on the shape of {name}: {first[name]} has "
            f"{sorted(table[key])}, {src} has {sorted(keys)}"
        )

    for scenario in scenario_names():
        if scenario == MISSING:
            continue
        for capture in load_scenario(scenario):
            if capture.kind != "ws_send":
                continue
            frame, src = capture.data, f"{scenario}/{capture.name}"
            key = example_key(frame)
            put(events, key, frozenset(frame), src)
            for sub in ("response", "part"):
                if isinstance(frame.get(sub), dict):
                    put(subs, (key, sub), frozenset(frame[sub]), src)
            if isinstance(frame.get("item"), dict):
                put(items, str(frame["item"].get("type")), frozenset(frame["item"]), src)
    for item_type, keys in DOC_ITEM_KEYS.items():
        items.setdefault(item_type, keys)
    return Shapes(events, subs, items)


def shape_problems(event: dict[str, Any], shapes: Shapes) -> list[str]:
    """Differences between an event of the mock and the captured example of its type."""
    key = example_key(event)
    problems = []
    if key in shapes.events and frozenset(event) != shapes.events[key]:
        problems.append(f"{key}: keys {sorted(event)} != captured {sorted(shapes.events[key])}")
    for sub in ("response", "part"):
        expected = shapes.subs.get((key, sub))
        value = event.get(sub)
        if expected is not None and (not isinstance(value, dict) or frozenset(value) != expected):
            got = sorted(value) if isinstance(value, dict) else value
            problems.append(f"{key}.{sub}: keys {got} != captured {sorted(expected)}")
    item = event.get("item")
    if isinstance(item, dict):
        expected = shapes.items.get(str(item.get("type")))
        if expected is not None and frozenset(item) != expected:
            problems.append(
                f"{key}.item[{item.get('type')}]: keys {sorted(item)} != {sorted(expected)}"
            )
    return problems


# -- what an answer must look like ----------------------------------------------------------


def answer_kind(body: dict[str, Any], scripted_tool_call: bool) -> str:
    """prewarm | compaction | text | tool_call, as the protocol demands for this request."""
    if body.get("generate") is False:
        return "prewarm"
    items = body.get("input") or []
    last = items[-1].get("type") if items and isinstance(items[-1], dict) else None
    if last == "compaction_trigger":
        return "compaction"
    if last == "function_call_output":
        return "text"
    return "tool_call" if scripted_tool_call else "text"


def check_turn(events: list[dict[str, Any]], kind: str, shapes: Shapes) -> list[str]:
    """Problems of a successful answer: event order, ids, output, and key sets."""
    problems: list[str] = []
    for event in events:
        if event.get("type") not in KNOWN_EVENTS:
            problems.append(f"unknown event type {event.get('type')!r}")
        problems += shape_problems(event, shapes)
    chain = [e for e in events if e.get("type") not in OUT_OF_BAND]
    types = [e.get("type") for e in chain]
    if not types or types[0] != "response.created" or types[-1] != "response.completed":
        return [*problems, f"not a created..completed sequence: {types}"]
    if kind != "prewarm" and types[1:2] != ["response.in_progress"]:
        problems.append(f"no response.in_progress after response.created: {types}")
    seqs = [e.get("sequence_number") for e in chain]
    if seqs != list(range(len(chain))):
        problems.append(f"sequence_number not 0..n-1: {seqs}")
    created, completed = chain[0]["response"], chain[-1]["response"]
    if created.get("id") != completed.get("id") or not completed.get("id"):
        problems.append(f"response ids differ: {created.get('id')} / {completed.get('id')}")
    if completed.get("status") != "completed":
        problems.append(f"response.completed has status {completed.get('status')!r}")
    done = [e["item"] for e in chain if e.get("type") == "response.output_item.done"]
    if completed.get("output") != done:
        problems.append("response.completed output != the output_item.done items")
    item_types = [i.get("type") for i in done]
    if kind == "prewarm" and done:
        problems.append(f"prewarm answered output items {item_types}")
    if kind == "compaction" and item_types != ["compaction"]:
        problems.append(f"compaction_trigger needs exactly one compaction item, got {item_types}")
    if kind == "compaction" and not all(i.get("encrypted_content") for i in done):
        problems.append("compaction item without encrypted_content")
    if kind == "tool_call" and item_types != ["reasoning", "function_call"]:
        problems.append(f"tool call turn answered items {item_types}")
    if kind == "tool_call" and "response.function_call_arguments.done" not in types:
        problems.append("tool call turn without response.function_call_arguments.done")
    if kind == "text":
        texts = [
            p.get("text")
            for i in done
            if i.get("type") == "message"
            for p in i.get("content", [])
            if p.get("type") == "output_text"
        ]
        if item_types != ["message"] or not all(texts) or not texts:
            problems.append(f"expected a text answer, got items {item_types} texts {texts}")
    return problems


@attrs.frozen
class Expected:
    """The stand-in's answer to one ``ws_recv`` frame, as far as the captures tell."""

    error: dict[str, Any] | None  # the captured ``error`` frame, None for a completed answer
    types: frozenset[str]  # event types captured for this answer (first occurrences only)
    tool_call: bool
    inferred: bool  # no captured frame: all its types were seen before in the scenario


def expected_answer(
    segment: list[dict[str, Any]], seen: set[str], last_error: dict[str, Any] | None
) -> Expected:
    errors = [f for f in segment if f.get("type") == "error"]
    tool_call = any(
        f.get("type", "").startswith("response.function_call_arguments.")
        or (isinstance(f.get("item"), dict) and f["item"].get("type") == "reasoning")
        for f in segment
    )
    types = frozenset(str(f.get("type")) for f in segment)
    if errors:
        return Expected(errors[0], types, tool_call, inferred=False)
    if not segment and "response.created" not in seen and last_error is not None:
        # Every successful answer starts with response.created; since that type was never
        # captured in this scenario, an answer without new frames repeated the last error.
        return Expected(last_error, types, tool_call, inferred=True)
    return Expected(None, types, tool_call, inferred=not segment)


# -- rebuilding requests --------------------------------------------------------------------


def header_list(
    captured: list[list[str]], auth: dict[str, str], drop: set[str]
) -> list[tuple[str, str]]:
    headers = []
    for name, value in captured:
        lower = name.lower()
        if lower in drop:
            continue
        headers.append((name, auth.get(lower, value)))
    return headers


def encode_body(body: Any, headers: list[tuple[str, str]]) -> bytes | None:
    if body is None:
        return None
    raw = json.dumps(body).encode()
    encoding = {k.lower(): v for k, v in headers}.get("content-encoding", "").lower()
    if encoding == "zstd":
        compressed: bytes = zstandard.ZstdCompressor().compress(raw)
        return compressed
    return raw


def path_of(target: str) -> str:
    return target.split("?", 1)[0]


@attrs.define
class Replay:
    """State of one scenario's replay."""

    scenario: str
    mock: MockEnv
    shapes: Shapes
    problems: list[str] = attrs.field(factory=list)
    sent: list[tuple[str, str, int]] = attrs.field(factory=list)  # method, path, status
    upgrade: list[list[str]] | None = None
    upgrade_path: str = ""
    ws: trio_websocket.WebSocketConnection | None = None
    ws_exit: contextlib.AsyncExitStack | None = None
    last_response_id: str | None = None
    last_call_id: str | None = None
    seen: set[str] = attrs.field(factory=set)
    last_error: dict[str, Any] | None = None

    def fail(self, capture: Capture, message: str) -> None:
        self.problems.append(f"{self.scenario}/{capture.name}: {message}")

    # -- HTTP ---------------------------------------------------------------------------
    async def http(self, capture: Capture, later: list[Capture]) -> None:
        data = capture.data
        method, target = str(data["method"]), str(data["target"])
        path = path_of(target)
        headers = header_list(data["headers"], self.mock.auth(ACCOUNT), DROP_HTTP)
        body = data["body"]
        scripted = False
        if method == "POST" and path == "/oauth/token":
            tokens = (await self.mock.control.auth_json(ACCOUNT))["tokens"]
            body = {**body, "refresh_token": tokens["refresh_token"]}
        elif method == "POST" and path.endswith("/codex/responses"):
            scripted = self.http_tool_call(body, later)
            if scripted:
                await self.mock.control.script({"tool_call": "echo hello-from-tool"})
        limit = QUICK_TIMEOUT if self.expect_404(method, path) else REQUEST_TIMEOUT
        with trio.fail_after(limit):
            response = await self.mock.client.request(
                method,
                self.mock.root + target,
                headers=headers,
                content=encode_body(body, headers),
            )
        self.sent.append((method, path, response.status_code))
        self.check_http(capture, method, path, body, response, scripted)

    @staticmethod
    def expect_404(method: str, path: str) -> bool:
        known = {
            ("POST", "/oauth/token"),
            ("POST", "/backend-api/codex/responses"),
            ("GET", "/backend-api/codex/models"),
            ("GET", "/backend-api/wham/accounts/check"),
        }
        return (method, path) not in known

    @staticmethod
    def http_tool_call(body: dict[str, Any], later: list[Capture]) -> bool:
        """Did the stand-in answer with a tool call? (The next model request carries it.)"""
        for capture in later:
            data = capture.data
            if capture.kind == "http" and path_of(data["target"]).endswith("/codex/responses"):
                new = (data["body"].get("input") or [])[len(body.get("input") or []) :]
                return any(i.get("type") == "function_call" for i in new)
        return False

    def check_http(
        self,
        capture: Capture,
        method: str,
        path: str,
        body: Any,
        response: httpx.Response,
        scripted: bool,
    ) -> None:
        status = response.status_code
        if (method, path) == ("POST", "/oauth/token"):
            if status != 200:
                self.fail(capture, f"token refresh answered {status}: {response.text[:300]}")
                return
            answer = response.json()
            for key in ("access_token", "refresh_token", "id_token"):
                if not isinstance(answer.get(key), str) or not answer[key]:
                    self.fail(capture, f"token refresh answer has no {key}: {answer}")
            if answer.get("refresh_token") == body["refresh_token"]:
                self.fail(capture, "token refresh did not rotate the refresh token")
        elif (method, path) == ("POST", "/backend-api/codex/responses"):
            content_type = response.headers.get("content-type", "")
            if status != 200 or not content_type.startswith("text/event-stream"):
                self.fail(capture, f"answered {status} {content_type}: {response.text[:300]}")
                return
            kind = answer_kind(body, scripted)
            for problem in check_turn(parse_sse(response.text), kind, self.shapes):
                self.fail(capture, f"({kind} answer) {problem}")
        elif (method, path) == ("GET", "/backend-api/codex/models"):
            models = response.json().get("models") if status == 200 else None
            if not isinstance(models, list) or not models:
                self.fail(capture, f"models answered {status}: {response.text[:300]}")
        elif (method, path) == ("GET", "/backend-api/wham/accounts/check"):
            self.check_accounts(capture, response)
        else:
            if status != 404:
                self.fail(capture, f"expected a 404 (tolerated by the CLI), got {status}")
            elif not response.headers.get("content-type", "").startswith("application/json"):
                self.fail(capture, f"404 is not JSON: {response.headers.get('content-type')}")
            else:
                response.json()

    def check_accounts(self, capture: Capture, response: httpx.Response) -> None:
        if response.status_code != 200:
            self.fail(capture, f"accounts/check answered {response.status_code}")
            return
        accounts = response.json().get("accounts")
        entry = next(
            (a for a in accounts or [] if isinstance(a, dict) and a.get("id") == ACCOUNT), None
        )
        if entry is None:
            self.fail(capture, f"accounts/check has no entry for {ACCOUNT}: {accounts}")
            return
        missing = {"id", "workspace_backend_origin", "account_routing_override"} - set(entry)
        if missing:
            self.fail(capture, f"accounts/check entry lacks {sorted(missing)}: {entry}")
            return
        # What the CLI requires before it routes a first-party provider to the workspace origin.
        if not str(entry["workspace_backend_origin"]).startswith("https://"):
            self.fail(capture, f"workspace_backend_origin is not https: {entry}")
        if entry["account_routing_override"] not in ("NO_CONSTRAINT", "us", "us_cr"):
            self.fail(capture, f"unknown account_routing_override: {entry}")

    # -- WebSocket ----------------------------------------------------------------------
    async def open_socket(self) -> None:
        assert self.upgrade is not None, "a ws_recv frame before any ws_upgrade capture"
        headers = dict(header_list(self.upgrade, self.mock.auth(ACCOUNT), DROP_UPGRADE))
        stack = contextlib.AsyncExitStack()
        # (No fail_after around opening or closing: the socket's nursery would straddle the
        # cancel scope. The test bounds the whole scenario instead.)
        self.ws = await stack.enter_async_context(open_ws(self.mock.responses_url, headers))
        self.ws_exit = stack
        self.sent.append(("GET", self.upgrade_path, 101))
        self.last_response_id = self.last_call_id = None

    async def close_socket(self) -> None:
        if self.ws_exit is not None:
            stack, self.ws_exit, self.ws = self.ws_exit, None, None
            await stack.aclose()

    async def ws_upgrade(self, capture: Capture, used: bool) -> None:
        await self.close_socket()
        self.upgrade = capture.data["headers"]
        self.upgrade_path = path_of(capture.data["target"])
        await self.open_socket()
        if not used:
            # No frame was sent on it: the CLI fell back to HTTP (the stand-in refused the
            # upgrade; the capture does not keep that answer). The mock may accept it.
            await self.close_socket()

    async def ws_recv(self, capture: Capture, segment: list[dict[str, Any]]) -> None:
        expected = expected_answer(segment, self.seen, self.last_error)
        self.seen |= {str(f.get("type")) for f in segment}
        frame = dict(capture.data)
        error_code = (expected.error or {}).get("error", {}).get("code")
        if expected.error is not None and expected.error.get("status") == 429:
            await self.mock.control.add_fault("usage_limit", count=1)
        if frame.get("previous_response_id") and error_code != "previous_response_not_found":
            assert self.last_response_id, f"{capture.name}: no response on this socket yet"
            frame["previous_response_id"] = self.last_response_id
        if expected.tool_call:
            await self.mock.control.script({"tool_call": "echo hello-from-tool"})
        frame["input"] = [self.rewrite_call_id(capture, i) for i in frame.get("input") or []]
        if self.ws is None:
            await self.open_socket()
        assert self.ws is not None
        events = await self.turn(self.ws, frame)
        self.sent.append(("WS", self.upgrade_path, self.record_status(events)))
        self.check_ws(capture, frame, expected, events)
        terminal = events[-1]
        if terminal.get("type") == "error":
            # The real client drops the socket after an error and reconnects (full resend).
            self.last_error = expected.error
            await self.close_socket()
            return
        for event in events:
            if event.get("type") == "response.created":
                self.last_response_id = event["response"]["id"]
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                self.last_call_id = item["call_id"]

    def rewrite_call_id(self, capture: Capture, item: Any) -> Any:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            assert self.last_call_id, f"{capture.name}: no function_call on this socket yet"
            return {**item, "call_id": self.last_call_id}
        return item

    @staticmethod
    async def turn(
        ws: trio_websocket.WebSocketConnection, frame: dict[str, Any]
    ) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        with trio.fail_after(REQUEST_TIMEOUT):
            await ws.send_message(json.dumps(frame))
            while not events or events[-1].get("type") not in TERMINAL:
                events.append(json.loads(await ws.get_message()))
        return events

    @staticmethod
    def record_status(events: list[dict[str, Any]]) -> int:
        terminal = events[-1]
        return int(terminal.get("status", 0)) if terminal.get("type") == "error" else 200

    def check_ws(
        self,
        capture: Capture,
        frame: dict[str, Any],
        expected: Expected,
        events: list[dict[str, Any]],
    ) -> None:
        terminal = events[-1]
        if expected.error is not None:
            want = expected.error
            got_error = terminal.get("error") or {}
            want_error = want.get("error") or {}
            if (
                terminal.get("type") != "error"
                or terminal.get("status") != want.get("status")
                or got_error.get("code") != want_error.get("code")
                or got_error.get("type") != want_error.get("type")
            ):
                how = "inferred: no new frame captured" if expected.inferred else "captured"
                self.fail(
                    capture,
                    f"expected error {want.get('status')} {want_error.get('code')}/"
                    f"{want_error.get('type')} ({how}), got {terminal}",
                )
            for event in events:
                for problem in shape_problems(event, self.shapes):
                    self.fail(capture, problem)
            return
        if terminal.get("type") != "response.completed":
            self.fail(capture, f"expected response.completed, got {terminal}")
            return
        kind = answer_kind(frame, expected.tool_call)
        for problem in check_turn(events, kind, self.shapes):
            self.fail(capture, f"({kind} answer) {problem}")
        got_types = {str(e.get("type")) for e in events}
        missing = expected.types - got_types
        if missing:
            self.fail(capture, f"captured event types {sorted(missing)} missing from the answer")

    # -- the recorder -------------------------------------------------------------------
    async def check_records(self) -> None:
        records = await self.mock.control.requests()
        seen = [(r["method"], r["path"], r["status"]) for r in records]
        if seen != self.sent:
            self.problems.append(
                f"{self.scenario}: the mock recorded {seen}, but the replay sent {self.sent}"
            )


def upgrade_used(captures: list[Capture], index: int) -> bool:
    """Was a frame sent on the socket of the ws_upgrade capture at ``index``?"""
    for after in captures[index + 1 :]:
        if after.kind in ("ws_upgrade", "ws_recv"):
            return after.kind == "ws_recv"
    return False


def ws_segments(captures: list[Capture]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(index of each ws_recv capture, the ws_send frames after it up to the next ws_recv)."""
    for index, capture in enumerate(captures):
        if capture.kind != "ws_recv":
            continue
        segment = []
        for after in captures[index + 1 :]:
            if after.kind == "ws_recv":
                break
            if after.kind == "ws_send":
                segment.append(after.data)
        yield index, segment


# Scenarios the mock does not answer like the stand-in did (bugs in the mock): name -> reason.
KNOWN_MOCK_BUGS: dict[str, str] = {}


def scenario_params() -> list[Any]:
    return [
        pytest.param(
            name,
            id=name,
            marks=[pytest.mark.xfail(reason=KNOWN_MOCK_BUGS[name], strict=True)]
            if name in KNOWN_MOCK_BUGS
            else [],
        )
        for name in scenario_names()
    ]


@pytest.mark.parametrize("scenario", scenario_params())
async def test_capture_replays_get_captured_shapes(scenario: str, mock: MockEnv) -> None:
    if scenario == MISSING:
        pytest.fail(
            f"no capture scenarios at {CAPTURES} (expected tests/captures/<scenario>/"
            "NN_<kind>_....json)"
        )
    captures = load_scenario(scenario)
    replay = Replay(scenario, mock, captured_shapes())
    segments = dict(ws_segments(captures))
    with trio.fail_after(SCENARIO_TIMEOUT):
        try:
            for index, capture in enumerate(captures):
                if capture.kind == "http":
                    await replay.http(capture, captures[index + 1 :])
                elif capture.kind == "ws_upgrade":
                    await replay.ws_upgrade(capture, upgrade_used(captures, index))
                elif capture.kind == "ws_recv":
                    await replay.ws_recv(capture, segments[index])
        finally:
            await replay.close_socket()
        await replay.check_records()
    assert not replay.problems, "\n".join(replay.problems)
