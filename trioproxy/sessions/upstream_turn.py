"""Open one turn upstream over HTTP/SSE, with failover before the first byte.

``run_turn`` tries accounts in the order routing picks them until one answers with a stream
whose first meaningful event is ``response.created`` (a ``codex.rate_limits`` event may come
first). On the way it refreshes a token once after a 401, marks accounts exhausted or
deactivated from what upstream said, and gives up after ``max_failover_attempts`` or when no
candidate is left, with the answer the client should see:

* every active account usage-limited -> ``429 usage_limit_reached`` with the earliest
  ``resets_at`` (the shape the Codex CLI shows as a usage limit);
* no usable account at all -> ``503 no_available_account`` naming why;
* otherwise the last upstream error, sanitized.

Resource handling: the ``UpstreamTurn`` handed to ``serve`` owns an open upstream response
(``StreamedResponse``, whose body holds the connection); ``serve`` closes it with
``aclose()`` (shielded, bounded). Failed attempts are closed here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import httpx

from trioproxy.accounts.pool import Account, Decision, RequestInfo
from trioproxy.accounts.refresh import RefreshError
from trioproxy.admission import Overloaded
from trioproxy.protocol.errors import error_envelope
from trioproxy.protocol.headers import codex_headers, header, upstream_http_headers
from trioproxy.protocol.sse import SSEFrameSplitter, frame_data
from trioproxy.protocol.upstream_errors import (
    ACCOUNT_LEVEL,
    UpstreamFailure,
    classify,
    classify_failed_event,
    parse_body,
    sanitize_envelope,
)
from trioproxy.sessions.context import ProxyContext, ProxyError
from trioproxy.upstream.transport import StreamedResponse

MAX_ERROR_BODY = 1024 * 1024


@attrs.define(eq=False)
class UpstreamTurn:
    account: Account
    response: StreamedResponse
    chunks: AsyncIterator[bytes]
    held: list[bytes]
    splitter: SSEFrameSplitter
    first_event: dict[str, Any]
    learned: bool = False

    def learn_headers(self, ctx: ProxyContext) -> None:
        """Fold the answer's ``x-codex-*`` rate-limit headers into the account's quota,
        once. The caller does this after the first bytes went to the client: the figures are
        for the next routing decisions, not for this turn, so they do not delay its first
        byte."""
        if not self.learned:
            self.learned = True
            learn_headers(ctx, self.account, self.response)

    async def aclose(self) -> None:
        await close_stream(self.response)


@attrs.define(eq=False)
class AttemptFailed(Exception):
    failure: UpstreamFailure


def transport_failure(message: str) -> UpstreamFailure:
    return UpstreamFailure(
        "transport", 502, error_envelope(message, "upstream_error", "upstream_unavailable")
    )


async def close_stream(response: StreamedResponse) -> None:
    """Close a streamed response: its connection goes back to the pool or is closed (the
    transport's close is shielded and forceful, so this is bounded even when cancelled)."""
    await response.aclose()


async def _read_error_body(chunks: AsyncIterator[bytes]) -> bytes:
    raw = b""
    try:
        async for piece in chunks:
            raw += piece
            if len(raw) > MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    return raw


def apply_failure(ctx: ProxyContext, account: Account, failure: UpstreamFailure) -> None:
    """What upstream's answer teaches the pool about the account."""
    if failure.kind == "usage_limit":
        ctx.pool.mark_exhausted(account.account_id, failure.resets_at)
    elif failure.kind == "deactivated":
        reason = str(failure.body.get("error", {}).get("message", "deactivated"))[:300]
        account.record = attrs.evolve(account.record, state="deactivated", state_reason=reason)
        ctx.store_later(
            lambda: ctx.store.set_account_state(account.account_id, "deactivated", reason)
        )


async def _first_event(
    chunks: AsyncIterator[bytes], splitter: SSEFrameSplitter
) -> tuple[list[bytes], dict[str, Any] | None]:
    """Read until the first event that is not ``codex.rate_limits`` (or the end).

    An event named by an ``event:`` line is parsed whole only if it may call for failover
    (``response.failed``, ``error``): for the rest (``response.created`` carries the whole
    request echoed back) the type is all the caller looks at. Frames without an ``event:``
    line (it is optional) are parsed."""
    held: list[bytes] = []
    async for chunk in chunks:
        held.append(chunk)
        for frame in splitter.feed(chunk):
            kind = event_type(frame) if frame.startswith(b"event:") else None
            if kind == "codex.rate_limits":
                continue
            if kind is not None and kind not in ("response.failed", "error"):
                return held, {"type": kind}
            event = frame_data(frame)
            if event is None or event.get("type") == "codex.rate_limits":
                continue
            return held, event
    return held, None


def learn_headers(ctx: ProxyContext, account: Account, response: StreamedResponse) -> None:
    ctx.pool.learn_codex_headers(account.account_id, codex_headers(response.raw_headers))


async def attempt(
    ctx: ProxyContext,
    account: Account,
    url: str,
    client_headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> UpstreamTurn:
    try:
        token = await ctx.tokens.token_for(account)
    except RefreshError as exc:
        raise AttemptFailed(
            UpstreamFailure(
                "unauthorized" if not exc.permanent else "reauth",
                401,
                error_envelope(exc.reason, "upstream_error", "token_refresh_failed"),
            )
        ) from None
    for second_try in (False, True):
        headers = upstream_http_headers(client_headers, token, account.account_id)
        try:
            response = await ctx.upstream_http.post_stream(url, headers, body)
        except httpx.HTTPError as exc:
            raise AttemptFailed(
                transport_failure(f"upstream connection failed ({type(exc).__name__})")
            ) from None
        chunks = response.aiter_raw()
        if response.status_code != 200:
            learn_headers(ctx, account, response)
            try:
                raw = await _read_error_body(chunks)
            finally:
                await close_stream(response)
            failure = classify(response.status_code, parse_body(raw), tuple(response.headers))
            if failure.kind == "unauthorized" and not second_try:
                try:
                    token = await ctx.tokens.refresh_after_401(account, token)
                except RefreshError as exc:
                    raise AttemptFailed(UpstreamFailure("unauthorized", 401, failure.body)) from exc
                continue
            apply_failure(ctx, account, failure)
            raise AttemptFailed(failure)
        # from here until UpstreamTurn owns them, any exit (a failure, the client leaving)
        # closes the stream and its iterator
        try:
            splitter = SSEFrameSplitter()
            try:
                held, first = await _first_event(chunks, splitter)
            except httpx.HTTPError as exc:
                raise AttemptFailed(
                    transport_failure(f"upstream stream failed ({type(exc).__name__})")
                ) from None
            if first is None:
                raise AttemptFailed(
                    transport_failure("upstream closed the stream before response.created")
                )
            failed = (
                classify_failed_event(first)
                if first.get("type") in ("response.failed", "error")
                else None
            )
            if failed is not None and failed.failover:
                apply_failure(ctx, account, failed)
                raise AttemptFailed(failed)
        except BaseException:
            learn_headers(ctx, account, response)
            await close_stream(response)
            raise
        return UpstreamTurn(account, response, chunks, held, splitter, first)
    raise AssertionError("unreachable")


def exhausted_answer(ctx: ProxyContext) -> ProxyError:
    resets_at = ctx.pool.earliest_reset()
    now = ctx.pool.clock.now()
    body = error_envelope(
        "Every account in the pool has reached its usage limit.",
        "usage_limit_reached",
        None,
        plan_type="pool",
        resets_at=int(resets_at) if resets_at else None,
        resets_in_seconds=max(0, int(resets_at - now)) if resets_at else None,
    )
    body["error"]["code"] = "usage_limit_reached"
    headers = [("retry-after", str(max(1, int(resets_at - now))))] if resets_at else []
    return ProxyError(429, body, headers)


def give_up(
    ctx: ProxyContext, last: UpstreamFailure | None, decision: Decision | None
) -> ProxyError:
    """The answer once no account is left to try (HTTP turns and WebSocket connects alike)."""
    if ctx.pool.all_usage_limited():
        return exhausted_answer(ctx)
    if last is not None and not last.failover and last.kind not in ACCOUNT_LEVEL:
        return ProxyError(last.status, sanitize_envelope(last.body))
    if last is not None and last.kind in ("transport", "server_error", "overloaded"):
        return ProxyError(last.status if last.status >= 500 else 502, sanitize_envelope(last.body))
    # account-side problems (tokens, deactivation) are not the client's to fix
    return no_account_answer(decision, ctx)


def no_account_answer(decision: Decision | None, ctx: ProxyContext) -> ProxyError:
    if not ctx.pool.accounts:
        why = "no accounts are configured; import a Codex auth.json with `trioproxy accounts import PATH`"
    elif decision is not None and decision.excluded:
        why = "; ".join(f"{a}: {w}" for a, w in decision.excluded)
    else:
        why = "no account can serve this request"
    return ProxyError(
        503, error_envelope(f"No account available: {why}.", "server_error", "no_available_account")
    )


async def run_turn(
    ctx: ProxyContext,
    info: RequestInfo,
    client_headers: list[tuple[bytes, bytes]],
    body: bytes,
    record: dict[str, Any],
    first_event: Callable[[], None],
    serve: Callable[[UpstreamTurn], Awaitable[None]],
) -> None:
    """Failover loop (see module docstring), then ``serve(turn)``.

    The turn is served inside the scope that holds the account's ``stream`` slot (and its
    ``create`` slot until the first event), so its slots are held exactly as long as the
    turn. ``first_event()`` is called when upstream's first event is in (the caller's
    keep-alives, sent while upstream is silent, stop then). An account whose slots are all taken
    is passed over while another can serve; when none can, the turn waits up to
    ``account_cap_wait`` for one, then is answered ``429 proxy_overloaded``."""
    url = f"{ctx.upstream}/codex/responses"
    admission = ctx.admission
    excluded: dict[str, str] = {}
    decision: Decision | None = None
    last: UpstreamFailure | None = None
    full: Overloaded | None = None
    for _ in range(ctx.settings.max_failover_attempts):
        busy = {a: "at_capacity" for a in admission.full_accounts() if a not in excluded}
        decision = ctx.pool.select(info, {**excluded, **busy})
        if decision.chosen is None and busy:
            decision = ctx.pool.select(info, excluded)  # every candidate is busy: wait
        record.setdefault("decision", []).append(decision)  # written out by the log
        if decision.chosen is None:
            break
        account = ctx.pool.accounts[decision.chosen]
        record["account_id"] = account.account_id
        admitted = False
        try:
            async with admission.account_slot(account.account_id, "stream"):
                async with (
                    admission.account_slot(account.account_id, "create"),
                    admission.work("create"),
                ):
                    admitted = True
                    turn = await attempt(ctx, account, url, client_headers, body)
                first_event()
                await serve(turn)
                return
        except Overloaded as exc:
            if admitted:
                raise
            full = exc
            excluded[account.account_id] = "at_capacity"
        except AttemptFailed as failed:
            last = failed.failure
            excluded[account.account_id] = last.kind
            if not last.failover and last.kind != "reauth":
                raise ProxyError(
                    last.status,
                    sanitize_envelope(last.body),
                    [(k, v) for k, v in last.headers if k.startswith("x-codex-")],
                ) from None
    if full is not None and (last is None or not ctx.pool.all_usage_limited()):
        raise ProxyError(429, full.envelope(), full.headers())
    raise give_up(ctx, last, decision)


def event_type(frame: bytes) -> str | None:
    """The event type of an SSE frame, cheaply (the ``event:`` line, else a peek in data)."""
    if frame.startswith(b"event:"):
        end = frame.find(b"\n")
        return frame[6:end].strip().decode("utf-8", "replace")
    at = frame.find(b'"type":"')
    if at == -1:
        return None
    end = frame.find(b'"', at + 8)
    return frame[at + 8 : end].decode("utf-8", "replace") if end != -1 else None


INSPECTED = frozenset(
    {"response.completed", "response.failed", "response.incomplete", "codex.rate_limits", "error"}
)


def inspect_frame(
    ctx: ProxyContext, account: Account, frame: bytes, record: dict[str, Any]
) -> None:
    """Read what the proxy needs from one relayed frame (usage, errors, quota)."""
    kind = event_type(frame)
    if kind not in INSPECTED:
        return
    event = frame_data(frame)
    if event is None:
        return
    record["last_event"] = kind
    if kind == "codex.rate_limits":
        ctx.pool.learn_event(account.account_id, event)
        return
    response = record_usage(record, event)
    if kind in ("response.failed", "error"):
        failure = classify_failed_event(event)
        error = response.get("error") or event.get("error") or {}
        record["error_code"] = (error.get("code") if isinstance(error, dict) else None) or kind
        if failure is not None and failure.kind == "usage_limit":
            ctx.pool.mark_exhausted(account.account_id, failure.resets_at)


def record_usage(record: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """Copy the token usage of a terminal event into a request record; return its response."""
    response = event.get("response")
    if not isinstance(response, dict):
        return {}
    usage = response.get("usage")
    if isinstance(usage, dict):
        record["input_tokens"] = usage.get("input_tokens")
        record["output_tokens"] = usage.get("output_tokens")
        details = usage.get("input_tokens_details")
        if isinstance(details, dict):
            record["cached_tokens"] = details.get("cached_tokens")
    return response


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def turn_state(headers: list[tuple[str, str]]) -> str | None:
    return header(headers, "x-codex-turn-state")
