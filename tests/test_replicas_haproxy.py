"""Replicas behind the shipped HAProxy configuration (deploy/haproxy.cfg): conversations stick
to one replica, a replica killed outright is taken out and its conversations go on elsewhere,
and a rolling restart (each replica drained and started again) fails no turn.

Every replica is a real ``trioproxy serve`` process on one real PostgreSQL database, behind a
real HAProxy, in front of the mock backend (tests/replica_support.py). The clients here are
HTTP clients that send the whole conversation every turn, as the Codex CLI does over HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from tests.conftest import MockFactory
from tests.helpers import final_text, parse_sse, user_message
from tests.pg_support import PgServer
from tests.replica_support import Cluster, open_cluster
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.harness.mock_upstream.responses import DEFAULT_ANSWER

RESPONSES = "/backend-api/codex/responses"
#: answers paced like a (fast) model, about 0.2 s each, so that turns are in flight when a
#: replica dies or drains
PACED = MockConfig(accounts=2, first_event_delay=0.05, deltas=8, event_delay=0.02)
ATTEMPTS = 4  # a client tries a failed turn this many times in all (the Codex CLI retries)


@attrs.define(eq=False)
class Conversation:
    """A client that sends its whole conversation each turn, keyed by one header."""

    key: str
    header: str = "session_id"
    items: list[dict[str, Any]] = attrs.Factory(list)
    turns: int = 0
    failures: list[str] = attrs.Factory(list)
    latencies: list[float] = attrs.Factory(list)

    async def turn(self, cluster: Cluster, client: httpx.AsyncClient) -> None:
        """One turn, tried again after a failure (at most ``ATTEMPTS`` times in all)."""
        items = [*self.items, user_message(f"{self.key} turn {self.turns}")]
        body = {"model": "gpt-5.5", "stream": True, "store": False, "input": items}
        headers = {**cluster.headers, self.header: self.key}
        for _ in range(ATTEMPTS):
            started = trio.current_time()
            try:
                answer = await client.post(f"{cluster.url}{RESPONSES}", headers=headers, json=body)
                events = parse_sse(answer.text) if answer.status_code == 200 else []
            except httpx.TransportError as exc:
                self.failures.append(type(exc).__name__)
                continue
            if not any(e.get("type") == "response.completed" for e in events):
                self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                continue
            assert final_text(events) == DEFAULT_ANSWER
            self.latencies.append(trio.current_time() - started)
            self.items = [
                *items,
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": DEFAULT_ANSWER}],
                },
            ]
            self.turns += 1
            return
        raise AssertionError(
            f"{self.key}: turn {self.turns} failed {ATTEMPTS} times: {self.failures}"
        )


def delta(after: list[int | None], before: list[int | None]) -> list[int | None]:
    return [None if a is None or b is None else a - b for a, b in zip(after, before, strict=True)]


async def test_a_conversation_stays_on_one_replica_and_conversations_spread(
    make_mock: MockFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    async with (
        open_cluster(tmp_path, mock, pg_server.database(), replicas=3) as cluster,
        httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client,
    ):
        homes: dict[str, int] = {}
        for n, header in enumerate(["session-id", "session_id", "conversation_id"] * 4):
            conversation = Conversation(f"conversation-{n}", header)
            before = await cluster.served()
            for _ in range(3):
                await conversation.turn(cluster, client)
            served = delta(await cluster.served(), before)
            assert sorted(served, key=lambda c: c or 0) == [0, 0, 3], served
            homes[conversation.key] = served.index(3)
            assert conversation.failures == []
        print("replica of each conversation:", homes)
        assert len(set(homes.values())) >= 2

        # the first header present decides: session-id over session_id over conversation_id
        first = "conversation-0"
        other = next(k for k, home in homes.items() if home != homes[first])
        before = await cluster.served()
        answer = await client.post(
            f"{cluster.url}{RESPONSES}",
            headers={**cluster.headers, "session-id": first, "conversation_id": other},
            json={"model": "gpt-5.5", "stream": True, "input": [user_message("hi")]},
        )
        assert answer.status_code == 200
        served = delta(await cluster.served(), before)
        assert served[homes[first]] == 1 and sum(c or 0 for c in served) == 1

        # without a conversation header: round robin (HAProxy walks the consistent-hash ring,
        # so every replica takes its turn, not in strict rotation)
        before = await cluster.served()
        for _ in range(12):
            answer = await client.post(
                f"{cluster.url}{RESPONSES}",
                headers=cluster.headers,
                json={"model": "gpt-5.5", "stream": True, "input": [user_message("hi")]},
            )
            assert answer.status_code == 200
        spread = delta(await cluster.served(), before)
        print("requests without a conversation header, per replica:", spread)
        assert sum(c or 0 for c in spread) == 12 and all(c for c in spread)


async def test_a_killed_replica_is_taken_out_and_its_conversations_go_on_elsewhere(
    make_mock: MockFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    mock = await make_mock(PACED)
    conversations = [Conversation(f"kill-{n}") for n in range(9)]
    late = [Conversation(f"late-{n}") for n in range(6)]
    before_kill = 3
    after_kill = 5
    async with (
        open_cluster(tmp_path, mock, pg_server.database(), replicas=3) as cluster,
        httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client,
    ):
        ready = trio.Semaphore(0)

        async def client_task(conversation: Conversation) -> None:
            for _ in range(before_kill):
                await conversation.turn(cluster, client)
            ready.release()
            for _ in range(after_kill):
                await conversation.turn(cluster, client)

        async def killer() -> None:
            for _ in conversations:
                await ready.acquire()
            # the conversations now run their later turns; kill replica1 while they do (a
            # short wait puts the kill inside answers rather than between turns)
            await trio.sleep(0.1)
            served = await cluster.served()
            assert served[0], f"no conversation on replica1: {served}"
            await cluster.kill(0)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for conversation in conversations:
                    nursery.start_soon(client_task, conversation)
                nursery.start_soon(killer)
            # HAProxy has taken it out; new conversations start and finish on the others
            await cluster.wait_state(0, "DOWN")
            async with trio.open_nursery() as nursery:
                for conversation in late:
                    nursery.start_soon(conversation.turn, cluster, client)
        failures = [f for c in conversations for f in c.failures]
        before = [t for c in conversations for t in c.latencies[:before_kill]]
        after = [t for c in conversations for t in c.latencies[before_kill:]]
        print(
            f"turns failed while replica1 died: {len(failures)} {failures}; turn latency "
            f"max before {max(before) * 1000:.0f} ms, after {max(after) * 1000:.0f} ms"
        )
        assert all(c.turns == before_kill + after_kill for c in conversations)
        # only the turns in flight on replica1 when it died fail (one per conversation at
        # most): every later request that goes there is retried on another replica
        assert all(len(c.failures) <= 1 for c in conversations)
        assert all(c.turns == 1 and c.failures == [] for c in late)
        assert (await cluster.served())[0] is None


async def test_a_rolling_restart_loses_no_turn(
    make_mock: MockFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    mock = await make_mock(PACED)
    turns = 20
    conversations = [Conversation(f"rolling-{n}") for n in range(6)]
    async with (
        open_cluster(
            # the grace outlasts HAProxy's detection (a check every second, two failures
            # with checks every 250 ms in between): it sends nothing here once it ends
            tmp_path,
            mock,
            pg_server.database(),
            replicas=3,
            options={"drain_grace": 2.5},
        ) as cluster,
        httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client,
    ):
        replicas = len(cluster.replicas)
        progress = trio.Condition()
        draining = [trio.Event() for _ in range(replicas)]
        exits: list[int] = []

        def gate(i: int) -> int:
            return 3 + 5 * i  # replica i is drained once every conversation has had this many

        async def client_task(conversation: Conversation) -> None:
            for n in range(turns):
                # a turn past a restart's gate waits for that drain to have begun, so that
                # every drain happens while the conversations run
                for i in range(replicas):
                    if n == gate(i) + 2:
                        await draining[i].wait()
                await conversation.turn(cluster, client)
                async with progress:
                    progress.notify_all()

        async def restarter() -> None:
            for i in range(replicas):
                async with progress:
                    while min(c.turns for c in conversations) < gate(i):
                        await progress.wait()
                draining[i].set()
                exits.append(await cluster.drain(i))
                await cluster.start(i)
                await cluster.wait_state(i, "UP")

        with trio.fail_after(80):
            async with trio.open_nursery() as nursery:
                for conversation in conversations:
                    nursery.start_soon(client_task, conversation)
                nursery.start_soon(restarter)
        failures = [f for c in conversations for f in c.failures]
        print(
            f"rolling restart: {sum(c.turns for c in conversations)} turns, failures {failures}, "
            f"max turn latency {max(t for c in conversations for t in c.latencies) * 1000:.0f} ms"
        )
        assert exits == [0] * replicas
        assert all(c.turns == turns for c in conversations)
        # a request that reaches a replica after its SIGTERM, before HAProxy has marked it
        # down, is served as usual (the drain proper begins only after drain_grace)
        assert failures == []


async def test_a_claude_code_conversation_stays_on_one_replica_and_is_continued_there(
    make_mock: MockFactory, pg_server: PgServer, tmp_path: Path
) -> None:
    """Claude Code's session header keeps its conversation on one replica, where the later
    turns of its resent history go upstream as continuations."""
    mock = await make_mock(MockConfig(accounts=2))
    async with (
        open_cluster(tmp_path, mock, pg_server.database(), replicas=3) as cluster,
        httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client,
    ):
        homes = set()
        for n in range(3):
            await mock.control.clear_requests()
            headers = {**cluster.headers, "x-claude-code-session-id": f"claude-session-{n}"}
            messages: list[dict[str, Any]] = []
            before = await cluster.served()
            for turn in range(4):
                messages.append({"role": "user", "content": f"mock:say answer {n}.{turn}"})
                answer = await client.post(
                    f"{cluster.url}/v1/messages",
                    headers=headers,
                    json={"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": messages},
                )
                assert answer.status_code == 200, answer.text
                content = answer.json()["content"]
                assert content == [{"type": "text", "text": f"answer {n}.{turn}"}]
                messages.append({"role": "assistant", "content": content})
            served = delta(await cluster.served(), before)
            assert sorted(served, key=lambda c: c or 0) == [0, 0, 4], served
            homes.add(served.index(4))
            sent = [r["body"] for r in await mock.control.model_requests()]
            anchored = [bool(b.get("previous_response_id")) for b in sent]
            assert anchored == [False, False, True, True], anchored
            assert [len(b["input"]) for b in sent[2:]] == [1, 1]
        print("replicas of the Claude Code conversations:", homes)
