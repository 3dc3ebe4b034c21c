"""Which handler answers a request: the control API, the Responses endpoint (SSE or
WebSocket) or one of the other backend and OAuth endpoints. ``serve_mock`` serves
``functools.partial(handle, backend)``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from trioproxy.harness.mock_upstream import http_routes, login
from trioproxy.harness.mock_upstream.backend import MockBackend
from trioproxy.harness.mock_upstream.control import handle_control
from trioproxy.harness.mock_upstream.errors import Failure, err
from trioproxy.harness.mock_upstream.oauth import oauth_token
from trioproxy.harness.mock_upstream.recorder import RequestRecord
from trioproxy.harness.mock_upstream.transport import Exchange, Request
from trioproxy.harness.mock_upstream.writers import reply
from trioproxy.harness.mock_upstream.ws_sessions import websocket_session

RESPONSES = "/backend-api/codex/responses"
Route = Callable[[MockBackend, Request, Exchange, RequestRecord], Awaitable[None]]
# (method, path without a trailing slash) -> handler; a Failure it raises is its answer
ROUTES: dict[tuple[str, str], Route] = {
    ("POST", RESPONSES): http_routes.http_responses,
    ("POST", f"{RESPONSES}/compact"): http_routes.compact,
    ("GET", "/backend-api/codex/models"): http_routes.models,
    ("GET", "/backend-api/wham/usage"): http_routes.usage,
    ("GET", "/api/codex/usage"): http_routes.usage,
    ("GET", "/backend-api/wham/accounts/check"): http_routes.accounts_check,
    ("POST", "/oauth/token"): oauth_token,
    ("POST", "/api/accounts/deviceauth/usercode"): login.device_usercode,
    ("POST", "/api/accounts/deviceauth/token"): login.device_token,
    ("GET", "/oauth/authorize"): login.authorize,
    ("GET", "/codex/device"): login.device_page,
}


async def handle(backend: MockBackend, request: Request, exchange: Exchange) -> None:
    """Answer one request (``Stats.in_flight`` counts it while it runs, control calls aside)."""
    backend.stats.http_requests += 1
    record = backend.recorder.start(request, transport="ws" if request.is_websocket else "http")
    if request.path.startswith("/__mock__/"):
        await handle_control(backend, request, exchange)
        return
    backend.stats.in_flight += 1
    try:
        await dispatch(backend, request, exchange, record)
    finally:
        backend.stats.in_flight -= 1


async def dispatch(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    path = request.path.rstrip("/")
    if path == RESPONSES and request.is_websocket:
        await websocket_session(backend, request, exchange, record)
        return
    route = ROUTES.get((request.method, path))
    if route is None:
        if path == RESPONSES:
            body = err("Method not allowed", "invalid_request_error", "method_not_allowed")
            await reply(exchange, record, 405, body)
        else:
            await reply(exchange, record, 404, {"detail": "Not Found"})
        return
    try:
        await route(backend, request, exchange, record)
    except Failure as failure:
        await reply(exchange, record, failure.status, failure.body, failure.headers)
