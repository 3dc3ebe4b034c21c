"""What the mock checks in a request body before it answers (sans-IO): decoding (JSON,
optionally zstd-compressed) and the checks the real backend makes on a Responses request, each
failing with the error envelope the real backend answers with."""

from __future__ import annotations

import json
from typing import Any

import zstandard

from trioproxy.harness.mock_upstream import responses as plans
from trioproxy.harness.mock_upstream.accounts import MockAccount
from trioproxy.harness.mock_upstream.errors import invalid_request
from trioproxy.harness.mock_upstream.transport import Request

TOOL_CALLS = ("function_call", "custom_tool_call")
TOOL_OUTPUTS = ("function_call_output", "custom_tool_call_output")


def decode_json(request: Request, zstd: zstandard.ZstdDecompressor) -> Any:
    """The request's JSON body (``None`` if empty), zstd-decompressed if so encoded."""
    raw = request.body
    encoding = (request.header("content-encoding") or "").lower()
    if encoding not in ("", "identity", "zstd"):
        raise invalid_request(
            f"Unsupported content-encoding {encoding!r}", "unsupported_content_encoding", status=415
        )
    try:
        if encoding == "zstd":
            raw = zstd.decompressobj().decompress(raw)
        return json.loads(raw) if raw else None
    except zstandard.ZstdError:
        raise invalid_request(
            "The request body could not be decompressed.", "invalid_body"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise invalid_request(
            "We could not parse the JSON body of your request.", "invalid_json"
        ) from None


def validate(
    body: Any, context: list[Any], account: MockAccount | None = None, *, strict: bool = False
) -> dict[str, Any]:
    """``body`` checked as a Responses request, with a string ``input`` turned into one user
    message. ``context`` is the conversation before it (the items a tool output may answer);
    ``strict`` rejects reasoning items encrypted for another account than ``account``."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.", "invalid_body")
    items = body.get("input")
    if items is None or isinstance(items, str):
        items = [] if items is None else [_user_message(items)]
        body = {**body, "input": items}
    if not isinstance(items, list):
        raise invalid_request("'input' must be a list of items.", "invalid_type", "input")
    _check_tool_outputs(items, context)
    if strict and account is not None:
        _check_encrypted_content(items, account)
    if not isinstance(body.get("model", ""), str):
        raise invalid_request("'model' must be a string.", "invalid_type", "model")
    checked: dict[str, Any] = body
    return checked


def _user_message(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def _check_tool_outputs(items: list[Any], context: list[Any]) -> None:
    """Every tool output answers a tool call of the conversation or of this request."""
    known = {
        i.get("call_id")
        for i in [*context, *items]
        if isinstance(i, dict) and i.get("type") in TOOL_CALLS
    }
    for item in items:
        if (
            isinstance(item, dict)
            and item.get("type") in TOOL_OUTPUTS
            and item.get("call_id") not in known
        ):
            raise invalid_request(
                f"No tool call found for function call output with call_id {item.get('call_id')}.",
                None,
                "input",
            )


def _check_encrypted_content(items: list[Any], account: MockAccount) -> None:
    """Every reasoning item's ``encrypted_content`` was made for ``account``."""
    for item in items:
        if (
            isinstance(item, dict)
            and item.get("type") == "reasoning"
            and item.get("encrypted_content")
        ):
            owner = plans.decode_opaque(str(item["encrypted_content"])).get("account")
            if owner != account.account_id:
                raise invalid_request(
                    f"The encrypted content for item {item.get('id')} could not be verified.",
                    "invalid_encrypted_content",
                    "input",
                )
