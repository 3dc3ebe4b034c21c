"""The proxy application: one ASGI app that sends each request to its front.

The Responses routes (HTTP and WebSocket) are raw ASGI handlers (``app/responses_http.py``,
``app/responses_ws.py``): a handler owns a nursery for its request's whole life, and the hot
path does not pay for a framework on every request. Everything else (health, models, usage,
metrics, the management API) is a Quart app (``app/management.py``); the management API has
an admission lane of its own (``dashboard``), so it stays reachable while the proxy lanes are
full. Probes and scrapes (``/health/*``, ``/metrics``) are never queued.
"""

from __future__ import annotations

from trioproxy.accounts.logins import LoginRegistry
from trioproxy.accounts.services import QuotaServices
from trioproxy.admission import Overloaded
from trioproxy.app.chat_front import ChatFront
from trioproxy.app.edge import EdgePolicy, edge_app
from trioproxy.app.fronts import Front
from trioproxy.app.management import create_management_app
from trioproxy.app.messages_front import MESSAGES
from trioproxy.app.responses_http import handle_http_responses
from trioproxy.app.responses_ws import deny, handle_ws_responses
from trioproxy.protocol.errors import ProxyError, json_bytes
from trioproxy.protocol.headers import response_headers
from trioproxy.sessions.bridge import BridgeRegistry
from trioproxy.sessions.context import ProxyContext
from trioproxy.web.asgi import ASGIApp, Receive, Scope, Send

PROXY_HTTP = {
    "/backend-api/codex/responses": "codex",
    "/v1/responses": "v1",
    "/backend-api/codex/responses/compact": "compact",
    "/v1/responses/compact": "compact",
}
PROXY_WS = frozenset({"/backend-api/codex/responses", "/v1/responses"})
#: other client APIs, translated onto the Responses API by their front (``app/fronts.py``)
FRONTS: dict[str, tuple[str, Front]] = {
    "/v1/chat/completions": ("chat", ChatFront()),
    "/v1/messages": ("messages", MESSAGES),
}
UNLANED = ("/health/", "/metrics")
#: routes whose clients read another API's error shape, and the front that gives it
SHAPED: dict[str, Front] = {
    **{path: front for path, (_, front) in FRONTS.items()},
    "/v1/messages/count_tokens": MESSAGES,
}


def create_app(
    ctx: ProxyContext,
    services: QuotaServices,
    bridges: BridgeRegistry | None,
    logins: LoginRegistry | None = None,
) -> ASGIApp:
    """The proxy application, behind the edge's rules (``app/edge.py``)."""
    management = create_management_app(ctx, services, bridges, logins, shaped)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        path = scope.get("path", "").rstrip("/") or "/"
        if kind == "http" and scope.get("method") == "POST" and path in PROXY_HTTP:
            await handle_http_responses(ctx, bridges, scope, receive, send, PROXY_HTTP[path])
        elif kind == "http" and scope.get("method") == "POST" and path in FRONTS:
            route, front = FRONTS[path]
            await handle_http_responses(ctx, bridges, scope, receive, send, route, front)
        elif kind == "websocket":
            if path in PROXY_WS:
                await handle_ws_responses(ctx, scope, receive, send)
            else:
                await receive()
                error = ProxyError.of(404, f"No WebSocket route {path}.", "not_found")
                await deny(scope, send, error, None)
        elif kind == "http" and not path.startswith(UNLANED):
            try:
                async with ctx.admission.lease("dashboard"):
                    await management(scope, receive, send)  # type: ignore[arg-type]
            except Overloaded as exc:
                await receive()
                await _overloaded(send, exc)
        else:
            await management(scope, receive, send)  # type: ignore[arg-type]

    return edge_app(app, EdgePolicy.from_settings(ctx.settings), shaped)


def shaped(path: str, error: ProxyError) -> ProxyError:
    """One of the proxy's own answers as the client of ``path`` expects it: in its API's
    error shape on another API's route, else as it is."""
    front = SHAPED.get(path.rstrip("/") or "/")
    return front.shape(error) if front is not None else error


def server_error(
    target: bytes, status: int, message: str, code: str, type_: str | None
) -> tuple[int, bytes]:
    """An answer of the HTTP server's own (a body too large, a full request-memory budget)
    for a request target, shaped for its route (``web/state.py``, ``ErrorShape``)."""
    path = target.partition(b"?")[0].decode("latin-1")
    answer = shaped(path, ProxyError.of(status, message, code, type_=type_))
    return answer.status, json_bytes(answer.body)


async def _overloaded(send: Send, exc: Overloaded) -> None:
    """The management lane is full: the local 429 (the body was not read, so the connection
    closes after it)."""
    data = json_bytes(exc.envelope())
    head = response_headers(None, length=len(data), extra=exc.headers(), close=True)
    await send({"type": "http.response.start", "status": 429, "headers": head})
    await send({"type": "http.response.body", "body": data})
