"""What a session remembers of its conversation, so the proxy can re-anchor it (sans-IO).

Upstream keeps ``previous_response_id`` state per WebSocket connection only. The session
keeps, for every response it relayed, the request's input items and the output items of
``response.output_item.done``, linked by ``previous_response_id``. When a request's anchor
cannot be used on the connection at hand (the connection is gone, the pin was reset, upstream
forgot it), ``full_input`` rebuilds the whole input from the chain, and the request is sent
without ``previous_response_id``.

Cross-account policy: encrypted reasoning (``reasoning`` items with ``encrypted_content``)
from one account is not assumed to be accepted by another, so reasoning items produced on a
different account than the target are left out. On the same account they are kept.
Compaction items are kept either way (they are the history itself).

Memory: each node counts the bytes of the frames it came from; past ``max_bytes`` the oldest
nodes are forgotten, and a chain that reaches a forgotten node is unknown (``full_input``
returns None: the client must resend). A :class:`ChainBudget` shared by every session caps
the total: past it, the least recently used conversations forget their oldest turns first.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import attrs


@attrs.frozen
class Node:
    parent: str | None
    input: tuple[Any, ...]
    output: tuple[Any, ...]
    account: str
    size: int


@attrs.define(eq=False)
class ChainBudget:
    """One memory budget over every session's chain (the global cap)."""

    max_bytes: int
    size: int = 0
    evicted: int = 0
    # chains holding memory, least recently used first (keyed by identity)
    chains: collections.OrderedDict[int, ResponseChain] = attrs.field(
        factory=collections.OrderedDict
    )

    def used(self, chain: ResponseChain, delta: int) -> None:
        self.size += delta
        self.chains[id(chain)] = chain
        self.chains.move_to_end(id(chain))

    def enforce(self) -> None:
        while self.size > self.max_bytes and self.chains:
            key, victim = next(iter(self.chains.items()))
            if not victim.nodes:
                del self.chains[key]
                continue
            victim.forget_oldest()
            self.evicted += 1

    def leave(self, chain: ResponseChain) -> None:
        if self.chains.pop(id(chain), None) is not None:
            self.size -= chain.size


@attrs.define(eq=False)
class ResponseChain:
    max_bytes: int = 16 * 1024 * 1024
    budget: ChainBudget | None = None
    nodes: collections.OrderedDict[str, Node] = attrs.field(factory=collections.OrderedDict)
    size: int = 0
    evicted: int = 0

    def forget_oldest(self) -> None:
        _, node = self.nodes.popitem(last=False)
        self.size -= node.size
        self.evicted += 1
        if self.budget is not None:
            self.budget.size -= node.size

    def close(self) -> None:
        """The session ends: its memory leaves the budget."""
        if self.budget is not None:
            self.budget.leave(self)
        self.nodes.clear()
        self.size = 0

    def remember(
        self,
        response_id: str,
        parent: str | None,
        input_items: Sequence[Any],
        output_items: Sequence[Any],
        account: str,
        size: int,
    ) -> None:
        delta = size
        if response_id in self.nodes:
            delta -= self.nodes.pop(response_id).size
        self.nodes[response_id] = Node(
            parent, tuple(input_items), tuple(output_items), account, size
        )
        self.size += delta
        if self.budget is not None:
            self.budget.used(self, delta)
        while self.size > self.max_bytes and self.nodes:
            self.forget_oldest()
        if self.budget is not None:
            self.budget.enforce()

    def knows(self, response_id: str) -> bool:
        return self.full_chain(response_id) is not None

    def full_chain(self, response_id: str) -> list[Node] | None:
        """The nodes from the root to ``response_id``, or None if any link is unknown."""
        out: list[Node] = []
        current: str | None = response_id
        seen: set[str] = set()
        while current is not None:
            node = self.nodes.get(current)
            if node is None or current in seen:
                return None
            seen.add(current)
            out.append(node)
            current = node.parent
        out.reverse()
        return out

    def full_input(
        self, anchor: str, new_input: Sequence[Any], target_account: str
    ) -> list[Any] | None:
        """The complete input for a request anchored on ``anchor`` (None if unknown)."""
        nodes = self.full_chain(anchor)
        if nodes is None:
            return None
        items: list[Any] = []
        for node in nodes:
            items += node.input
            for item in node.output:
                if (
                    node.account != target_account
                    and isinstance(item, dict)
                    and item.get("type") == "reasoning"
                ):
                    continue
                items.append(item)
        return items + list(new_input)
