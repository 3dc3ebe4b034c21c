"""OpenAI-style error envelopes, the only error shape that leaves trioproxy."""

from __future__ import annotations

from typing import Any


def error_envelope(
    message: str, type_: str, code: str | None = None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    """``{"error": {"message", "type", "code", "param", ...}}``."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code, "param": param}
    error.update(extra)
    return {"error": error}


def ws_error_event(
    status: int, envelope: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """The WebSocket form of an error: ``{"type": "error", "status": N, "error": {...}}``."""
    event: dict[str, Any] = {"type": "error", "status": status, "error": envelope["error"]}
    if headers:
        event["headers"] = headers
    return event
