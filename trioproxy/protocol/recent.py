"""A bounded set of the most recent response ids (sans-IO).

The ids an upstream connection holds, and the ids by which a bridge session is found, are
only ever asked about the latest turns of a conversation: a client continues from the
response it just got. Keeping every id a long-lived connection ever produced would grow by one
entry per turn for the connection's whole life; keeping the last ``limit`` bounds that, and an
older id simply is not found (the turn is re-anchored from the response chain, or the request
goes where its conversation key sends it).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import attrs

#: ids kept per connection and per bridge session
RECENT_IDS = 64


@attrs.define(eq=False)
class RecentIds:
    limit: int = RECENT_IDS
    _ids: collections.OrderedDict[str, None] = attrs.field(factory=collections.OrderedDict)

    def add(self, response_id: str) -> str | None:
        """Remember ``response_id``; the id forgotten to make room, if any."""
        ids = self._ids
        ids[response_id] = None
        ids.move_to_end(response_id)
        if len(ids) > self.limit:
            return ids.popitem(last=False)[0]
        return None

    def discard(self, response_id: str) -> None:
        self._ids.pop(response_id, None)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def clear(self) -> None:
        self._ids.clear()
