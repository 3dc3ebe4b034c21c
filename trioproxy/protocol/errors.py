"""The one error shape that leaves trioproxy, and the exception that carries it (sans-IO).

Every error a client sees is an OpenAI-style envelope ``{"error": {"message", "type", "code",
"param", ...}}``: built by :func:`error_envelope` for the proxy's own answers, and by
:func:`upstream_envelope` for an error upstream gave (normalized to the same keys, with
upstream response ids removed from every text). Over a WebSocket the same envelope travels as
``{"type": "error", "status": N, "error": {...}}`` (:func:`ws_error_event`).

:class:`ProxyError` is an answer the proxy gives instead of an upstream one: a status, an
envelope and headers. Handlers raise it; the client-facing edge (an HTTP answer, a WebSocket
error event, a refused upgrade) renders it.
"""

from __future__ import annotations

import json
import re
from typing import Any

_RESPONSE_ID = re.compile(r"resp_[A-Za-z0-9_-]+")


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON (what the proxy writes on the wire)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def error_envelope(
    message: str, type_: str, code: str | None = None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    """``{"error": {"message", "type", "code", "param", ...}}``."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code, "param": param}
    error.update(extra)
    return {"error": error}


def sanitize_message(message: str) -> str:
    """Remove upstream response ids from a text (a last line of defense)."""
    return _RESPONSE_ID.sub("resp_[redacted]", message)


def upstream_envelope(body: dict[str, Any] | None) -> dict[str, Any]:
    """An error upstream gave, as an envelope a client may see: the standard keys always
    present, extra keys (``resets_at``, ``plan_type``, ...) kept, response ids removed."""
    error = (body or {}).get("error")
    if not isinstance(error, dict):
        error = {}
    clean: dict[str, Any] = {
        "message": "",
        "type": "upstream_error",
        "code": None,
        "param": None,
    }
    for key, value in error.items():
        clean[key] = sanitize_message(value) if isinstance(value, str) else value
    return {"error": clean}


def ws_error_event(
    status: int, envelope: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """The WebSocket form of an error: ``{"type": "error", "status": N, "error": {...}}``."""
    event: dict[str, Any] = {"type": "error", "status": status, "error": envelope["error"]}
    if headers:
        event["headers"] = headers
    return event


class ProxyError(Exception):
    """An answer the proxy gives instead of (or in place of) an upstream one."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(f"{status} {body.get('error', {}).get('code')}")
        self.status = status
        self.body = body
        self.headers = headers or []

    @classmethod
    def of(
        cls,
        status: int,
        message: str,
        code: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> ProxyError:
        """The proxy's own answer; ``type`` follows the status unless given."""
        if type_ is None:
            type_ = "invalid_request_error" if status < 500 else "server_error"
        return cls(status, error_envelope(message, type_, code, param), headers)

    def copy(self) -> ProxyError:
        """The same answer as a new exception (one instance raised again and again would
        pile up tracebacks)."""
        return ProxyError(self.status, self.body, self.headers)

    @property
    def code(self) -> str | None:
        error = self.body.get("error")
        return error.get("code") if isinstance(error, dict) else None

    def ws_event(self) -> dict[str, Any]:
        """This answer as a WebSocket ``error`` event (headers included, as upstream does)."""
        return ws_error_event(self.status, self.body, dict(self.headers) or None)
