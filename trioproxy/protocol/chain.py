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
returns None: the client must resend).
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
class ResponseChain:
    max_bytes: int = 16 * 1024 * 1024
    nodes: collections.OrderedDict[str, Node] = attrs.field(factory=collections.OrderedDict)
    size: int = 0
    evicted: int = 0

    def remember(
        self,
        response_id: str,
        parent: str | None,
        input_items: Sequence[Any],
        output_items: Sequence[Any],
        account: str,
        size: int,
    ) -> None:
        if response_id in self.nodes:
            self.size -= self.nodes.pop(response_id).size
        self.nodes[response_id] = Node(
            parent, tuple(input_items), tuple(output_items), account, size
        )
        self.size += size
        while self.size > self.max_bytes and self.nodes:
            _, node = self.nodes.popitem(last=False)
            self.size -= node.size
            self.evicted += 1

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
