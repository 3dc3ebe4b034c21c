"""What the conversation memory really costs: RSS per byte the budget counts.

``python -m trioproxy.harness.bench.memory [MIB] [CONVERSATIONS]`` fills a
:class:`~trioproxy.protocol.chain.ChainBudget` of ``MIB`` MiB (default 64) with turns shaped
like the Codex CLI's (a user message of 10 B to 4 KB, an encrypted reasoning item, an answer),
spread over ``CONVERSATIONS`` conversations (default 200), then keeps going for as many turns
again, so that the budget forgets old turns while new ones arrive (the steady state of a busy
proxy). It prints the process's resident memory before and after, the bytes the budget
counts, and their ratio: what an operator's ``reanchor_total_max_bytes`` really costs.
Every loop is bounded by the number of turns.
"""

from __future__ import annotations

import gc
import json
import random
import secrets
import sys

import psutil

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


if __name__ == "__main__":
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    conversations = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    print(json.dumps(measure(mib, conversations)))
