"""``/api/keys``: client API keys in the management API (docs/keys.md).

List, read, create, change (name, policy, expiry, disabled), rotate, disable, enable and
revoke keys. A key's view is its record (no secret) with its status, its budgets as the
running server counts them and its requests and sessions in flight; the secret is in the
answers of create and rotate only. Every change is checked whole before anything is written
and is taken up by the key ring at once.
"""

from __future__ import annotations

import functools
from typing import Any

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from trioproxy.app.responses_http import is_json
from trioproxy.keys.options import WHEN_FORMS, checked_policy, parse_when
from trioproxy.keys.policy import PolicyError, merge_policy, parse_policy, unknown_accounts
from trioproxy.protocol.errors import ProxyError
from trioproxy.sessions.context import ProxyContext
from trioproxy.store import Store
from trioproxy.store.records import ApiKeyRecord
from trioproxy.store.store import UNCHANGED, Unchanged

JsonAnswer = tuple[Response, int]
CREATE_FIELDS = ("name", "policy", "expires_at")
PATCH_FIELDS = ("name", "policy", "expires_at", "disabled")


def key_view(ctx: ProxyContext, record: ApiKeyRecord, now: float) -> dict[str, Any]:
    """A key as the API shows it: the record's public view, the budgets the server counts
    and what runs under the key now."""
    view = record.public_view(now)
    state = ctx.keys.keys.get(record.key_id)
    requests = state.requests if state is not None else None
    sessions = state.sessions if state is not None else None
    view["budgets"] = state.budgets_view(now) if state is not None else []
    view["in_flight"] = {
        "requests": requests.in_use if requests is not None else 0,
        "sessions": sessions.in_use if sessions is not None else 0,
    }
    return view


async def _json_object(fields: tuple[str, ...]) -> dict[str, Any]:
    if not is_json(request.headers.get("content-type")):
        raise ProxyError.of(
            415, "Send a JSON object as application/json.", "unsupported_media_type"
        )
    data = await request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        raise ProxyError.of(400, "Send a JSON object.", "invalid_json")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProxyError.of(
            400,
            f"Unknown field {unknown[0]!r}; known: {', '.join(fields)}.",
            "unknown_parameter",
            param=unknown[0],
        )
    return data


def _name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProxyError.of(400, "name is a non-empty string.", "invalid_name", param="name")
    return value.strip()


def _expiry(value: object, now: float, *, future: bool) -> float | None:
    if value is None:
        return None
    try:
        moment = parse_when(value, now)
    except ValueError as exc:
        raise ProxyError.of(
            400, f"expires_at: {exc}.", "invalid_expires_at", param="expires_at"
        ) from None
    if future and moment <= now:
        raise ProxyError.of(
            400,
            f"expires_at is in the past; give a later time ({WHEN_FORMS}).",
            "invalid_expires_at",
            param="expires_at",
        )
    return moment


def _policy(ctx: ProxyContext, value: object, *, check_accounts: bool) -> dict[str, Any] | None:
    """The policy checked and normalized (None: no policy); its accounts must be in the
    pool when ``check_accounts``."""
    try:
        policy = checked_policy(value)
    except PolicyError as exc:
        raise ProxyError.of(400, str(exc), "invalid_policy", param=exc.param) from None
    if policy is not None and check_accounts:
        unknown = unknown_accounts(parse_policy(policy), ctx.pool.accounts)
        if unknown:
            raise ProxyError.of(
                400,
                f"The policy names accounts that are not in the pool: {', '.join(unknown)}.",
                "unknown_account",
                param="policy.accounts",
            )
    return policy


async def _record(store: Store, key_id: str, *, changing: bool) -> ApiKeyRecord:
    record = await store.run(store.get_api_key, key_id)
    if record is None:
        raise ProxyError.of(404, f"No API key {key_id}.", "unknown_key")
    if changing and record.revoked:
        raise _revoked(key_id)
    return record


def _revoked(key_id: str) -> ProxyError:
    return ProxyError.of(
        409, f"API key {key_id} is revoked; revocation is final.", "api_key_revoked"
    )


def key_routes(app: QuartTrio, ctx: ProxyContext) -> None:
    """The ``/api/keys`` routes (see the module docstring)."""
    store = ctx.store

    async def change(key_id: str, call: functools.partial[Any]) -> Any:
        """Run a store change of a key (None: no such key; ValueError: revoked meanwhile),
        then have the ring take it up."""
        try:
            result = await store.run(call)
        except ValueError:
            raise _revoked(key_id) from None
        if result is None:
            raise ProxyError.of(404, f"No API key {key_id}.", "unknown_key")
        await ctx.keys.load()
        return result

    @app.get("/api/keys")
    async def list_keys() -> Response:
        now = ctx.pool.clock.now()
        records = await store.run(store.list_api_keys)
        return jsonify({"keys": [key_view(ctx, record, now) for record in records]})

    @app.get("/api/keys/<key_id>")
    async def get_key(key_id: str) -> Response:
        record = await _record(store, key_id, changing=False)
        return jsonify(key_view(ctx, record, ctx.pool.clock.now()))

    @app.post("/api/keys")
    async def create_key() -> JsonAnswer:
        data = await _json_object(CREATE_FIELDS)
        now = ctx.pool.clock.now()
        name = _name(data.get("name"))
        policy = _policy(ctx, data.get("policy"), check_accounts=True)
        expires_at = _expiry(data.get("expires_at"), now, future=True)
        create = functools.partial(
            store.create_api_key, name, policy=policy, expires_at=expires_at, now=now
        )
        record, secret = await store.run(create)
        await ctx.keys.load()
        return jsonify({"key": key_view(ctx, record, now), "secret": secret}), 201

    @app.patch("/api/keys/<key_id>")
    async def change_key(key_id: str) -> JsonAnswer:
        data = await _json_object(PATCH_FIELDS)
        record = await _record(store, key_id, changing=True)
        now = ctx.pool.clock.now()
        name = _name(data["name"]) if "name" in data else None
        policy: dict[str, Any] | Unchanged | None = UNCHANGED
        if "policy" in data:
            fields = data["policy"]
            if fields is not None and not isinstance(fields, dict):
                raise ProxyError.of(
                    400, "policy is a JSON object or null.", "invalid_policy", param="policy"
                )
            merged = None if fields is None else merge_policy(record.policy, fields)
            policy = _policy(ctx, merged, check_accounts="accounts" in (fields or {}))
        expires_at: float | Unchanged | None = UNCHANGED
        if "expires_at" in data:
            expires_at = _expiry(data["expires_at"], now, future=False)
        disabled = data.get("disabled")
        if disabled is not None and not isinstance(disabled, bool):
            raise ProxyError.of(
                400, "disabled is true or false.", "invalid_parameter", param="disabled"
            )
        if not data:
            return jsonify(key_view(ctx, record, now)), 200
        update = functools.partial(
            store.update_api_key,
            key_id,
            name=name,
            policy=policy,
            expires_at=expires_at,
            disabled=disabled,
            now=now,
        )
        record = await change(key_id, update)
        return jsonify(key_view(ctx, record, now)), 200

    @app.post("/api/keys/<key_id>/rotate")
    async def rotate_key(key_id: str) -> JsonAnswer:
        await _record(store, key_id, changing=True)
        now = ctx.pool.clock.now()
        rotate = functools.partial(store.rotate_api_key, key_id, now=now)
        record, secret = await change(key_id, rotate)
        return jsonify({"key": key_view(ctx, record, now), "secret": secret}), 200

    async def set_disabled(key_id: str, disabled: bool) -> JsonAnswer:
        await _record(store, key_id, changing=True)
        now = ctx.pool.clock.now()
        update = functools.partial(store.update_api_key, key_id, disabled=disabled, now=now)
        return jsonify(key_view(ctx, await change(key_id, update), now)), 200

    @app.post("/api/keys/<key_id>/disable")
    async def disable_key(key_id: str) -> JsonAnswer:
        return await set_disabled(key_id, True)

    @app.post("/api/keys/<key_id>/enable")
    async def enable_key(key_id: str) -> JsonAnswer:
        return await set_disabled(key_id, False)

    @app.delete("/api/keys/<key_id>")
    async def revoke_key(key_id: str) -> JsonAnswer:
        await _record(store, key_id, changing=False)
        now = ctx.pool.clock.now()
        await store.run(functools.partial(store.revoke_api_key, key_id, now=now))
        await ctx.keys.load()
        record = await _record(store, key_id, changing=False)
        return jsonify(key_view(ctx, record, now)), 200
