"""What a client with a budgeted key reads of rate limits: its key's budgets, not the
serving account's windows (``keys/rate_view.py``). :class:`KeyViewSink` wraps a front's sink
for such a client; every other client gets its sink as it is (:func:`sink_for`)."""

from __future__ import annotations

import attrs

from trioproxy.accounts.pool import UnixClock
from trioproxy.keys import rate_view
from trioproxy.keys.ring import Client, KeyState
from trioproxy.protocol.errors import ProxyError
from trioproxy.protocol.events import RATE_LIMITS, Batch, Event
from trioproxy.protocol.headers import RawHeaders
from trioproxy.sessions.sinks import Cut, Sink


@attrs.define(eq=False)
class KeyViewSink:
    """A sink whose rate-limit headers and ``codex.rate_limits`` events show ``key``'s
    budgets."""

    inner: Sink
    key: KeyState
    clock: UnixClock

    async def commit(self, upstream_headers: RawHeaders) -> None:
        now = self.clock.now()
        await self.inner.commit(rate_view.rewrite_headers(upstream_headers, self.key, now))

    async def events(self, batch: Batch) -> None:
        if RATE_LIMITS in batch.kinds:
            batch = Batch([self._rewrite(event) for event in batch.events])
        await self.inner.events(batch)

    def _rewrite(self, event: Event) -> Event:
        value = event.json() if event.kind == RATE_LIMITS else None
        if value is None:
            return event
        return Event.from_value(rate_view.rewrite_event(value, self.key, self.clock.now()))

    async def finish(self) -> None:
        await self.inner.finish()

    async def cut(self, cut: Cut) -> None:
        await self.inner.cut(cut)

    async def error(self, error: ProxyError) -> None:
        await self.inner.error(error)


def sink_for(client: Client, sink: Sink, clock: UnixClock) -> Sink:
    """``sink`` as ``client`` should see it."""
    key = client.key
    if key is None or not key.counters:
        return sink
    return KeyViewSink(sink, key, clock)


def headers_for(client: Client, headers: RawHeaders, clock: UnixClock) -> RawHeaders:
    """Upstream's handshake headers as ``client`` should see them."""
    key = client.key
    if key is None or not key.counters:
        return headers
    return rate_view.rewrite_headers(headers, key, clock.now())
