"""The mock's HTTP endpoints: Responses over SSE, the legacy unary compaction, the model
catalog, usage and workspace routing; and the faults at the endpoints that do not stream.

Each handler takes the backend, the request, its exchange and its record, and either answers
or raises ``Failure`` (the dispatcher in ``routes.py`` writes it)."""

from __future__ import annotations

from trioproxy.harness.mock_upstream import responses as plans
from trioproxy.harness.mock_upstream.accounts import MockAccount
from trioproxy.harness.mock_upstream.backend import MODELS_ETAG, MockBackend
from trioproxy.harness.mock_upstream.errors import Failure, prev_not_found
from trioproxy.harness.mock_upstream.faults import Fault
from trioproxy.harness.mock_upstream.models import models_for_plan
from trioproxy.harness.mock_upstream.recorder import RequestRecord
from trioproxy.harness.mock_upstream.transport import Exchange, Request
from trioproxy.harness.mock_upstream.turns import before_stream, stream_events
from trioproxy.harness.mock_upstream.writers import HttpAnswer, reply


async def apply_point_fault(
    backend: MockBackend,
    on: str,
    exchange: Exchange,
    record: RequestRecord,
    account: MockAccount | None,
) -> Fault | None:
    """Faults at the non-streaming endpoints: stall, drop, or an error answer. Returns the
    fault taken (a ``slow`` one is the caller's to apply)."""
    fault = backend.take_fault(on, account.account_id if account else None, "http")
    if fault is None:
        return None
    record.fault = fault.kind
    if fault.kind == "stall":
        await fault.stall()
        return fault
    if fault.kind in ("close_before_created", "close_after_created"):
        await exchange.abort()
    failure = backend.fault_failure(fault, account)
    if failure is not None:
        raise failure
    return fault


async def http_responses(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    """``POST /backend-api/codex/responses``: one answer as an SSE stream."""
    try:
        account = backend.authenticate(request)
        record.account = account.account_id
        backend.check_turn_state(account, request)
        body = backend.decode_json(request)
        record.body = body
        fault = backend.take_fault("responses", account.account_id, "http")
        if fault is not None:
            record.fault = fault.kind
        body = await before_stream(backend, body, account, fault, [], exchange=exchange)
        if body.get("previous_response_id"):
            raise Failure(400, prev_not_found(str(body["previous_response_id"])))
    except Failure as failure:
        await reply(exchange, record, failure.status, failure.body, failure.headers)
        return
    plan = backend.plan(body, [], account, fault)
    record.status = 200
    record.response_id = plan.events[0]["response"]["id"]
    headers = [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        *backend.response_headers(account, request, body.get("model")),
    ]
    backend.stats.http_streams_open += 1
    try:
        answer = HttpAnswer(exchange, backend.segmenter(fault))
        await answer.start(200, headers)
        outcome = await stream_events(
            backend, plan, account, fault, answer.send, answer.drop, record
        )
        if outcome != "dropped":
            await answer.finish()
    finally:
        backend.stats.http_streams_open -= 1


async def compact(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    """``POST /backend-api/codex/responses/compact``: the legacy unary compaction."""
    account = backend.authenticate(request)
    record.account = account.account_id
    body = backend.validate(backend.decode_json(request), [])
    record.body = body
    await apply_point_fault(backend, "compact", exchange, record, account)
    failure = backend.quota_failure(account)
    if failure is not None:
        raise failure
    account.charge(plans.estimate_tokens(body["input"]), 64)
    await reply(
        exchange,
        record,
        200,
        plans.compact_output(body, account.account_id),
        backend.response_headers(account, request, body.get("model")),
    )


async def models(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    account = backend.authenticate(request)
    record.account = account.account_id
    await apply_point_fault(backend, "models", exchange, record, account)
    await reply(
        exchange,
        record,
        200,
        {"models": models_for_plan(account.plan)},
        [("x-models-etag", MODELS_ETAG), ("etag", MODELS_ETAG)],
    )


async def usage(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    account = backend.authenticate(request)
    record.account = account.account_id
    await apply_point_fault(backend, "usage", exchange, record, account)
    await reply(exchange, record, 200, account.usage_payload(backend.clock.now()))


async def accounts_check(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    """Workspace routing: the CLI routes a first-party provider only to an https origin with
    a known ``account_routing_override``."""
    account = backend.authenticate(request)
    record.account = account.account_id
    entry = {
        "id": account.account_id,
        "workspace_backend_origin": "https://chatgpt.com",
        "account_routing_override": "NO_CONSTRAINT",
        "plan_type": account.plan,
        "name": None,
        "structure": "personal",
    }
    await reply(
        exchange,
        record,
        200,
        {
            "accounts": [entry],
            "account_ordering": [account.account_id],
            "default_account_id": account.account_id,
        },
    )
