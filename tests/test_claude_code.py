"""The real Claude Code CLI (npm @anthropic-ai/claude-code, ``claude -p``) through the proxy's
``POST /v1/messages`` front, against the mock backend.

Claude Code is pointed at the proxy with ``ANTHROPIC_BASE_URL`` and a trioproxy key in
``ANTHROPIC_API_KEY``; the mock makes the model call Claude Code's own ``Bash`` tool, Claude
Code runs it and sends the output back, and the mock's next answer quotes it.

Between Claude Code and the proxy sits a recording relay (plain bytes, read back as HTTP/1.1
requests), so the test sees exactly what Claude Code sent: paths, headers, bodies.
``HTTPS_PROXY`` / ``HTTP_PROXY`` point at a trap listener on loopback, so a request to any other
host (telemetry, updates, feature flags) would show up there instead of leaving the machine
(2.1.332 honours them: with ``ANTHROPIC_BASE_URL`` on api.anthropic.com the trap sees its
``CONNECT api.anthropic.com:443``).

The CLI is installed by the tests into a cache folder (``tests/claude_code.py``); a machine
without npm fails these tests with a clear message instead of skipping them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.claude_code import ClaudeResult, claude_binary_async, run_claude_print
from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.quota_support import eventually
from trioproxy.harness.mock_upstream import MockConfig

pytestmark = pytest.mark.claude_code

MARKER = "hello-from-claude-code"


@attrs.define(eq=False)
class Captured:
    """One HTTP request as the client sent it."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def parse_requests(buffer: bytearray) -> list[Captured]:
    """Take every complete HTTP/1.1 request off the front of ``buffer`` (a body framed by
    ``content-length`` or chunked); what is left is the start of the next one."""
    found: list[Captured] = []
    while (end := buffer.find(b"\r\n\r\n")) >= 0:
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = bytes(buffer[end + 4 :])
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, used = b"", 0
            while True:
                line_end = rest.find(b"\r\n", used)
                if line_end < 0:
                    return found
                size = int(rest[used:line_end].split(b";")[0], 16)
                if len(rest) < line_end + 2 + size + 2:
                    return found
                body += rest[line_end + 2 : line_end + 2 + size]
                used = line_end + 2 + size + 2
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            if len(rest) < length:
                return found
            body, used = rest[:length], length
        found.append(Captured(method, target, headers, body))
        del buffer[: end + 4 + used]
    return found


@attrs.define(eq=False)
class RecordingRelay:
    """A TCP relay on loopback in front of ``upstream_port`` that records what clients send
    (keep-alive connections included) as `Captured` requests."""

    upstream_port: int
    requests: list[Captured] = attrs.field(factory=list)

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, server, client, False, nursery.cancel_scope)
            await self._pump(client, server, True, nursery.cancel_scope)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        record: bool,
        scope: trio.CancelScope,
    ) -> None:
        buffer = bytearray()
        try:
            while data := await source.receive_some(65536):
                if record:
                    buffer += data
                    self.requests += parse_requests(buffer)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@attrs.define(eq=False)
class Trap:
    """A listener standing in for an HTTP(S) proxy: it records the first line of every
    connection (``CONNECT host:443 ...`` or ``GET http://host/...``) and hangs up."""

    seen: list[str] = attrs.field(factory=list)

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._answer, listeners)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                data = await stream.receive_some(4096)
                self.seen.append(data.split(b"\r\n", 1)[0].decode("latin-1"))


@attrs.define(eq=False)
class ClaudeSetup:
    proxy: ProxyEnv
    relay: RecordingRelay
    relay_port: int
    trap: Trap
    trap_port: int
    tmp: Path

    async def run(self, prompt: str, *extra_args: str, limit: float = 120) -> ClaudeResult:
        home = self.tmp / "claude-home"
        workdir = self.tmp / "work"
        for folder in (home, workdir):
            folder.mkdir(exist_ok=True)
        trap = f"http://127.0.0.1:{self.trap_port}"
        return await run_claude_print(
            home,
            prompt,
            cwd=workdir,
            base_url=f"http://127.0.0.1:{self.relay_port}",
            api_key=self.proxy.api_key or "",
            timeout=limit,
            extra_args=extra_args,
            env={"HTTPS_PROXY": trap, "HTTP_PROXY": trap, "https_proxy": trap, "http_proxy": trap},
        )


@pytest.fixture
async def claude(
    nursery: trio.Nursery, make_mock: MockFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> ClaudeSetup:
    await claude_binary_async()  # install outside the timed part of the test
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock, api_key=True)
    relay = RecordingRelay(proxy.port)
    relay_port = await nursery.start(relay.serve)
    trap = Trap()
    trap_port = await nursery.start(trap.serve)
    return ClaudeSetup(proxy, relay, relay_port, trap, trap_port, tmp_path)


async def test_claude_code_runs_its_bash_tool_through_the_messages_front(
    claude: ClaudeSetup,
) -> None:
    proxy, mock = claude.proxy, claude.proxy.mock
    # first answer: a call of Claude Code's own Bash tool; second (not scripted): the mock
    # quotes the last line of the tool output it gets back
    bash = {"command": f"echo {MARKER}", "description": "Print a marker"}
    await mock.control.script({"function_call": {"name": "Bash", "arguments": bash}})
    result = await claude.run(
        f"Run `echo {MARKER}` with the Bash tool and tell me what it printed.",
        "--allowedTools",
        "Bash",
        "--max-turns",
        "4",
    )
    assert result.ok, result.describe()
    assert result.result is not None and result.result["is_error"] is False, result.describe()
    assert result.text == f"Tool output received: {MARKER}", result.describe()
    assert result.result["num_turns"] == 2 and not result.result["permission_denials"]

    # upstream: two model requests through the proxy, the second with the command's output
    sent = [r["body"] for r in await mock.control.model_requests()]
    assert len(sent) == 2, [list(b) for b in sent]
    calls = [i for i in sent[1]["input"] if i.get("type") == "function_call"]
    outputs = [i for i in sent[1]["input"] if i.get("type") == "function_call_output"]
    assert [c["name"] for c in calls] == ["Bash"] and json.loads(calls[0]["arguments"]) == bash
    assert len(outputs) == 1 and outputs[0]["call_id"] == calls[0]["call_id"]
    assert MARKER in str(outputs[0]["output"])
    # the reasoning the first answer carried went back upstream (as a thinking signature)
    assert any(i.get("type") == "reasoning" and i["encrypted_content"] for i in sent[1]["input"])
    # Claude Code's mid-conversation system turn arrives as a developer message
    assert any(i.get("role") == "developer" for i in sent[0]["input"])

    # what Claude Code sent: two streamed Messages requests with the key in x-api-key, nothing
    # else (no count_tokens, no models list), and no request to any other host
    seen = claude.relay.requests
    assert [(r.method, r.target) for r in seen] == [("POST", "/v1/messages?beta=true")] * 2
    for captured in seen:
        assert captured.headers["x-api-key"] == proxy.api_key
        assert "authorization" not in captured.headers
        assert captured.headers["anthropic-version"] == "2023-06-01"
        assert "claude-code-20250219" in captured.headers["anthropic-beta"]
        body = captured.json()
        assert body["stream"] is True and body["model"].startswith("claude-")
        assert "Bash" in [t["name"] for t in body["tools"]]
        assert "system" in [m["role"] for m in body["messages"]]
    assert claude.trap.seen == []

    # the proxy's request log: both on the Messages route, charged to the key
    keys = (await proxy.client.get(f"{proxy.root}/api/keys")).json()["keys"]
    (key_id,) = [k["key_id"] for k in keys]

    async def logged() -> bool:
        answer = await proxy.client.get(f"{proxy.root}/api/requests")
        rows = answer.json()["requests"]
        return len(rows) == 2 and all(
            r["route"] == "/v1/messages" and r["status"] == 200 and r["key_id"] == key_id
            for r in rows
        )

    await eventually(logged)


async def test_claude_code_is_served_incrementally_after_its_second_request(
    claude: ClaudeSetup,
) -> None:
    """Claude Code resends its whole conversation each time; from the third request on the
    proxy sends upstream only what is new, on the socket holding the turn before."""
    mock = claude.proxy.mock
    first = {"command": f"echo {MARKER}-1", "description": "Print the first marker"}
    second = {"command": f"echo {MARKER}-2", "description": "Print the second marker"}
    await mock.control.script(
        {"function_call": {"name": "Bash", "arguments": first}},
        {"function_call": {"name": "Bash", "arguments": second}},
    )
    result = await claude.run(
        f"Run `echo {MARKER}-1`, then `echo {MARKER}-2`, with the Bash tool.",
        "--allowedTools",
        "Bash",
        "--max-turns",
        "5",
    )
    assert result.ok, result.describe()
    assert result.text == f"Tool output received: {MARKER}-2", result.describe()
    sent = await mock.control.model_requests()
    assert [r["status"] for r in sent] == [200, 200, 200], [r["body"] for r in sent]
    # the first over HTTP; the second whole on a bridge session's socket; the third as the
    # second's continuation: anchored on its response, with the command's output only
    assert sent[0]["transport"] == "http"
    assert sent[1]["method"] == "WS" and "previous_response_id" not in sent[1]["body"]
    third = sent[2]["body"]
    assert sent[2]["parent"] == sent[1]["parent"]
    assert third["previous_response_id"] == sent[1]["response_id"]
    kinds = [i.get("type", "message") for i in third["input"]]
    assert "function_call_output" in kinds and "function_call" not in kinds, kinds
    assert f"{MARKER}-2" in str(third["input"])
    assert len(third["input"]) < len(sent[1]["body"]["input"])
