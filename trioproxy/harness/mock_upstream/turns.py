"""One answer to a Responses request, for HTTP and WebSocket alike: the checks and faults
before its first event, then its events streamed with the configured delays and the faults
that cut or fail a stream. The transport is given as two callables, ``send(event)`` and
``drop(code)`` (``writers.py``)."""

from __future__ import annotations

from typing import Any, Protocol

import trio

from trioproxy.harness.mock_upstream import responses as plans
from trioproxy.harness.mock_upstream.accounts import MockAccount
from trioproxy.harness.mock_upstream.backend import MockBackend
from trioproxy.harness.mock_upstream.faults import Fault
from trioproxy.harness.mock_upstream.recorder import RequestRecord
from trioproxy.harness.mock_upstream.transport import Exchange, WebSocket, WebSocketClosed


class Send(Protocol):
    async def __call__(self, event: dict[str, Any], *, multiline: bool = False) -> None: ...


class Drop(Protocol):
    async def __call__(self, code: int) -> None: ...


async def before_stream(
    backend: MockBackend,
    body: Any,
    account: MockAccount,
    fault: Fault | None,
    context: list[Any],
    *,
    exchange: Exchange | None = None,
    ws: WebSocket | None = None,
) -> dict[str, Any]:
    """Checks and faults that happen before the first event; raises ``Failure``."""
    if fault is not None and fault.kind == "stall":
        await fault.stall()
    if fault is not None and fault.kind == "close_before_created":
        if ws is not None:
            await ws.close(int(fault.params["code"]), "injected close")
            raise WebSocketClosed(int(fault.params["code"]))
        assert exchange is not None
        await exchange.abort()
    if fault is not None:
        failure = backend.fault_failure(fault, account)
        if failure is not None:
            raise failure
    checked = backend.validate(body, context, account)
    # like the captured backend, an exhausted account answers every request with the
    # usage-limit error, prewarms included (the WebSocket upgrade itself is accepted)
    failure = backend.quota_failure(account)
    if failure is not None:
        raise failure
    return checked


async def stream_events(
    backend: MockBackend,
    plan: plans.TurnPlan,
    account: MockAccount,
    fault: Fault | None,
    send: Send,
    drop: Drop,
    record: RequestRecord,
) -> str:
    """Send a plan's events, applying streaming faults. Returns the outcome: completed,
    failed or dropped."""
    config = backend.config
    first_delay, between = config.first_event_delay, config.event_delay
    events = plan.events
    if fault is not None and fault.kind == "slow":
        first_delay = fault.params["first_event_delay"] or first_delay
        between = fault.params["event_delay"] or between
    if plan.kind != "prewarm":
        account.charge(plan.usage["input_tokens"], plan.usage["output_tokens"])
    now = backend.clock.now()
    if first_delay:
        await trio.sleep(backend.jittered(first_delay))
    if config.rate_limit_events:
        await send(account.rate_limits_event(now))
    for index, event in enumerate(events):
        if index and between:
            await trio.sleep(backend.jittered(between))
        if (
            fault is not None
            and fault.kind == "close_after_created"
            and index == max(1, int(fault.params["after_events"]))
        ):
            await drop(int(fault.params["code"]))
            return "dropped"
        if (
            fault is not None
            and fault.kind == "stream_error"
            and index == max(0, int(fault.params["after_events"]))
        ):
            error = stream_error_event(events[0]["response"], event["sequence_number"], fault)
            await send(error, multiline=bool(fault.params["pretty"]))
            record.error_code = str(fault.params["code"])
            return "failed"
        if (
            fault is not None
            and fault.kind == "response_failed"
            and event["type"] not in ("response.created", "response.in_progress")
        ):
            failed = failed_event(events[0]["response"], event["sequence_number"], fault)
            await send(failed)
            record.error_code = failed["response"]["error"]["code"]
            return "failed"
        await send(event)
    backend.stats.responses_completed += 1
    return "completed"


def failed_event(response: dict[str, Any], sequence_number: int, fault: Fault) -> dict[str, Any]:
    """The ``response.failed`` event a ``response_failed`` fault sends in place of the
    event numbered ``sequence_number``."""
    code = str(fault.params["code"])
    failed = dict(response)
    failed.update(
        status="failed",
        error={
            "code": code,
            "message": fault.params["message"] or f"injected failure: {code}",
            "type": "server_error" if code == "server_error" else "invalid_request_error",
        },
    )
    return {"type": "response.failed", "sequence_number": sequence_number, "response": failed}


def stream_error_event(
    response: dict[str, Any], sequence_number: int, fault: Fault
) -> dict[str, Any]:
    """The event a ``stream_error`` fault sends in place of the event numbered
    ``sequence_number``: an ``error`` (with a ``status`` unless it is 0) or a
    ``response.failed``."""
    code = str(fault.params["code"])
    error = {
        "type": "server_error" if code in ("server_error", "server_is_overloaded") else "error",
        "code": code,
        "message": fault.params["message"] or f"injected stream error: {code}",
        "param": None,
    }
    if fault.params["event"] == "response.failed":
        failed = {**response, "status": "failed", "error": error}
        return {"type": "response.failed", "sequence_number": sequence_number, "response": failed}
    event: dict[str, Any] = {"type": "error", "sequence_number": sequence_number, "error": error}
    if int(fault.params["status"]):
        event["status"] = int(fault.params["status"])
    return event
