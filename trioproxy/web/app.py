"""The quart-trio application: proxy routes, management API, health.

Issue 2 lands health and the JSON error envelope; the proxy routes arrive with issue 3.
"""

from __future__ import annotations

from typing import Any

from quart import Response, jsonify
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioproxy.config import Settings
from trioproxy.protocol.errors import error_envelope


def create_app(settings: Settings) -> QuartTrio:
    app = QuartTrio("trioproxy")
    app.config["TRIOPROXY_SETTINGS"] = settings
    state: dict[str, Any] = {"ready": True}
    app.config["TRIOPROXY_STATE"] = state

    @app.get("/health/live")
    async def live() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/health/ready")
    async def ready() -> tuple[Response, int]:
        if state["ready"]:
            return jsonify({"status": "ready"}), 200
        return jsonify({"status": "draining"}), 503

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            status, "http_error"
        )
        return jsonify(
            error_envelope(exc.description or exc.name, "invalid_request_error", code)
        ), status

    return app
