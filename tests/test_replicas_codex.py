"""The real Codex CLI through HAProxy in front of two replicas on PostgreSQL, with the replica
that served a conversation's first turn killed (SIGKILL) before its second turn
(docs/continuity.md, "Durable chains").

Turn 1 is ``codex exec``, turn 2 ``codex exec resume <session>`` in the same ``CODEX_HOME``
(a new CLI process, so a new connection), over HTTP and over WebSocket. A second
conversation in the same cluster, whose replica is not killed, gives the same two turns
for comparison. Between the CLI and HAProxy a byte-counting TCP relay measures what the CLI
sent for each run as it was on the wire: over HTTP the request line, headers and JSON body;
over WebSocket the handshake and the frames, which the CLI compresses (``permessage-deflate``,
agreed with the proxy). The mock records the model requests as they reached upstream, as
JSON (over WebSocket the CLI's prewarm, ``generate: false``, and the turn's request, each
with the instructions and tools).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.codex_cli import (
    CodexResult,
    codex_binary_async,
    custom_provider_config,
    run_codex_exec,
    write_codex_home,
)
from tests.conftest import MockEnv, MockFactory
from tests.pg_support import PgServer
from tests.replica_support import Cluster, open_cluster
from trioproxy.harness.mock_upstream import MockConfig

pytestmark = pytest.mark.codex_cli
FIRST, SECOND = "first-answer-from-the-mock", "second-answer-from-the-mock"


@attrs.define(eq=False)
class Relay:
    """A TCP relay to ``target`` that counts the bytes its clients send (``sent``)."""

    target: int
    sent: int = 0

    async def handle(self, client: trio.SocketStream) -> None:
        async with (
            client,
            await trio.open_tcp_stream("127.0.0.1", self.target) as server,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._pump, client, server, True, nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, False, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, up: bool, done: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(1 << 16):
                if up:
                    self.sent += len(data)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()  # either side gone: the connection is over


@attrs.define(eq=False)
class Turn:
    """One ``codex exec`` run: what it answered, the bytes it sent, where it was served."""

    result: CodexResult
    sent: int
    served: list[int | None]
    model_requests: list[dict[str, Any]]

    @property
    def thread(self) -> str:
        return next(str(e["thread_id"]) for e in self.result.events if "thread_id" in e)

    @property
    def replica(self) -> int:
        busy = [i for i, n in enumerate(self.served) if n]
        assert len(busy) == 1, f"turn served by several replicas: {self.served}"
        return busy[0]

    @property
    def model_bytes(self) -> int:
        """The model requests' bodies as they reached upstream (compact JSON)."""
        return sum(len(json.dumps(r["body"], separators=(",", ":"))) for r in self.model_requests)


@attrs.define(eq=False)
class Client:
    """The Codex CLI pointed at the relay, one ``CODEX_HOME`` per conversation."""

    mock: MockEnv
    cluster: Cluster
    relay: Relay
    relay_port: int
    websockets: bool
    tmp: Path

    async def turn(self, home: Path, prompt: str, resume: str | None = None) -> Turn:
        config = custom_provider_config(
            f"http://127.0.0.1:{self.relay_port}/backend-api/codex",
            websockets=self.websockets,
            env_key="TRIOPROXY_API_KEY",
        )
        write_codex_home(home, auth=None, config_toml=config)
        before = await self.cluster.served()
        seen = len(await self.mock.control.model_requests())
        self.relay.sent = 0
        result = await run_codex_exec(
            home,
            prompt,
            cwd=self.tmp,
            timeout=60,
            extra_args=("resume", resume) if resume else (),
            env={"TRIOPROXY_API_KEY": self.cluster.api_key},
        )
        assert result.ok, result.describe()
        after = await self.cluster.served()
        served = [None if a is None else a - (b or 0) for a, b in zip(after, before, strict=True)]
        requests = (await self.mock.control.model_requests())[seen:]
        return Turn(result, self.relay.sent, served, requests)


def texts(body: dict[str, Any]) -> list[str]:
    """The text of every message item of a model request's input, in order."""
    return [
        str(part.get("text"))
        for item in body.get("input", [])
        if item.get("type") == "message"
        for part in item.get("content", [])
        if isinstance(part, dict)
    ]


@pytest.mark.parametrize("websockets", [False, True], ids=["http", "websocket"])
async def test_codex_cli_conversation_survives_its_replica_killed_between_turns(
    make_mock: MockFactory,
    pg_server: PgServer,
    tmp_path: Path,
    nursery: trio.Nursery,
    websockets: bool,
) -> None:
    await codex_binary_async()
    mock = await make_mock(MockConfig(accounts=2))
    async with open_cluster(tmp_path, mock, pg_server.database(), replicas=2) as cluster:
        relay = Relay(cluster.port)
        listeners = await nursery.start(partial(trio.serve_tcp, relay.handle, 0, host="127.0.0.1"))
        client = Client(
            mock, cluster, relay, listeners[0].socket.getsockname()[1], websockets, tmp_path
        )

        # the comparison: two turns, the replica that serves them stays up
        kept = tmp_path / "home-kept"
        kept_1 = await client.turn(kept, f"mock:say {FIRST}")
        kept_2 = await client.turn(kept, f"mock:say {SECOND}", resume=kept_1.thread)
        assert kept_2.thread == kept_1.thread
        assert kept_2.replica == kept_1.replica
        assert (kept_1.result.final_message, kept_2.result.final_message) == (FIRST, SECOND)

        # turn 1 on replica A, A killed, turn 2 (right away: HAProxy finds A dead)
        moved = tmp_path / "home-moved"
        moved_1 = await client.turn(moved, f"mock:say {FIRST}")
        a = moved_1.replica
        await cluster.kill(a)
        moved_2 = await client.turn(moved, f"mock:say {SECOND}", resume=moved_1.thread)
        assert moved_2.thread == moved_1.thread
        assert moved_2.served[a] is None and moved_2.replica == 1 - a  # served by B
        assert (moved_1.result.final_message, moved_2.result.final_message) == (FIRST, SECOND)
        await cluster.wait_state(a, "DOWN")

        # no conversation lost: turn 2's model request carries turn 1 (the CLI's own history).
        # It names no earlier turn's response: over HTTP no anchor at all, over WebSocket the
        # prewarm (generate: false) the same process sent just before on the same socket
        for second in (kept_2, moved_2):
            generating = [
                r for r in second.model_requests if r["body"].get("generate") is not False
            ]
            assert len(generating) == 1, [r["body"].get("generate") for r in second.model_requests]
            body = generating[0]["body"]
            prewarms = [r["response_id"] for r in second.model_requests if r not in generating]
            assert body.get("previous_response_id") == (prewarms[0] if websockets else None)
            said = texts(body)
            assert (
                said.index(f"mock:say {FIRST}")
                < said.index(FIRST)
                < said.index(f"mock:say {SECOND}")
            ), said
        # so replica B needed nothing from the durable chains
        answer = await cluster.client.get(
            f"{cluster.replicas[1 - a].url}/api/stats", headers=cluster.headers
        )
        assert answer.status_code == 200, answer.text
        counters = answer.json()["counters"]
        assert counters.get("durable_chain_recalled", 0) == 0
        assert counters.get("durable_chain_missed", 0) == 0

        transport = "WebSocket" if websockets else "HTTP"
        print(
            f"\nCodex CLI over {transport}, bytes sent by the CLI (relay) / model request "
            f"bodies upstream (mock):\n"
            f"  replica kept:   turn 1 {kept_1.sent} / {kept_1.model_bytes}, "
            f"turn 2 {kept_2.sent} / {kept_2.model_bytes}\n"
            f"  replica killed: turn 1 {moved_1.sent} / {moved_1.model_bytes}, "
            f"turn 2 {moved_2.sent} / {moved_2.model_bytes} (served by replica{2 - a})"
        )
        # the same two turns cost the CLI about the same whether its replica died or not: it
        # resends its history either way (a new process, a new connection)
        assert abs(moved_2.sent - kept_2.sent) < kept_2.sent // 10
        assert moved_2.sent > moved_1.sent
