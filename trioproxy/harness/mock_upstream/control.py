"""The mock's control API under ``/__mock__/`` (no auth: it only ever listens on loopback).

GET    /__mock__/health
GET    /__mock__/stats                       counters (open sockets, streams, refreshes)
GET    /__mock__/requests?path=&account=&transport=&method=&since=&frames=0
DELETE /__mock__/requests
GET    /__mock__/accounts                    every account, with tokens and windows
POST   /__mock__/accounts                    {"plan", "account_id", "email", "primary_limit", ...}
GET    /__mock__/accounts/{id}
PATCH  /__mock__/accounts/{id}               {"exhaust": "primary"|"secondary", "resets_in",
                                              "primary_used", "secondary_used", "deactivated",
                                              "revoke_tokens", "expire_tokens", "refresh_mode",
                                              "plan"}
GET    /__mock__/accounts/{id}/auth.json     a Codex auth.json for the account
GET    /__mock__/faults
POST   /__mock__/faults                      {"kind", "on", "account", "count", ...} or a list
DELETE /__mock__/faults                      remove every fault
DELETE /__mock__/faults/{id}
POST   /__mock__/script                      [{"text": T} | {"tool_call": CMD} | {"compaction": true}]
                                             answers for the next generating requests, in order
POST   /__mock__/reset                       faults, records and usage back to the start
GET    /__mock__/config                      the answer shape in force
PATCH  /__mock__/config                      {"deltas", "delta_bytes", "first_event_delay",
                                              "event_delay", "latency_jitter",
                                              "rate_limit_events", "segmentation"}: change
                                              the shape of later answers (the bench's
                                              scenarios)
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from trioproxy.harness.mock_upstream.accounts import make_account
from trioproxy.harness.mock_upstream.backend import MockBackend
from trioproxy.harness.mock_upstream.faults import FaultSpecError, fault_from_dict
from trioproxy.harness.mock_upstream.segmentation import check_mode
from trioproxy.harness.mock_upstream.transport import Exchange, Request


async def _json(exchange: Exchange, status: int, body: Any) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await exchange.respond(status, [("content-type", "application/json")], data)


# options of MockConfig that may change while the mock runs (the shape of later answers)
SHAPE_FIELDS: dict[str, Any] = {
    "deltas": int,
    "delta_bytes": int,
    "first_event_delay": float,
    "event_delay": float,
    "rate_limit_events": bool,
    "latency_jitter": float,
    "segmentation": check_mode,
}


def _shape(backend: MockBackend) -> dict[str, Any]:
    return {key: getattr(backend.config, key) for key in SHAPE_FIELDS}


def _error(message: str, code: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}
    }


async def handle_control(backend: MockBackend, request: Request, exchange: Exchange) -> None:
    parts = [p for p in request.path.split("/") if p][1:]  # drop "__mock__"
    method = request.method
    try:
        body: Any = json.loads(request.body) if request.body else None
    except ValueError:
        await _json(exchange, 400, _error("control body is not JSON", "invalid_json"))
        return
    now = backend.clock.now()
    q = {k: v[-1] for k, v in request.query.items()}

    if parts == ["health"]:
        await _json(exchange, 200, {"status": "ok"})
    elif parts == ["stats"]:
        await _json(exchange, 200, backend.stats.view())
    elif parts == ["requests"] and method == "GET":
        records = backend.recorder.query(
            path=q.get("path"),
            account=q.get("account"),
            transport=q.get("transport"),
            method=q.get("method"),
            since=int(q.get("since", 0)),
        )
        frames = q.get("frames", "1") != "0"
        await _json(exchange, 200, {"requests": [r.view(frames=frames) for r in records]})
    elif parts == ["requests"] and method == "DELETE":
        backend.recorder.clear()
        await _json(exchange, 200, {"cleared": True})
    elif parts == ["accounts"] and method == "GET":
        await _json(
            exchange, 200, {"accounts": [a.control_view(now) for a in backend.accounts.values()]}
        )
    elif parts == ["accounts"] and method == "POST":
        spec = body if isinstance(body, dict) else {}
        index = len(backend.accounts) + 1
        while f"acct-mock-{index}" in backend.accounts:
            index += 1
        try:
            account = make_account(
                index,
                now,
                plan=str(spec.get("plan", backend.config.plan)),
                primary_limit=int(spec.get("primary_limit", backend.config.primary_limit)),
                secondary_limit=int(spec.get("secondary_limit", backend.config.secondary_limit)),
                token_ttl=float(spec.get("token_ttl", backend.config.token_ttl)),
                account_id=spec.get("account_id"),
                email=spec.get("email"),
            )
        except (TypeError, ValueError) as exc:
            await _json(exchange, 400, _error(str(exc), "invalid_account"))
            return
        backend.add_account(account)
        await _json(exchange, 201, account.control_view(now))
    elif len(parts) >= 2 and parts[0] == "accounts":
        found = backend.accounts.get(parts[1])
        if found is None:
            await _json(exchange, 404, _error(f"no account {parts[1]}", "unknown_account"))
            return
        account = found
        if parts[2:] == ["auth.json"]:
            await _json(exchange, 200, account.auth_json(now))
        elif parts[2:] == [] and method == "GET":
            await _json(exchange, 200, account.control_view(now))
        elif parts[2:] == [] and method == "PATCH" and isinstance(body, dict):
            try:
                if "exhaust" in body:
                    window = account.primary if body["exhaust"] == "primary" else account.secondary
                    window.exhaust(now, float(body.get("resets_in", 3600)))
                if "primary_used" in body:
                    account.primary.used = int(body["primary_used"])
                if "secondary_used" in body:
                    account.secondary.used = int(body["secondary_used"])
                if "deactivated" in body:
                    account.deactivated = bool(body["deactivated"])
                if body.get("revoke_tokens"):
                    account.revoke_access_tokens()
                if body.get("expire_tokens"):
                    account.expire_access_tokens(now)
                if "refresh_mode" in body:
                    if body["refresh_mode"] not in ("ok", "expired", "invalidated"):
                        raise ValueError("refresh_mode must be ok, expired or invalidated")
                    account.refresh_mode = body["refresh_mode"]
                if "plan" in body:
                    account.plan = str(body["plan"])
            except (TypeError, ValueError) as exc:
                await _json(exchange, 400, _error(str(exc), "invalid_patch"))
                return
            await _json(exchange, 200, account.control_view(now))
        else:
            await _json(
                exchange, 405, _error("unsupported account operation", "method_not_allowed")
            )
    elif parts == ["faults"] and method == "GET":
        await _json(exchange, 200, {"faults": [f.view() for f in backend.faults.faults]})
    elif parts == ["faults"] and method == "POST":
        specs = body if isinstance(body, list) else [body]
        try:
            faults = [fault_from_dict(s) for s in specs if isinstance(s, dict)]
        except FaultSpecError as exc:
            await _json(exchange, 400, _error(str(exc), "invalid_fault"))
            return
        if len(faults) != len(specs):
            await _json(exchange, 400, _error("a fault must be a JSON object", "invalid_fault"))
            return
        for fault in faults:
            backend.faults.add(fault)
        await _json(exchange, 201, {"faults": [f.view() for f in faults]})
    elif parts == ["faults"] and method == "DELETE":
        backend.faults.clear()
        await _json(exchange, 200, {"cleared": True})
    elif len(parts) == 2 and parts[0] == "faults" and method == "DELETE":
        removed = parts[1].isdigit() and backend.faults.remove(int(parts[1]))
        await _json(exchange, 200 if removed else 404, {"removed": bool(removed)})
    elif parts == ["clock"] and method == "POST":
        try:
            backend.clock.skew += float((body or {}).get("advance", 0))
        except (TypeError, ValueError, AttributeError):
            await _json(exchange, 400, _error("clock body is {advance: seconds}", "invalid_clock"))
            return
        await _json(exchange, 200, {"now": backend.clock.now(), "skew": backend.clock.skew})
    elif parts == ["script"] and method == "POST":
        entries = body if isinstance(body, list) else [body]
        parsed: list[tuple[str, str]] = []
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("text"), str):
                parsed.append(("text", entry["text"]))
            elif isinstance(entry, dict) and isinstance(entry.get("tool_call"), str):
                parsed.append(("tool_call", entry["tool_call"]))
            elif isinstance(entry, dict) and entry.get("compaction") is True:
                parsed.append(("compaction", ""))
            else:
                await _json(
                    exchange,
                    400,
                    _error(
                        "script entries are {text}, {tool_call} or {compaction: true}",
                        "invalid_script",
                    ),
                )
                return
        backend.script.extend(parsed)
        await _json(exchange, 201, {"queued": len(backend.script)})
    elif parts == ["config"] and method == "GET":
        await _json(exchange, 200, _shape(backend))
    elif parts == ["config"] and method == "PATCH":
        changes = body if isinstance(body, dict) else {}
        unknown = set(changes) - set(SHAPE_FIELDS)
        if unknown:
            await _json(
                exchange, 400, _error(f"not shape options: {sorted(unknown)}", "invalid_config")
            )
            return
        try:
            typed = {key: SHAPE_FIELDS[key](value) for key, value in changes.items()}
        except (TypeError, ValueError) as exc:
            await _json(exchange, 400, _error(str(exc), "invalid_config"))
            return
        backend.config = attrs.evolve(backend.config, **typed)
        await _json(exchange, 200, _shape(backend))
    elif parts == ["reset"] and method == "POST":
        backend.script.clear()
        backend.faults.clear()
        backend.recorder.clear()
        for account in backend.accounts.values():
            account.primary.used = account.secondary.used = 0
            account.primary.started_at = account.secondary.started_at = now
            account.deactivated = False
            account.refresh_mode = "ok"
        await _json(exchange, 200, {"reset": True})
    else:
        await _json(exchange, 404, _error(f"no control route {request.path}", "not_found"))
