"""The global memory cap over every session's re-anchoring chain (protocol/chain.py is
sans-IO: tested on its own), and the cap seen through the proxy."""

from __future__ import annotations

import gc
import json
import secrets
import tracemalloc
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import MockEnv, ProxyEnv, ProxyFactory
from tests.helpers import final_text, parse_sse, request_body, response_id, user_message
from trioproxy.protocol.chain import ChainBudget, Node, ResponseChain


def remember(chain: ResponseChain, rid: str, parent: str | None, size: int) -> None:
    """A turn charged ``size`` bytes (the charge of a real one is tested below)."""
    node = Node.of(parent, "acct", [user_message(rid)], [])
    chain.remember(rid, attrs.evolve(node, size=size))


def test_the_least_recently_used_conversation_forgets_first() -> None:
    budget = ChainBudget(max_bytes=300)
    a = ResponseChain(budget=budget)
    b = ResponseChain(budget=budget)
    remember(a, "a1", None, 100)
    remember(b, "b1", None, 100)
    remember(b, "b2", "b1", 100)
    assert budget.size == 300 and a.knows("a1") and b.knows("b2")
    remember(b, "b3", "b2", 100)  # over the cap: a is the least recently used
    assert not a.knows("a1") and b.knows("b3")
    assert budget.size == 300 == a.size + b.size
    remember(a, "a2", None, 100)  # now b is the least recently used: its oldest turn goes
    assert a.knows("a2") and not b.knows("b3") and "b3" in b.nodes
    b.close()
    assert budget.size == a.size == 100


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 400), st.booleans()),
        max_size=60,
    )
)
def test_the_budget_always_equals_the_live_chains_and_stays_under_its_cap(
    ops: list[tuple[int, int, bool]],
) -> None:
    budget = ChainBudget(max_bytes=1000)
    chains = [ResponseChain(max_bytes=700, budget=budget) for _ in range(4)]
    live = set(range(4))
    for n, (which, size, close) in enumerate(ops):
        chain = chains[which]
        if close:
            chain.close()
            live.discard(which)
            continue
        live.add(which)
        parent = next(reversed(chain.nodes), None)
        remember(chain, f"r{n}", parent, size)
        assert budget.size == sum(chains[i].size for i in live)
        assert budget.size <= budget.max_bytes
        assert all(c.size <= c.max_bytes for c in chains)


async def bridged(
    proxy: ProxyEnv, key: str, text: str, anchor: str | None = None
) -> tuple[int, list[dict[str, Any]]]:
    extra = {"previous_response_id": anchor} if anchor else {}
    response = await proxy.client.post(
        proxy.codex_url, json=request_body(text, **extra), headers={"session-id": key}
    )
    return response.status_code, parse_sse(response.text) if response.status_code == 200 else []


async def test_the_global_cap_makes_the_idle_conversation_forget_not_the_active_one(
    mock: MockEnv, make_proxy: ProxyFactory
) -> None:
    # what one such turn is charged, measured on a proxy of its own
    probe = await make_proxy(mock)
    await bridged(probe, "conv-probe", "mock:say a1")
    admission = (await probe.client.get(probe.root + "/api/admission")).json()
    turn = admission["memory"]["conversations"]["bytes"]
    assert turn > 0
    # room for two such turns and a half: the third one makes somebody forget
    proxy = await make_proxy(mock, reanchor_total_max_bytes=int(turn * 2.5))
    _, events = await bridged(proxy, "conv-a", "mock:say a1")
    anchor_a = response_id(events)
    _, events = await bridged(proxy, "conv-b", "mock:say b1")
    _, events = await bridged(proxy, "conv-b", "mock:say b2", response_id(events))
    anchor_b = response_id(events)
    # both upstream sockets are lost before their next turns
    await mock.control.add_fault("close_before_created", transport="ws", count=2)
    status_a, _ = await bridged(proxy, "conv-a", "mock:say a2", anchor_a)
    status_b, events = await bridged(proxy, "conv-b", "mock:say b3", anchor_b)
    assert status_a == 502  # its memory went to the active conversation: the client resends
    assert status_b == 200 and final_text(events) == "b3"  # re-anchored from memory


def codex_like_turn(n: int) -> tuple[list[Any], list[str]]:
    """A turn's input items and output events, shaped and sized like the Codex CLI's."""
    text = f"turn {n}: " + "please look at the failing test and fix it " * (n % 7 + 1)
    items = [user_message(text)]
    events = [
        json.dumps(
            {
                "type": "response.output_item.done",
                "sequence_number": 3,
                "output_index": 0,
                "item": {
                    "id": f"rs_{n:032x}",
                    "type": "reasoning",
                    "summary": [],
                    "encrypted_content": secrets.token_urlsafe(600 + 37 * (n % 11)),
                },
            }
        ),
        json.dumps(
            {
                "type": "response.output_item.done",
                "sequence_number": 9,
                "output_index": 1,
                "item": {
                    "id": f"msg_{n:032x}",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "annotations": [], "text": text * 3}],
                },
            }
        ),
    ]
    return items, events


def test_a_remembered_turn_is_charged_what_the_interpreter_holds_for_it() -> None:
    turns = [codex_like_turn(n) for n in range(2000)]
    chain = ResponseChain(max_bytes=1 << 40)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        parent = None
        for items, events in turns:
            rid = "resp_" + secrets.token_hex(14)  # as upstream's ids: kept as the chain's keys
            chain.remember(rid, Node.of(parent, "acct-1", items, events))
            parent = rid
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # the charge is what the memory budget counts: within a few percent of what is held
    assert 0.9 <= held / chain.size <= 1.1, (held, chain.size)
