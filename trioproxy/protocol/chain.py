"""What a conversation remembers of itself, so the proxy can re-anchor it (sans-IO).

Upstream keeps ``previous_response_id`` state per WebSocket connection only. A conversation
keeps, for every response it relayed, the request's input items and the output items of
``response.output_item.done``, linked by ``previous_response_id``. When a request's anchor
cannot be used on the connection at hand (the connection is gone, the pin was reset, upstream
forgot it), ``full_input`` rebuilds the whole input from the chain, and the request is sent
without ``previous_response_id``.

Cross-account policy: encrypted reasoning (``reasoning`` items with ``encrypted_content``)
from one account is not assumed to be accepted by another, so reasoning items produced on a
different account than the target are left out. On the same account they are kept.
Compaction items are kept either way (they are the history itself).

Memory: a turn is kept as bytes, not as parsed objects: its input items as compact JSON, its
output as the ``response.output_item.done`` events upstream sent, each compressed (zstd)
when that saves at least a tenth. Parsing happens only when a turn is re-anchored. A node is
charged what it really holds: its two blobs plus :data:`NODE_OVERHEAD` for the objects around
them (the node, its response id, its entry in the chain), so the budgets below bound the
process's memory, not a proxy for it (``tests/test_chain_budget.py`` checks the charge
against what the interpreter allocates). Past ``max_bytes`` a chain forgets its oldest turns,
and a chain that reaches a forgotten node is unknown (``full_input`` returns None: the client
must resend). A :class:`ChainBudget` shared by every conversation caps the total: past it,
the least recently used conversations forget their oldest turns first.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from typing import Any

import attrs
import zstandard

from trioproxy.protocol.errors import json_bytes

#: bytes a remembered turn costs besides its two blobs: the node object, the two bytes
#: objects' headers, its response id (a ~30-character string, held as the chain's key) and
#: that key's slot in the chain's ordered dict (what the interpreter allocates for them,
#: checked by tests/test_chain_budget.py)
NODE_OVERHEAD = 340
_COMPRESS_FROM = 256  # smaller blobs are kept as they are
_RAW, _ZSTD = b"=", b"z"
_compressor = zstandard.ZstdCompressor(level=3)
_decompressor = zstandard.ZstdDecompressor()


def pack(data: bytes) -> bytes:
    """``data`` as kept: zstd-compressed when that saves a tenth or more."""
    if len(data) >= _COMPRESS_FROM:
        packed = _compressor.compress(data)
        if len(packed) * 10 <= len(data) * 9:
            return _ZSTD + packed
    return _RAW + data


def unpack(blob: bytes) -> bytes:
    return _decompressor.decompress(blob[1:]) if blob[:1] == _ZSTD else blob[1:]


@attrs.frozen(slots=True)
class Node:
    """One remembered turn (see the module docstring)."""

    parent: str | None
    account: str
    input: bytes  # packed JSON list of the request's input items
    output: bytes  # packed JSON list of the turn's response.output_item.done events
    size: int  # what it is charged

    @classmethod
    def of(
        cls,
        parent: str | None,
        account: str,
        input_items: Sequence[Any],
        output_events: Sequence[str | bytes],
    ) -> Node:
        """A turn from its input items and its ``response.output_item.done`` events (each a
        JSON text as upstream sent it)."""
        packed_input = pack(json_bytes(list(input_items)))
        events = [e.encode() if isinstance(e, str) else e for e in output_events]
        packed_output = pack(b"[" + b",".join(events) + b"]")
        size = len(packed_input) + len(packed_output) + NODE_OVERHEAD
        return cls(parent, account, packed_input, packed_output, size)

    def input_items(self) -> list[Any]:
        value = json.loads(unpack(self.input))
        return value if isinstance(value, list) else []

    def output_items(self) -> list[Any]:
        events = json.loads(unpack(self.output))
        if not isinstance(events, list):
            return []
        return [e.get("item") for e in events if isinstance(e, dict) and e.get("item")]


@attrs.define(eq=False)
class ChainBudget:
    """One memory budget over every conversation's chain (the global cap)."""

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

    def statistics(self) -> ChainStatistics:
        return ChainStatistics(
            conversations=len(self.chains),
            bytes=self.size,
            max_bytes=self.max_bytes,
            evicted_total=self.evicted,
        )


@attrs.frozen
class ChainStatistics:
    conversations: int  # conversations holding remembered turns
    bytes: int  # what they are charged, together
    max_bytes: int
    evicted_total: int  # turns forgotten to stay under the cap


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
        """The conversation ends: its memory leaves the budget."""
        if self.budget is not None:
            self.budget.leave(self)
        self.nodes.clear()
        self.size = 0

    def remember(self, response_id: str, node: Node) -> None:
        delta = node.size
        if response_id in self.nodes:
            delta -= self.nodes.pop(response_id).size
        self.nodes[response_id] = node
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
            items += node.input_items()
            for item in node.output_items():
                if (
                    node.account != target_account
                    and isinstance(item, dict)
                    and item.get("type") == "reasoning"
                ):
                    continue
                items.append(item)
        return items + list(new_input)
