"""What the proxy's memory really costs, part by part (docs/memory.md).

``python -m trioproxy.harness.bench.memory conversations [MIB] [CONVERSATIONS]`` fills a
:class:`~trioproxy.protocol.chain.ChainBudget` of ``MIB`` MiB (default 64) with turns shaped
like the Codex CLI's (a user message of 10 B to 4 KB, an encrypted reasoning item, an answer),
spread over ``CONVERSATIONS`` conversations (default 200), then keeps going for as many turns
again, so that the budget forgets old turns while new ones arrive (the steady state of a busy
proxy). It prints the process's resident memory before and after, the bytes the budget
counts, and their ratio: what an operator's ``reanchor_total_max_bytes`` really costs.

``python -m trioproxy.harness.bench.memory bridge [SESSIONS]`` starts a proxy in front of the
mock (the bench's stack) and opens ``SESSIONS`` HTTP bridge sessions (default 200), one turn
each with a conversation key of its own, then prints the proxy's RSS before and after and the
cost of one idle bridge session (its upstream WebSocket and what it keeps). Both are bounded:
by the number of turns, and by the number of sessions.
"""

from __future__ import annotations

import gc
import json
import random
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import trio

from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import HttpClient
from trioproxy.harness.bench.stack import start_stack
from trioproxy.protocol.chain import ChainBudget, Node, ResponseChain


def turn(rng: random.Random, n: int) -> tuple[list[object], list[str]]:
    text = "mock:say " + "".join(
        rng.choice("abcdefghij klmnop") for _ in range(rng.randint(10, 4096))
    )
    items: list[object] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    ]
    reasoning = {
        "id": f"rs_{n:032x}",
        "type": "reasoning",
        "summary": [],
        "encrypted_content": secrets.token_urlsafe(rng.randint(300, 1500)),
    }
    answer = {
        "id": f"msg_{n:032x}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [
            {"type": "output_text", "annotations": [], "text": text[: rng.randint(10, 2000)]}
        ],
    }
    events = [
        json.dumps({"type": "response.output_item.done", "output_index": i, "item": item})
        for i, item in enumerate((reasoning, answer))
    ]
    return items, events


def measure(mib: int, conversations: int, seed: int = 7) -> dict[str, float]:
    rng = random.Random(seed)
    process = psutil.Process()
    budget = ChainBudget(mib * 2**20)
    chains = [ResponseChain(budget=budget) for _ in range(conversations)]
    last: list[str | None] = [None] * conversations
    gc.collect()
    before = process.memory_info().rss
    n = 0
    to_fill: int | None = None  # turns it took to fill the budget

    def one() -> None:
        nonlocal n
        which = rng.randrange(conversations)
        rid = "resp_" + secrets.token_hex(14)
        items, events = turn(rng, n)
        chains[which].remember(rid, Node.of(last[which], "acct-1", items, events))
        last[which] = rid
        n += 1

    while budget.evicted == 0 and n < 5_000_000:
        one()
    to_fill = n
    for _ in range(to_fill):  # as many turns again: it forgets as it learns
        one()
    gc.collect()
    after = process.memory_info().rss
    return {
        "budget_mib": mib,
        "turns": n,
        "turns_to_fill": to_fill,
        "held_mib": round(budget.size / 2**20, 1),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_per_budgeted_byte": round((after - before) / budget.size, 3),
    }


async def measure_bridge(sessions: int) -> dict[str, Any]:
    body = bodies.encode(bodies.request([bodies.user_message("mock:say hi")], thread=None))
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            stack = await start_stack(
                nursery,
                Path(tmp),
                accounts=2,
                proxy_options={"log-level": "warning", "bridge-max-sessions": sessions + 10},
                logs=[],
            )
            assert stack.proxy_pid is not None
            proxy = psutil.Process(stack.proxy_pid)
            client = HttpClient(stack.proxy.host, stack.proxy.port, [])
            try:
                for _ in range(20):  # warm-up: the same path, with no session kept
                    await client.sse_turn(stack.proxy.path, body, [])
                before = proxy.memory_info().rss
                for n in range(sessions):
                    outcome = await client.sse_turn(
                        stack.proxy.path, body, [("session-id", f"measure-{n}")]
                    )
                    if not outcome.completed:
                        raise RuntimeError(f"turn failed: {outcome.error}")
                await trio.sleep(1.0)
                after = proxy.memory_info().rss
            finally:
                await client.aclose()
            nursery.cancel_scope.cancel(reason="measured")
    return {
        "bridge_sessions": sessions,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "kib_per_session": round((after - before) / sessions / 1024, 1),
    }


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "conversations"
    if what == "bridge":
        print(json.dumps(trio.run(measure_bridge, int(argv[1]) if len(argv) > 1 else 200)))
        return
    mib = int(argv[1]) if len(argv) > 1 else 64
    conversations = int(argv[2]) if len(argv) > 2 else 200
    print(json.dumps(measure(mib, conversations)))


if __name__ == "__main__":
    main(sys.argv[1:])
