"""The ASGI application: the proxy routes (raw ASGI, see asgi.py) in front of a quart-trio
app for everything else (health, models, management API)."""

from __future__ import annotations

from typing import Any

import attrs
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioproxy.accounts.authfile import AuthFileError, parse_auth_json
from trioproxy.accounts.pool_usage import pool_usage
from trioproxy.accounts.services import QuotaServices
from trioproxy.admission import Overloaded
from trioproxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from trioproxy.metrics import render_metrics
from trioproxy.protocol.errors import error_envelope
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


def create_app(ctx: ProxyContext, services: QuotaServices) -> Any:
    quart = create_quart_app(ctx, services)

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


def create_quart_app(ctx: ProxyContext, services: QuotaServices) -> QuartTrio:
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

    @app.get("/backend-api/codex/models")
    async def codex_models() -> tuple[Response, int, list[tuple[str, str]]]:
        await services.registry.ensure()
        etag = services.registry.etag()
        return (
            jsonify({"models": services.registry.models()}),
            200,
            [
                ("x-models-etag", etag),
                ("etag", etag),
            ],
        )

    @app.get("/v1/models")
    async def v1_models() -> tuple[Response, int]:
        await services.registry.ensure()
        data = [
            {"id": m.get("slug"), "object": "model", "created": 0, "owned_by": "openai"}
            for m in services.registry.models()
        ]
        return jsonify({"object": "list", "data": data}), 200

    @app.get("/backend-api/wham/usage")
    @app.get("/api/codex/usage")
    async def usage() -> Response:
        return jsonify(pool_usage(ctx.pool))

    @app.get("/api/models")
    async def models_registry() -> Response:
        return jsonify(services.registry.view())

    @app.post("/api/models/refresh")
    async def refresh_models() -> Response:
        await services.registry.refresh()
        return jsonify(services.registry.view())

    @app.get("/api/alerts")
    async def alerts() -> Response:
        return jsonify(attrs.asdict(services.alerts.statistics()))

    @app.get("/api/accounts")
    async def list_accounts() -> Response:
        now = ctx.pool.clock.now()
        return jsonify(
            {
                "accounts": [a.view(now) for a in ctx.pool.accounts.values()],
                "pool": pool_usage(ctx.pool),
                "now": now,
            }
        )

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
        for result in results:  # an import is a fresh start (docs/quota.md)
            ctx.pool.fresh_start(str(result["account_id"]))
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
