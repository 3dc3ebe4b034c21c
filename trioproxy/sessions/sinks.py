"""Where a turn's answer goes: the small typed interface every client front implements.

The conversation core (``sessions/conversation.py``) runs a turn and writes what the client
should get to a :class:`Sink`, in this order: ``commit`` once the turn has an answer to give
(upstream's first event is in; upstream headers a client reads come with it), then
``events`` for every batch upstream delivered, then either ``finish`` (the turn ended) or
``cut`` (upstream broke off after output had reached the client). A turn that has no answer
from upstream (every account failed, the request was refused, the anchor is lost) gets
``error`` instead, exactly once, possibly after the sink committed on its own (an HTTP
stream that had to send keep-alives while upstream was silent).

A front renders these for its client: SSE or one JSON answer over HTTP, messages and close
codes over a WebSocket. The core never builds a client-facing byte itself.
"""

from __future__ import annotations

from typing import Protocol

from trioproxy.protocol.errors import ProxyError
from trioproxy.protocol.events import Batch
from trioproxy.protocol.headers import RawHeaders


class Cut(Exception):
    """Upstream broke off after output had reached the client: a WebSocket close ``code``
    (1006 for a connection lost without a close frame), or ``None`` for an HTTP stream that
    broke mid-body."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code

    @property
    def reason(self) -> str:
        return "upstream_stream_broken" if self.code is None else f"upstream_closed_{self.code}"


class Sink(Protocol):
    async def commit(self, upstream_headers: RawHeaders) -> None:
        """The turn's answer starts (called once, before the first ``events``)."""

    async def events(self, batch: Batch) -> None:
        """Events upstream delivered, in order."""

    async def finish(self) -> None:
        """The turn ended (its terminal event, or the end of upstream's stream)."""

    async def cut(self, cut: Cut) -> None:
        """Upstream broke off after output (instead of ``finish``)."""

    async def error(self, error: ProxyError) -> None:
        """The turn's answer is the proxy's own (instead of all of the above)."""
