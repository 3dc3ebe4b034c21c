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
                                              "plan", "weekly_only"}
GET    /__mock__/accounts/{id}/auth.json     a Codex auth.json for the account
GET    /__mock__/faults
POST   /__mock__/faults                      {"kind", "on", "account", "count", ...} or a list
DELETE /__mock__/faults                      remove every fault
DELETE /__mock__/faults/{id}
POST   /__mock__/clock                       {"advance": seconds}: move the mock's unix time
POST   /__mock__/script                      [{"text": T} | {"tool_call": CMD} | {"compaction": true}
                                              | {"function_call": {"name": N, "arguments":
                                              {...} or a JSON string}}]
                                             answers for the next generating requests, in order
GET    /__mock__/logins                      device codes and authorize requests waiting
POST   /__mock__/logins/approve              {"account_id", "user_code"} or {"account_id",
                                              "state"}: the mock user signs in as that
                                              account (an authorize request answers
                                              {"redirect_url"}: where the browser goes)
POST   /__mock__/logins/deny                 {"user_code"} or {"state"}: the user refuses
POST   /__mock__/reset                       faults, records and usage back to the start
POST   /__mock__/websockets/close            {"code", "reason"}: close every open WebSocket
                                             connection (1011 unless told); {"closed": n}
GET    /__mock__/config                      the answer shape in force
PATCH  /__mock__/config                      {"deltas", "delta_bytes", "first_event_delay",
                                              "event_delay", "latency_jitter",
                                              "rate_limit_events", "segmentation",
                                              "strict_turn_state", "device_interval",
                                              "device_code_ttl", "ws_ping_interval",
                                              "ws_ping_timeout"}: change
                                              the shape of later answers (the bench's
                                              scenarios; the keep-alive of WebSocket
                                              connections opened later)

``ROUTES`` maps a method and a path pattern to its handler; the first match answers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from trioproxy.harness.mock_upstream.accounts import MockAccount, make_account
from trioproxy.harness.mock_upstream.backend import MockBackend
from trioproxy.harness.mock_upstream.faults import FaultSpecError, fault_from_dict
from trioproxy.harness.mock_upstream.responses import function_call_payload
from trioproxy.harness.mock_upstream.segmentation import check_mode
from trioproxy.harness.mock_upstream.transport import Exchange, Request
from trioproxy.harness.mock_upstream.ws_sessions import close_all

# options of MockConfig that may change while the mock runs (the shape of later answers)
SHAPE_FIELDS: dict[str, Any] = {
    "deltas": int,
    "delta_bytes": int,
    "first_event_delay": float,
    "event_delay": float,
    "rate_limit_events": bool,
    "latency_jitter": float,
    "segmentation": check_mode,
    "strict_turn_state": bool,
    "device_interval": int,
    "device_code_ttl": float,
    "ws_ping_interval": float,
    "ws_ping_timeout": float,
}


async def _answer(exchange: Exchange, status: int, body: Any) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await exchange.respond(status, [("content-type", "application/json")], data)


def _error(message: str, code: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}
    }


@attrs.frozen
class Call:
    """One control request: its method, parsed JSON body, query (last value of each key),
    the path segments a pattern's ``*`` and ``**`` matched, and the mock's time when it
    arrived."""

    backend: MockBackend
    exchange: Exchange
    method: str
    body: Any
    query: dict[str, str]
    args: list[str]
    now: float

    async def answer(self, status: int, body: Any) -> None:
        await _answer(self.exchange, status, body)

    async def refuse(self, status: int, message: str, code: str) -> None:
        await _answer(self.exchange, status, _error(message, code))


def _shape(backend: MockBackend) -> dict[str, Any]:
    return {key: getattr(backend.config, key) for key in SHAPE_FIELDS}


# -- counters and records --------------------------------------------------------------------
async def _health(call: Call) -> None:
    await call.answer(200, {"status": "ok"})


async def _stats(call: Call) -> None:
    await call.answer(200, call.backend.stats.view())


async def _requests(call: Call) -> None:
    q = call.query
    records = call.backend.recorder.query(
        path=q.get("path"),
        account=q.get("account"),
        transport=q.get("transport"),
        method=q.get("method"),
        since=int(q.get("since", 0)),
    )
    frames = q.get("frames", "1") != "0"
    await call.answer(200, {"requests": [r.view(frames=frames) for r in records]})


async def _clear_requests(call: Call) -> None:
    call.backend.recorder.clear()
    await call.answer(200, {"cleared": True})


# -- accounts --------------------------------------------------------------------------------
async def _accounts(call: Call) -> None:
    views = [a.control_view(call.now) for a in call.backend.accounts.values()]
    await call.answer(200, {"accounts": views})


async def _add_account(call: Call) -> None:
    backend, spec = call.backend, call.body if isinstance(call.body, dict) else {}
    index = len(backend.accounts) + 1
    while f"acct-mock-{index}" in backend.accounts:
        index += 1
    config = backend.config
    try:
        account = make_account(
            index,
            call.now,
            plan=str(spec.get("plan", config.plan)),
            primary_limit=int(spec.get("primary_limit", config.primary_limit)),
            secondary_limit=int(spec.get("secondary_limit", config.secondary_limit)),
            token_ttl=float(spec.get("token_ttl", config.token_ttl)),
            account_id=spec.get("account_id"),
            email=spec.get("email"),
        )
    except (TypeError, ValueError) as exc:
        await call.refuse(400, str(exc), "invalid_account")
        return
    backend.add_account(account)
    await call.answer(201, account.control_view(call.now))


async def _account(call: Call) -> None:
    """``accounts/{id}[/auth.json]``: 404 for an unknown account, 405 for what is not a
    read of the account or its auth.json or a patch."""
    account_id, rest = call.args[0], call.args[1:]
    account = call.backend.accounts.get(account_id)
    if account is None:
        await call.refuse(404, f"no account {account_id}", "unknown_account")
    elif rest == ["auth.json"]:
        await call.answer(200, account.auth_json(call.now))
    elif rest == [] and call.method == "GET":
        await call.answer(200, account.control_view(call.now))
    elif rest == [] and call.method == "PATCH" and isinstance(call.body, dict):
        try:
            _patch_account(account, call.body, call.now)
        except (TypeError, ValueError) as exc:
            await call.refuse(400, str(exc), "invalid_patch")
            return
        await call.answer(200, account.control_view(call.now))
    else:
        await call.refuse(405, "unsupported account operation", "method_not_allowed")


def _patch_account(account: MockAccount, body: dict[str, Any], now: float) -> None:
    if "exhaust" in body:
        window = account.primary if body["exhaust"] == "primary" else account.secondary
        window.exhaust(now, float(body.get("resets_in", 3600)))
    if "primary_used" in body:
        account.primary.used = int(body["primary_used"])
    if "secondary_used" in body:
        account.secondary.used = int(body["secondary_used"])
    if "deactivated" in body:
        account.deactivated = bool(body["deactivated"])
    if "weekly_only" in body:
        account.weekly_only = bool(body["weekly_only"])
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


# -- faults, clock, script -------------------------------------------------------------------
async def _faults(call: Call) -> None:
    await call.answer(200, {"faults": [f.view() for f in call.backend.faults.faults]})


async def _add_faults(call: Call) -> None:
    specs = call.body if isinstance(call.body, list) else [call.body]
    try:
        faults = [fault_from_dict(s) for s in specs if isinstance(s, dict)]
    except FaultSpecError as exc:
        await call.refuse(400, str(exc), "invalid_fault")
        return
    if len(faults) != len(specs):
        await call.refuse(400, "a fault must be a JSON object", "invalid_fault")
        return
    for fault in faults:
        call.backend.faults.add(fault)
    await call.answer(201, {"faults": [f.view() for f in faults]})


async def _clear_faults(call: Call) -> None:
    call.backend.faults.clear()
    await call.answer(200, {"cleared": True})


async def _remove_fault(call: Call) -> None:
    fault_id = call.args[0]
    removed = fault_id.isdigit() and call.backend.faults.remove(int(fault_id))
    await call.answer(200 if removed else 404, {"removed": bool(removed)})


async def _advance_clock(call: Call) -> None:
    clock = call.backend.clock
    try:
        clock.skew += float((call.body or {}).get("advance", 0))
    except (TypeError, ValueError, AttributeError):
        await call.refuse(400, "clock body is {advance: seconds}", "invalid_clock")
        return
    await call.answer(200, {"now": clock.now(), "skew": clock.skew})


def _script_entry(entry: Any) -> tuple[str, str] | None:
    if isinstance(entry, dict) and isinstance(entry.get("text"), str):
        return ("text", entry["text"])
    if isinstance(entry, dict) and isinstance(entry.get("tool_call"), str):
        return ("tool_call", entry["tool_call"])
    if isinstance(entry, dict) and entry.get("compaction") is True:
        return ("compaction", "")
    call = entry.get("function_call") if isinstance(entry, dict) else None
    if isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"]:
        arguments = call.get("arguments", {})
        if isinstance(arguments, dict | str):
            return ("function_call", function_call_payload(call["name"], arguments))
    return None


async def _script(call: Call) -> None:
    entries = call.body if isinstance(call.body, list) else [call.body]
    parsed = [_script_entry(entry) for entry in entries]
    valid = [entry for entry in parsed if entry is not None]
    if len(valid) != len(parsed):
        await call.refuse(
            400,
            "script entries are {text}, {tool_call}, {function_call: {name, arguments}} "
            "or {compaction: true}",
            "invalid_script",
        )
        return
    call.backend.script.extend(valid)
    await call.answer(201, {"queued": len(call.backend.script)})


# -- logins ----------------------------------------------------------------------------------
async def _logins(call: Call) -> None:
    await call.answer(200, call.backend.logins.view())


async def _answer_login(call: Call) -> None:
    """``logins/approve`` and ``logins/deny``: the mock user answers a pending login."""
    spec = call.body if isinstance(call.body, dict) else {}
    if call.args[0] not in ("approve", "deny"):
        await call.refuse(404, f"no control route logins/{call.args[0]}", "not_found")
        return
    approve = call.args[0] == "approve"
    account = call.backend.accounts.get(str(spec.get("account_id")))
    if approve and account is None:
        await call.refuse(404, f"no account {spec.get('account_id')}", "unknown_account")
        return
    if "user_code" not in spec and "state" not in spec:
        await call.refuse(400, "name the login by user_code or state", "invalid_login")
        return
    try:
        result = call.backend.logins.answer(spec, account, approve=approve, now=call.now)
    except ValueError as exc:
        await call.refuse(404, str(exc), "unknown_login")
        return
    await call.answer(200, result)


# -- configuration and reset -----------------------------------------------------------------
async def _config(call: Call) -> None:
    await call.answer(200, _shape(call.backend))


async def _patch_config(call: Call) -> None:
    changes = call.body if isinstance(call.body, dict) else {}
    unknown = set(changes) - set(SHAPE_FIELDS)
    if unknown:
        await call.refuse(400, f"not shape options: {sorted(unknown)}", "invalid_config")
        return
    try:
        typed = {key: SHAPE_FIELDS[key](value) for key, value in changes.items()}
    except (TypeError, ValueError) as exc:
        await call.refuse(400, str(exc), "invalid_config")
        return
    call.backend.config = attrs.evolve(call.backend.config, **typed)
    await call.answer(200, _shape(call.backend))


async def _close_websockets(call: Call) -> None:
    spec = call.body if isinstance(call.body, dict) else {}
    try:
        code = int(spec.get("code", 1011))
        reason = str(spec.get("reason", "closed by the mock's control API"))
    except (TypeError, ValueError) as exc:
        await call.refuse(400, str(exc), "invalid_close")
        return
    if not 1000 <= code <= 4999:
        await call.refuse(400, "code: a WebSocket close code (1000-4999)", "invalid_close")
        return
    await call.answer(200, {"closed": await close_all(call.backend, code, reason)})


async def _reset(call: Call) -> None:
    backend = call.backend
    backend.script.clear()
    backend.faults.clear()
    backend.recorder.clear()
    for account in backend.accounts.values():
        account.primary.used = account.secondary.used = 0
        account.primary.started_at = account.secondary.started_at = call.now
        account.deactivated = False
        account.weekly_only = False
        account.refresh_mode = "ok"
    await call.answer(200, {"reset": True})


Handler = Callable[[Call], Awaitable[None]]
# (method, or None for any; path pattern: "*" one segment, "**" the rest) -> handler
ROUTES: list[tuple[str | None, tuple[str, ...], Handler]] = [
    (None, ("health",), _health),
    (None, ("stats",), _stats),
    ("GET", ("requests",), _requests),
    ("DELETE", ("requests",), _clear_requests),
    ("GET", ("accounts",), _accounts),
    ("POST", ("accounts",), _add_account),
    ("GET", ("faults",), _faults),
    ("POST", ("faults",), _add_faults),
    ("DELETE", ("faults",), _clear_faults),
    ("DELETE", ("faults", "*"), _remove_fault),
    ("POST", ("clock",), _advance_clock),
    ("POST", ("script",), _script),
    ("GET", ("config",), _config),
    ("PATCH", ("config",), _patch_config),
    ("POST", ("reset",), _reset),
    ("POST", ("websockets", "close"), _close_websockets),
    ("GET", ("logins",), _logins),
    ("POST", ("logins", "*"), _answer_login),
    (None, ("accounts", "*", "**"), _account),
]


def match(pattern: tuple[str, ...], parts: list[str]) -> list[str] | None:
    """The segments ``pattern``'s wildcards matched in ``parts``, or None."""
    args: list[str] = []
    for index, segment in enumerate(pattern):
        if segment == "**":
            return args + parts[index:]
        if index >= len(parts) or segment not in ("*", parts[index]):
            return None
        if segment == "*":
            args.append(parts[index])
    return args if len(parts) == len(pattern) else None


async def handle_control(backend: MockBackend, request: Request, exchange: Exchange) -> None:
    parts = [p for p in request.path.split("/") if p][1:]  # drop "__mock__"
    try:
        body: Any = json.loads(request.body) if request.body else None
    except ValueError:
        await _answer(exchange, 400, _error("control body is not JSON", "invalid_json"))
        return
    query = {k: v[-1] for k, v in request.query.items()}
    for method, pattern, handler in ROUTES:
        args = match(pattern, parts)
        if args is not None and method in (None, request.method):
            now = backend.clock.now()
            await handler(Call(backend, exchange, request.method, body, query, args, now))
            return
    await _answer(exchange, 404, _error(f"no control route {request.path}", "not_found"))
