"""The ASGI application: the proxy routes (raw ASGI, see asgi.py) in front of a quart-trio
app for everything else (health, models, management API)."""

from __future__ import annotations

from typing import Any

import httpx
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioproxy.accounts.authfile import AuthFileError, parse_auth_json
from trioproxy.accounts.pool import RequestInfo
from trioproxy.accounts.refresh import RefreshError
from trioproxy.admission import Overloaded
from trioproxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from trioproxy.metrics import render_metrics
from trioproxy.protocol.errors import error_envelope
from trioproxy.protocol.headers import passthrough_response_headers
from trioproxy.sessions.context import ProxyContext, ProxyError
from trioproxy.sessions.http_turn import handle_http_responses
from trioproxy.sessions.upstream_turn import json_bytes
from trioproxy.sessions.ws_session import deny, handle_ws_responses
from trioproxy.web.asgi import Receive, Scope, Send

PROXY_HTTP = {
    "/backend-api/codex/responses": "codex",
    "/v1/responses": "v1",
    "/backend-api/codex/responses/compact": "compact",
    "/v1/responses/compact": "compact",
}
PROXY_WS = frozenset({"/backend-api/codex/responses", "/v1/responses"})
OPEN_PATHS = frozenset({"/health/live", "/health/ready"})
UNLANED = ("/health/", "/metrics")  # probes and scrapes always get through


def create_app(ctx: ProxyContext) -> Any:
    quart = create_quart_app(ctx)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        path = scope.get("path", "").rstrip("/") or "/"
        if kind == "http" and scope.get("method") == "POST" and path in PROXY_HTTP:
            await handle_http_responses(ctx, scope, receive, send, PROXY_HTTP[path])
        elif kind == "websocket":
            if path in PROXY_WS:
                await handle_ws_responses(ctx, scope, receive, send)
            else:
                await receive()
                await deny(
                    scope,
                    send,
                    404,
                    error_envelope(
                        f"No WebSocket route {path}.", "invalid_request_error", "not_found"
                    ),
                )
        elif kind == "http" and not path.startswith(UNLANED):
            # the management API has a lane of its own: reachable while proxy lanes are full
            try:
                async with ctx.admission.lease("dashboard"):
                    await quart(scope, receive, send)  # type: ignore[arg-type]
            except Overloaded as exc:
                await receive()
                data = json_bytes(exc.envelope())
                await send(
                    {
                        "type": "http.response.start",
                        "status": 429,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"),
                            *((k.encode(), v.encode()) for k, v in exc.headers()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": data})
        else:
            await quart(scope, receive, send)  # type: ignore[arg-type]

    return app


def create_quart_app(ctx: ProxyContext) -> QuartTrio:
    app = QuartTrio("trioproxy")
    app.config.update(MAX_CONTENT_LENGTH=16 * 1024 * 1024, BODY_TIMEOUT=60, RESPONSE_TIMEOUT=None)

    @app.before_request
    async def client_auth() -> tuple[Response, int] | None:
        if request.path in OPEN_PATHS:
            return None
        try:
            await ctx.authorize(
                [(k.lower(), v) for k, v in request.headers.items()], request.remote_addr
            )
        except ProxyError as exc:
            return jsonify(exc.body), exc.status
        return None

    @app.get("/health/live")
    async def live() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/health/ready")
    async def ready() -> tuple[Response, int]:
        if ctx.draining:
            return jsonify({"status": "draining"}), 503
        return jsonify({"status": "ready", "accounts": len(ctx.pool.accounts)}), 200

    async def upstream_models() -> tuple[int, Any, list[tuple[str, str]]]:
        decision = ctx.pool.select(RequestInfo())
        if decision.chosen is None:
            raise ProxyError(
                503,
                error_envelope(
                    "No account available to list models.", "server_error", "no_available_account"
                ),
            )
        account = ctx.pool.accounts[decision.chosen]
        try:
            token = await ctx.tokens.token_for(account)
        except RefreshError as exc:
            raise ProxyError(
                503,
                error_envelope(
                    f"No account available to list models: {exc.reason}.",
                    "server_error",
                    "no_available_account",
                ),
            ) from None
        try:
            response = await ctx.http.get(
                f"{ctx.upstream}/codex/models",
                params=dict(request.args),
                headers={
                    "authorization": f"Bearer {token}",
                    "chatgpt-account-id": account.account_id,
                },
            )
        except httpx.HTTPError as exc:
            raise ProxyError(
                502,
                error_envelope(
                    f"Upstream unreachable ({type(exc).__name__}).",
                    "upstream_error",
                    "upstream_unavailable",
                ),
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = error_envelope(
                "Upstream sent a non-JSON model list.", "upstream_error", "upstream_bad_response"
            )
        return response.status_code, body, passthrough_response_headers(response.headers.items())

    @app.get("/backend-api/codex/models")
    async def codex_models() -> tuple[Response, int, list[tuple[str, str]]]:
        status, body, headers = await upstream_models()
        return jsonify(body), status, headers

    @app.get("/v1/models")
    async def v1_models() -> tuple[Response, int]:
        status, body, _ = await upstream_models()
        if status != 200:
            return jsonify(body), status
        models = body.get("models", []) if isinstance(body, dict) else []
        data = [
            {"id": m.get("slug"), "object": "model", "created": 0, "owned_by": "openai"}
            for m in models
            if isinstance(m, dict)
        ]
        return jsonify({"object": "list", "data": data}), 200

    @app.get("/api/accounts")
    async def list_accounts() -> Response:
        now = ctx.pool.clock.now()
        return jsonify({"accounts": [a.view(now) for a in ctx.pool.accounts.values()]})

    @app.post("/api/accounts")
    async def import_accounts() -> tuple[Response, int]:
        data = await request.get_json(force=True, silent=True)
        if data is None:
            return jsonify(
                error_envelope(
                    "Send a Codex auth.json object (or a list of them) as JSON.",
                    "invalid_request_error",
                    "invalid_json",
                )
            ), 400
        items = data if isinstance(data, list) else [data]
        now = ctx.pool.clock.now()
        results = []
        for item in items:
            try:
                record = parse_auth_json(item, now=now)
            except AuthFileError as exc:
                return jsonify(
                    error_envelope(str(exc), "invalid_request_error", "invalid_auth_json")
                ), 400
            stored, created = await ctx.store.run(ctx.store.upsert_account, record)
            results.append(
                {
                    "account_id": stored.account_id,
                    "email": stored.email,
                    "plan": stored.plan,
                    "created": created,
                }
            )
        ctx.pool.sync(await ctx.store.run(ctx.store.list_accounts))
        return jsonify({"accounts": results}), 201 if any(r["created"] for r in results) else 200

    @app.delete("/api/accounts/<account_id>")
    async def remove_account(account_id: str) -> tuple[Response, int]:
        removed = await ctx.store.run(ctx.store.remove_account, account_id)
        if not removed:
            return jsonify(
                error_envelope(
                    f"No account {account_id}.", "invalid_request_error", "unknown_account"
                )
            ), 404
        ctx.pool.sync(await ctx.store.run(ctx.store.list_accounts))
        return jsonify({"removed": account_id}), 200

    @app.get("/api/admission")
    async def admission() -> Response:
        return jsonify(ctx.admission.statistics().as_json())

    @app.get("/metrics")
    async def metrics() -> Response:
        extra = {
            "trioproxy_accounts": float(len(ctx.pool.accounts)),
            "trioproxy_websocket_sessions_total": float(ctx.counters["websocket_sessions"]),
            "trioproxy_reanchored_total": float(ctx.counters["reanchored"]),
            "trioproxy_request_log_dropped_total": float(ctx.reqlog.dropped),
        }
        return Response(
            render_metrics(ctx.admission.statistics(), extra), content_type=METRICS_CONTENT_TYPE
        )

    @app.get("/api/stats")
    async def stats() -> Response:
        return jsonify(
            {
                "counters": dict(ctx.counters),
                "accounts": len(ctx.pool.accounts),
                "refresh_calls": ctx.tokens.refresh_calls,
            }
        )

    @app.get("/api/requests")
    async def recent_requests() -> tuple[Response, int]:
        try:
            limit = max(1, min(1000, int(request.args.get("limit", 100))))
        except ValueError:
            return jsonify(
                error_envelope(
                    "limit must be an integer.",
                    "invalid_request_error",
                    "invalid_parameter",
                    "limit",
                )
            ), 400
        rows = await ctx.store.run(ctx.store.recent_requests, limit)
        return jsonify({"requests": rows}), 200

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            status, "http_error"
        )
        return jsonify(
            error_envelope(exc.description or exc.name, "invalid_request_error", code)
        ), status

    @app.errorhandler(ProxyError)
    async def proxy_error(exc: ProxyError) -> tuple[Response, int, list[tuple[str, str]]]:
        return jsonify(exc.body), exc.status, exc.headers

    return app
