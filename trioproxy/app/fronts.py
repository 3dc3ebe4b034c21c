"""Client APIs other than the Responses API, as adapters onto the one conversation core.

A :class:`Front` is what the HTTP handler (``app/responses_http.py``) needs to serve another
API's requests: it translates a request body into a Responses request, says whether the
client asked for a stream, makes the sink that renders the core's answer in the client's
format, and shapes the proxy's own errors as that API's clients expect them. Admission, keys
and budgets, routing, failover, continuity and accounting stay the handler's and the core's:
a front has none of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from trioproxy.protocol.errors import ProxyError
from trioproxy.sessions.sinks import Sink

if TYPE_CHECKING:
    from trioproxy.app.downstream import Downstream, KeepAlive


class Front(Protocol):
    def translate(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Responses request for ``body`` (the handler makes it a streamed, unstored
        one); a request that cannot be served raises a 400 :class:`ProxyError`."""

    def streams(self, body: dict[str, Any]) -> bool:
        """Whether the client asked for a stream."""

    def sink(
        self,
        down: Downstream,
        keepalive: KeepAlive | None,
        streaming: bool,
        body: dict[str, Any],
        translated: dict[str, Any],
    ) -> Sink:
        """The sink rendering a turn's answer for this API's client (``body`` as the client
        sent it, ``translated`` the Responses request it became)."""

    def shape(self, error: ProxyError) -> ProxyError:
        """The proxy's own answer, as this API's clients expect errors."""
