"""Everything but the Responses routes, as a Quart app: health, models, the pool usage the
Codex CLI reads, metrics, and the management API (accounts and logins, request log, model
registry, alerts, admission). Every answer but the health probes needs the client's authorization (an
API key, or loopback without keys); errors are the proxy's envelopes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from quart import Response, g, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioproxy.accounts.authfile import AuthFileError
from trioproxy.accounts.importing import import_auth_jsons
from trioproxy.accounts.logins import LoginRegistry
from trioproxy.accounts.pausing import Outcome, pause_account, resume_account
from trioproxy.accounts.pool_usage import pool_usage
from trioproxy.accounts.services import QuotaServices
from trioproxy.app.edge import client_of
from trioproxy.app.management_keys import key_routes
from trioproxy.app.management_usage import usage_routes
from trioproxy.app.messages_front import MESSAGES
from trioproxy.app.request_memory import scope_budget
from trioproxy.app.responses_http import is_json
from trioproxy.dashboard.app import dashboard_routes, is_dashboard_path
from trioproxy.keys.ring import Client
from trioproxy.keys.usage_view import key_usage
from trioproxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from trioproxy.metrics import render_metrics
from trioproxy.protocol.anthropic_messages import anthropic_error
from trioproxy.protocol.errors import ProxyError, error_envelope
from trioproxy.sessions.bridge import BridgeRegistry
from trioproxy.sessions.context import ProxyContext
from trioproxy.store import Store
from trioproxy.store.request_query import MAX_LIMIT, RequestFilter, parse_status
from trioproxy.store.usage_report import parse_time

OPEN_PATHS = frozenset({"/health/live", "/health/ready"})
#: client routes under /api/ that any key may read
CLIENT_API_PATHS = frozenset({"/api/codex/usage"})


def _operator_path(path: str) -> bool:
    """The management API (accounts, keys, usage, the request log, ...) and the metrics:
    for loopback without keys, or keys without a policy (a key with limits could otherwise
    lift them, or read every other key's usage)."""
    return (path.startswith("/api/") and path not in CLIENT_API_PATHS) or path == "/metrics"


JsonAnswer = tuple[Response, int]


def memory_view(ctx: ProxyContext, bridges: BridgeRegistry | None) -> dict[str, Any]:
    """What the proxy holds in memory that grows with use, each part against its bound
    (docs/memory.md)."""
    conversations = ctx.chain_budget.statistics()
    view: dict[str, Any] = {
        "conversations": attrs.asdict(conversations),
        "request_log": attrs.asdict(ctx.reqlog.statistics()),
        "sticky_sessions": len(ctx.pool.sticky),
    }
    budget = scope_budget(request.scope)  # type: ignore[arg-type]
    if budget is not None:
        view["requests"] = attrs.asdict(budget.statistics())
    if bridges is not None:
        view["bridge"] = {
            **attrs.asdict(bridges.statistics()),
            "max_sessions": ctx.settings.bridge_max_sessions,
        }
    return view


def memory_gauges(ctx: ProxyContext, bridges: BridgeRegistry | None) -> dict[str, float]:
    """:func:`memory_view` as Prometheus gauges."""
    conversations = ctx.chain_budget.statistics()
    log = ctx.reqlog.statistics()
    gauges = {
        "trioproxy_conversation_bytes": float(conversations.bytes),
        "trioproxy_conversation_budget_bytes": float(conversations.max_bytes),
        "trioproxy_conversations": float(conversations.conversations),
        "trioproxy_conversation_turns_forgotten_total": float(conversations.evicted_total),
        "trioproxy_request_log_queued": float(log.queued),
        "trioproxy_sticky_sessions": float(len(ctx.pool.sticky)),
    }
    budget = scope_budget(request.scope)  # type: ignore[arg-type]
    if budget is not None:
        requests = budget.statistics()
        gauges.update(
            {
                "trioproxy_request_memory_bytes": float(requests.held),
                "trioproxy_request_memory_limit_bytes": float(requests.limit),
                "trioproxy_request_memory_peak_bytes": float(requests.peak),
                "trioproxy_request_memory_refused_total": float(requests.refused_total),
            }
        )
    if bridges is not None:
        bridge = bridges.statistics()
        gauges.update(
            {
                "trioproxy_bridge_sessions": float(bridge.sessions),
                "trioproxy_bridge_sessions_busy": float(bridge.busy),
                "trioproxy_bridge_response_ids": float(bridge.response_ids),
                "trioproxy_bridge_conversation_bytes": float(bridge.conversation_bytes),
            }
        )
    return gauges


def create_management_app(
    ctx: ProxyContext,
    services: QuotaServices,
    bridges: BridgeRegistry | None,
    logins: LoginRegistry | None = None,
    shape: Callable[[str, ProxyError], ProxyError] | None = None,
) -> QuartTrio:
    """The app; ``shape`` gives the proxy's own answers the error shape of the route's API
    (``app/routes.py``)."""
    app = QuartTrio("trioproxy")

    def answer(error: ProxyError) -> tuple[Response, int, list[tuple[str, str]]]:
        if shape is not None:
            error = shape(request.path, error)
        return jsonify(error.body), error.status, error.headers

    app.config.update(MAX_CONTENT_LENGTH=16 * 1024 * 1024, BODY_TIMEOUT=60, RESPONSE_TIMEOUT=None)

    dashboard = dashboard_routes(app, ctx)

    @app.before_request
    async def client_auth() -> JsonAnswer | tuple[Response, int, list[tuple[str, str]]] | None:
        if request.path in OPEN_PATHS or is_dashboard_path(request.path):
            return None  # the dashboard's pages check their session themselves
        try:
            # a dashboard session (with its CSRF token for a change) is an operator
            g.client = await dashboard.operator(request) or ctx.authorize(
                [(k.lower(), v) for k, v in request.headers.items()],
                *client_of(request.scope),  # type: ignore[arg-type]
            )
        except ProxyError as exc:
            return answer(exc)
        if (
            _operator_path(request.path)
            and g.client.key is not None
            and g.client.key.policy.as_json()
        ):
            error = ProxyError.of(
                403,
                "This API key has a policy; the management API needs a key without one (an operator key).",
                "operator_key_required",
            )
            return jsonify(error.body), 403
        return None

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> tuple[Response, int, list[tuple[str, str]]]:
        status = exc.code or 500
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            status, "http_error"
        )
        return answer(ProxyError.of(status, exc.description or exc.name, code))

    @app.errorhandler(ProxyError)
    async def proxy_error(exc: ProxyError) -> tuple[Response, int, list[tuple[str, str]]]:
        return answer(exc)

    _client_routes(app, ctx, services)
    _account_routes(app, ctx)
    key_routes(app, ctx)
    if logins is not None:
        _login_routes(app, logins)
    _operator_routes(app, ctx, services, bridges)
    usage_routes(app, ctx)
    return app


def model_entry(model_id: str, display_name: str, owner: str) -> dict[str, Any]:
    """One model of ``/v1/models``, in the fields OpenAI's and Anthropic's clients read."""
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": owner,
        "type": "model",
        "display_name": display_name,
        "created_at": "1970-01-01T00:00:00Z",
    }


def _client_routes(app: QuartTrio, ctx: ProxyContext, services: QuotaServices) -> None:
    """What clients read: health, models, the pool's usage."""

    @app.get("/health/live")
    async def live() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/health/ready")
    async def ready() -> JsonAnswer:
        if not ctx.ready:
            return jsonify({"status": "draining"}), 503
        return jsonify({"status": "ready", "accounts": len(ctx.pool.accounts)}), 200

    @app.get("/backend-api/codex/models")
    async def codex_models() -> tuple[Response, int, list[tuple[str, str]]]:
        await services.registry.ensure()
        etag = services.registry.etag()
        return (
            jsonify({"models": services.registry.models()}),
            200,
            [("x-models-etag", etag), ("etag", etag)],
        )

    async def model_list() -> list[dict[str, Any]]:
        await services.registry.ensure()
        data = [
            model_entry(str(m.get("slug")), str(m.get("display_name") or m.get("slug")), "openai")
            for m in services.registry.models()
        ]
        return data + [model_entry(name, name, "trioproxy") for name in ctx.aliases]

    @app.get("/v1/models")
    async def v1_models() -> JsonAnswer:
        data = await model_list()
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        listed = {"object": "list", "data": data, "has_more": False}
        return jsonify({**listed, "first_id": first, "last_id": last}), 200

    @app.get("/v1/models/<path:model_id>")
    async def v1_model(model_id: str) -> JsonAnswer:
        for entry in await model_list():
            if entry["id"] == model_id:
                return jsonify(entry), 200
        raise ProxyError.of(
            404, f"The model {model_id!r} does not exist.", "model_not_found", param="model"
        )

    @app.post("/v1/messages/count_tokens")
    async def count_tokens() -> JsonAnswer:
        """An estimate of a Messages request's input tokens (Anthropic's shape and errors)."""
        if not is_json(request.headers.get("content-type")):
            error = anthropic_error(415, "Send the request body as application/json.")
            return jsonify(error), 415
        data = await request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            error = anthropic_error(400, "Send the Messages request as a JSON object.")
            return jsonify(error), 400
        try:
            return jsonify(MESSAGES.count_tokens(data)), 200
        except ProxyError as exc:
            return jsonify(exc.body), exc.status

    @app.get("/backend-api/wham/usage")
    @app.get("/api/codex/usage")
    async def usage() -> Response:
        view = pool_usage(ctx.pool)
        client: Client | None = g.get("client")
        if client is not None and client.key is not None and client.key.counters:
            view = key_usage(view, client.key, ctx.pool.clock.now())
        return jsonify(view)


def _account_routes(app: QuartTrio, ctx: ProxyContext) -> None:
    """The accounts of the pool: list, import (Codex auth.json objects), remove, pause and
    resume (``accounts/pausing.py``)."""

    @app.get("/api/accounts")
    async def list_accounts() -> Response:
        now = ctx.pool.clock.now()
        return jsonify(
            {
                "accounts": [a.view(now) for a in ctx.pool.accounts.values()],
                "pool": {**pool_usage(ctx.pool), "routing_strategy": ctx.pool.strategy},
                "now": now,
            }
        )

    @app.post("/api/accounts")
    async def import_accounts() -> JsonAnswer:
        if not is_json(request.headers.get("content-type")):
            error = ProxyError.of(
                415, "Send the auth.json as application/json.", "unsupported_media_type"
            )
            return jsonify(error.body), 415
        data = await request.get_json(force=True, silent=True)
        if data is None:
            error = ProxyError.of(
                400, "Send a Codex auth.json object (or a list of them) as JSON.", "invalid_json"
            )
            return jsonify(error.body), 400
        items = data if isinstance(data, list) else [data]
        try:
            imported = await import_auth_jsons(ctx.store, ctx.pool, items, now=ctx.pool.clock.now())
        except AuthFileError as exc:
            return jsonify(
                error_envelope(str(exc), "invalid_request_error", "invalid_auth_json")
            ), 400
        results = [result.view() for result in imported]
        return jsonify({"accounts": results}), 201 if any(r["created"] for r in results) else 200

    @app.delete("/api/accounts/<account_id>")
    async def remove_account(account_id: str) -> JsonAnswer:
        removed = await ctx.store.run(ctx.store.remove_account, account_id)
        if not removed:
            error = ProxyError.of(404, f"No account {account_id}.", "unknown_account")
            return jsonify(error.body), 404
        ctx.pool.sync(await ctx.store.run(ctx.store.list_accounts))
        return jsonify({"removed": account_id}), 200

    async def pause_or_resume(
        change: Callable[[Store, str], Outcome], account_id: str
    ) -> JsonAnswer:
        outcome = await ctx.store.run(change, ctx.store, account_id)
        if outcome.before is None:
            raise ProxyError.of(404, outcome.message(), "unknown_account")
        if outcome.refused:
            raise ProxyError.of(409, outcome.message(), "account_not_pausable")
        if outcome.changed:  # the pool learns it now (other replicas at their next poll)
            ctx.pool.sync(await ctx.store.run(ctx.store.list_accounts))
        account = ctx.pool.accounts.get(account_id)
        view = account.view(ctx.pool.clock.now()) if account is not None else None
        return jsonify({"account": view, "changed": outcome.changed}), 200

    @app.post("/api/accounts/<account_id>/pause")
    async def pause(account_id: str) -> JsonAnswer:
        return await pause_or_resume(pause_account, account_id)

    @app.post("/api/accounts/<account_id>/resume")
    async def resume(account_id: str) -> JsonAnswer:
        return await pause_or_resume(resume_account, account_id)


def _login_routes(app: QuartTrio, logins: LoginRegistry) -> None:
    """Adding accounts by signing in from the proxy (docs/accounts.md): start a device or
    browser login, read its state, paste a redirect URL back, cancel it."""

    async def json_body() -> dict[str, Any]:
        if not is_json(request.headers.get("content-type")):
            raise ProxyError.of(415, "Send a JSON object.", "unsupported_media_type")
        data = await request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            raise ProxyError.of(400, "Send a JSON object.", "invalid_json")
        return data

    @app.post("/api/logins")
    async def start_login() -> JsonAnswer:
        data = await json_body()
        login = await logins.start(str(data.get("flow")))
        return jsonify(login.view()), 201

    @app.get("/api/logins/<login_id>")
    async def login_state(login_id: str) -> JsonAnswer:
        return jsonify(logins.get(login_id).view()), 200

    @app.post("/api/logins/<login_id>/complete")
    async def complete_login(login_id: str) -> JsonAnswer:
        data = await json_body()
        url = data.get("redirect_url")
        if not isinstance(url, str) or not url:
            raise ProxyError.of(
                400, "redirect_url is missing.", "invalid_redirect_url", param="redirect_url"
            )
        return jsonify((await logins.complete(login_id, url)).view()), 200

    @app.delete("/api/logins/<login_id>")
    async def cancel_login(login_id: str) -> JsonAnswer:
        return jsonify((await logins.cancel(login_id)).view()), 200


def _operator_routes(
    app: QuartTrio, ctx: ProxyContext, services: QuotaServices, bridges: BridgeRegistry | None
) -> None:
    """What an operator reads: the request log, models, alerts, admission, metrics."""

    @app.get("/api/models")
    async def models_registry() -> Response:
        return jsonify(services.registry.view())

    @app.post("/api/models/refresh")
    async def refresh_models() -> Response:
        await services.registry.refresh()
        return jsonify(services.registry.view())

    @app.get("/api/alerts")
    async def alerts() -> Response:
        sender = services.alerts
        return jsonify(
            {
                **attrs.asdict(sender.statistics()),
                "webhook_configured": bool(sender.url),
                "recent": sender.recent(),
            }
        )

    @app.get("/api/admission")
    async def admission() -> Response:
        return jsonify(
            {**ctx.admission.statistics().as_json(), "memory": memory_view(ctx, bridges)}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        extra = {
            "trioproxy_accounts": float(len(ctx.pool.accounts)),
            "trioproxy_websocket_sessions_total": float(ctx.counters["websocket_sessions"]),
            "trioproxy_reanchored_total": float(ctx.counters["reanchored"]),
            "trioproxy_request_log_dropped_total": float(ctx.reqlog.dropped),
            **memory_gauges(ctx, bridges),
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
                "replica": {
                    "name": ctx.settings.resolved_replica_name,
                    "leases": [services.lease.view()],
                },
            }
        )

    @app.get("/api/requests")
    async def recent_requests() -> JsonAnswer:
        """The request log, newest first, filtered by ``status`` (``429``, ``4xx``, ``ok``,
        ``error``), ``key``, ``account``, ``model``, ``route``, ``since`` and ``until``
        (the times of ``/api/usage``); ``before`` (a row ``id``) pages back."""
        args = request.args

        def invalid(param: str, message: str) -> ProxyError:
            return ProxyError.of(400, message, "invalid_parameter", param=param)

        def integer(name: str, default: int | None) -> int | None:
            value = args.get(name)
            if not value:
                return default
            try:
                return int(value)
            except ValueError:
                raise invalid(name, f"{name} must be an integer.") from None

        def moment(name: str, now: float) -> float | None:
            value = args.get(name)
            if not value:
                return None
            try:
                return parse_time(value, now=now)
            except ValueError as exc:
                raise invalid(name, f"{name}: {exc}") from None

        status = None
        if args.get("status"):
            try:
                status = parse_status(args["status"])
            except ValueError as exc:
                raise invalid("status", str(exc)) from None
        now = ctx.pool.clock.now()
        which = RequestFilter(
            status=status,
            key_id=args.get("key") or None,
            account_id=args.get("account") or None,
            model=args.get("model") or None,
            route=args.get("route") or None,
            since=moment("since", now),
            until=moment("until", now),
            before_id=integer("before", None),
            limit=max(1, min(MAX_LIMIT, integer("limit", 100) or 1)),
        )
        rows = await ctx.store.run(ctx.store.query_requests, which)
        return jsonify({"requests": rows}), 200
