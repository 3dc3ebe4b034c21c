"""The mock Codex backend: ``chatgpt.com/backend-api`` and ``auth.openai.com`` as far as a
Codex client (or trioproxy) can tell.

Routes::

    POST /backend-api/codex/responses            SSE
    GET  /backend-api/codex/responses  (Upgrade) WebSocket, beta responses_websockets=2026-02-06
    POST /backend-api/codex/responses/compact    legacy unary compaction
    GET  /backend-api/codex/models               {"models": [...]} for the account's plan
    GET  /backend-api/wham/usage                 the account's windows (also /api/codex/usage)
    GET  /backend-api/wham/accounts/check        workspace routing
    POST /oauth/token                            refresh with rotation
    *    /__mock__/...                           control API (see control.py)

Continuity: like the real backend with ``store: false``, a ``previous_response_id`` is only
known to the WebSocket connection that produced it (request input + output items per
response id); HTTP never has one. Anything else answers ``previous_response_not_found``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import trio
import zstandard

from trioproxy.harness.mock_upstream import responses as plans
from trioproxy.harness.mock_upstream.accounts import MockAccount, MockTime, make_account
from trioproxy.harness.mock_upstream.faults import Fault, FaultBook
from trioproxy.harness.mock_upstream.models import models_for_plan
from trioproxy.harness.mock_upstream.recorder import Recorder, RequestRecord
from trioproxy.harness.mock_upstream.segmentation import Segmenter, check_mode
from trioproxy.harness.mock_upstream.transport import (
    Exchange,
    Headers,
    Request,
    WebSocket,
    WebSocketClosed,
    run_websocket,
)
from trioproxy.harness.mock_upstream.writers import HttpAnswer, WsAnswer, dumps

WS_BETA = "responses_websockets=2026-02-06"
MODELS_ETAG = '"mock-models-1"'
JSON = [("content-type", "application/json")]
MAX_STORED_RESPONSES = 256


def err(
    message: str, type_: str, code: str | None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def prev_not_found(response_id: str) -> dict[str, Any]:
    return err(
        f"Previous response with id '{response_id}' not found.",
        "invalid_request_error",
        "previous_response_not_found",
        "previous_response_id",
    )


DEACTIVATED_MESSAGE = (
    "Your OpenAI account has been deactivated, please check your email for more information. "
    "If you feel this is an error, contact us through our help center at help.openai.com."
)


@attrs.frozen
class MockConfig:
    accounts: int = 1
    plan: str = "plus"
    primary_limit: int = 1000
    secondary_limit: int = 10000
    token_ttl: float = 10 * 24 * 3600
    deltas: int = 0
    delta_bytes: int = 0
    first_event_delay: float = 0.0
    event_delay: float = 0.0
    rate_limit_events: bool = True
    latency_jitter: float = 0.0  # each delay drawn from delay * (1 +/- jitter)
    record: bool = True
    record_frames: bool = True
    max_records: int = 20000
    seed: int = 0
    strict_encrypted_content: bool = False  # reject reasoning encrypted by another account
    # how answers are cut into socket writes: event, whole or split (segmentation.py)
    segmentation: str = attrs.field(default="event", validator=lambda _, __, v: check_mode(v))


@attrs.define(eq=False)
class Failure(Exception):
    """An error answer: HTTP status + envelope (or, on a socket, an ``error`` event)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = attrs.field(factory=dict)


@attrs.define(eq=False)
class Stats:
    http_requests: int = 0
    in_flight: int = 0  # requests (HTTP or WebSocket upgrades) whose handler is running
    connections_open: int = 0  # TCP connections accepted and not yet closed (idle ones too)
    connections_total: int = 0
    http_streams_open: int = 0
    ws_connections_total: int = 0
    ws_open: int = 0
    ws_messages: int = 0
    responses_completed: int = 0
    refreshes: int = 0
    faults_fired: int = 0

    def view(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.define(eq=False)
class ConnectionStore:
    """Per-WebSocket ``previous_response_id`` state: response id -> (parent, input, output)."""

    entries: collections.OrderedDict[str, tuple[str | None, list[Any], list[Any]]] = attrs.field(
        factory=collections.OrderedDict
    )

    def context(self, response_id: str) -> list[Any] | None:
        if response_id not in self.entries:
            return None
        chain: list[tuple[list[Any], list[Any]]] = []
        current: str | None = response_id
        while current is not None and current in self.entries:
            parent, inp, out = self.entries[current]
            chain.append((inp, out))
            current = parent
        items: list[Any] = []
        for inp, out in reversed(chain):
            items += inp
            items += out
        return items

    def remember(
        self, response_id: str, parent: str | None, inp: list[Any], out: list[Any]
    ) -> None:
        self.entries[response_id] = (parent, inp, out)
        while len(self.entries) > MAX_STORED_RESPONSES:
            self.entries.popitem(last=False)


@attrs.define(eq=False)
class MockBackend:
    config: MockConfig = attrs.field(factory=MockConfig)
    clock: MockTime = attrs.field(factory=MockTime)
    accounts: dict[str, MockAccount] = attrs.field(factory=dict)
    faults: FaultBook = attrs.field(factory=FaultBook)
    recorder: Recorder = attrs.field(init=False)
    stats: Stats = attrs.field(factory=Stats)
    script: collections.deque[tuple[str, str]] = attrs.field(factory=collections.deque)
    segment_rng: random.Random = attrs.field(init=False)
    _zstd: zstandard.ZstdDecompressor = attrs.field(factory=zstandard.ZstdDecompressor)

    def __attrs_post_init__(self) -> None:
        self.recorder = Recorder(
            enabled=self.config.record,
            frames=self.config.record_frames,
            max_records=self.config.max_records,
        )
        self.faults.rng.seed(self.config.seed)
        self.segment_rng = random.Random(self.config.seed)

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """Held for the life of one TCP connection (``Stats.connections_open``)."""
        self.stats.connections_open += 1
        self.stats.connections_total += 1
        try:
            yield
        finally:
            self.stats.connections_open -= 1

    # -- accounts -------------------------------------------------------------------------
    def ensure_accounts(self) -> None:
        """Create the configured accounts (needs a running trio loop for the clock)."""
        now = self.clock.now()
        for index in range(1, self.config.accounts + 1):
            if f"acct-mock-{index}" not in self.accounts:
                self.add_account(
                    make_account(
                        index,
                        now,
                        plan=self.config.plan,
                        primary_limit=self.config.primary_limit,
                        secondary_limit=self.config.secondary_limit,
                        token_ttl=self.config.token_ttl,
                    )
                )

    def add_account(self, account: MockAccount) -> MockAccount:
        self.accounts[account.account_id] = account
        return account

    def authenticate(self, request: Request) -> MockAccount:
        now = self.clock.now()
        auth = request.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Failure(
                401,
                err(
                    "Missing bearer authentication in header",
                    "invalid_request_error",
                    "missing_authorization",
                ),
            )
        owner = next((a for a in self.accounts.values() if token in a.access_tokens), None)
        if owner is None:
            raise Failure(
                401,
                err(
                    "Your authentication token has been invalidated. Please try signing in again.",
                    "invalid_request_error",
                    "token_invalidated",
                ),
            )
        if owner.access_tokens[token] <= now:
            raise Failure(
                401,
                err(
                    "Provided authentication token is expired. Please try signing in again.",
                    "invalid_request_error",
                    "token_expired",
                ),
            )
        account_header = request.header("chatgpt-account-id")
        if account_header != owner.account_id:
            raise Failure(
                401,
                err(
                    "chatgpt-account-id does not match the authentication token.",
                    "invalid_request_error",
                    "account_mismatch",
                ),
            )
        if owner.deactivated:
            raise Failure(
                401, err(DEACTIVATED_MESSAGE, "invalid_request_error", "account_deactivated")
            )
        return owner

    # -- faults ---------------------------------------------------------------------------
    def take_fault(self, on: str, account: str | None, transport: str) -> Fault | None:
        fault = self.faults.take(on, account, transport)
        if fault is not None:
            self.stats.faults_fired += 1
        return fault

    def segmenter(self, fault: Fault | None, mode: str | None = None) -> Segmenter:
        """How one turn is written: a ``segmentation`` fault's mode, else ``mode`` (set for
        a WebSocket connection by a fault at its upgrade), else the configured one."""
        if fault is not None and fault.kind == "segmentation":
            mode = str(fault.params["mode"])
        return Segmenter(mode or self.config.segmentation, self.segment_rng)

    def fault_failure(self, fault: Fault, account: MockAccount | None) -> Failure | None:
        """The error answer of a fault that answers with an error (None for others)."""
        now = self.clock.now()
        kind, p = fault.kind, fault.params
        if kind == "usage_limit":
            resets_at = int(now + p["resets_in"])
            headers = account.rate_limit_headers(now) if account else {}
            # the headers agree with the body: the window is full until resets_at
            headers["x-codex-primary-used-percent"] = "100.0"
            headers["x-codex-primary-reset-at"] = str(resets_at)
            headers["x-codex-primary-reset-after-seconds"] = str(int(p["resets_in"]))
            return Failure(
                int(p["status"]),
                err(
                    "The usage limit has been reached",
                    "usage_limit_reached",
                    None,
                    plan_type=account.plan if account else "plus",
                    resets_at=resets_at,
                    resets_in_seconds=int(p["resets_in"]),
                ),
                headers,
            )
        if kind == "token_invalidated":
            return Failure(
                401,
                err(
                    "Your authentication token has been invalidated. Please try signing in again.",
                    "invalid_request_error",
                    "token_invalidated",
                ),
            )
        if kind == "account_deactivated":
            return Failure(
                401, err(DEACTIVATED_MESSAGE, "invalid_request_error", "account_deactivated")
            )
        if kind == "server_error":
            return Failure(
                int(p["status"]),
                err(
                    "An error occurred while processing your request.",
                    "server_error",
                    "server_error",
                ),
            )
        if kind == "overloaded":
            return Failure(
                503,
                err(
                    "Our servers are currently overloaded. Please try again later.",
                    "server_error",
                    "server_is_overloaded",
                ),
            )
        if kind == "previous_response_not_found":
            return Failure(400, prev_not_found(plans.new_id("resp")))
        if kind == "connection_limit":
            return Failure(
                400,
                err(
                    "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to continue.",
                    "invalid_request_error",
                    "websocket_connection_limit_reached",
                ),
            )
        return None

    # -- request helpers ------------------------------------------------------------------
    def decode_json(self, request: Request) -> Any:
        raw = request.body
        encoding = (request.header("content-encoding") or "").lower()
        try:
            if encoding == "zstd":
                raw = self._zstd.decompressobj().decompress(raw)
            elif encoding not in ("", "identity"):
                raise Failure(
                    415,
                    err(
                        f"Unsupported content-encoding {encoding!r}",
                        "invalid_request_error",
                        "unsupported_content_encoding",
                    ),
                )
            return json.loads(raw) if raw else None
        except zstandard.ZstdError:
            raise Failure(
                400,
                err(
                    "The request body could not be decompressed.",
                    "invalid_request_error",
                    "invalid_body",
                ),
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise Failure(
                400,
                err(
                    "We could not parse the JSON body of your request.",
                    "invalid_request_error",
                    "invalid_json",
                ),
            ) from None

    def response_headers(
        self, account: MockAccount, request: Request | None, model: str | None = None
    ) -> Headers:
        now = self.clock.now()
        headers: Headers = list(account.rate_limit_headers(now).items())
        turn_state = (
            request.header("x-codex-turn-state") if request else None
        ) or f"ts_{secrets.token_hex(8)}"
        headers += [
            ("x-codex-turn-state", turn_state),
            ("x-models-etag", MODELS_ETAG),
            ("x-reasoning-included", "true"),
            ("x-request-id", plans.new_id("req")),
        ]
        if model:
            headers.append(("openai-model", model))
        return headers

    def validate(
        self, body: Any, context: list[Any], account: MockAccount | None = None
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise Failure(
                400,
                err(
                    "The request body must be a JSON object.",
                    "invalid_request_error",
                    "invalid_body",
                ),
            )
        items = body.get("input")
        if items is None or isinstance(items, str):
            items = (
                []
                if items is None
                else [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": items}],
                    }
                ]
            )
            body = {**body, "input": items}
        if not isinstance(items, list):
            raise Failure(
                400,
                err(
                    "'input' must be a list of items.",
                    "invalid_request_error",
                    "invalid_type",
                    "input",
                ),
            )
        known = {
            i.get("call_id")
            for i in [*context, *items]
            if isinstance(i, dict) and i.get("type") in ("function_call", "custom_tool_call")
        }
        for item in items:
            if (
                isinstance(item, dict)
                and item.get("type") in ("function_call_output", "custom_tool_call_output")
                and item.get("call_id") not in known
            ):
                raise Failure(
                    400,
                    err(
                        f"No tool call found for function call output with call_id {item.get('call_id')}.",
                        "invalid_request_error",
                        None,
                        "input",
                    ),
                )
        if self.config.strict_encrypted_content and account is not None:
            for item in items:
                if (
                    isinstance(item, dict)
                    and item.get("type") == "reasoning"
                    and item.get("encrypted_content")
                ):
                    owner = plans.decode_opaque(str(item["encrypted_content"])).get("account")
                    if owner != account.account_id:
                        raise Failure(
                            400,
                            err(
                                f"The encrypted content for item {item.get('id')} could not be verified.",
                                "invalid_request_error",
                                "invalid_encrypted_content",
                                "input",
                            ),
                        )
        if not isinstance(body.get("model", ""), str):
            raise Failure(
                400,
                err("'model' must be a string.", "invalid_request_error", "invalid_type", "model"),
            )
        checked: dict[str, Any] = body
        return checked

    def quota_failure(self, account: MockAccount) -> Failure | None:
        now = self.clock.now()
        blocked = account.blocking_window(now)
        if blocked is None:
            return None
        _, window = blocked
        headers = account.rate_limit_headers(now)
        return Failure(
            429,
            err(
                "The usage limit has been reached",
                "usage_limit_reached",
                None,
                plan_type=account.plan,
                resets_at=int(window.reset_at),
                resets_in_seconds=max(0, round(window.reset_at - now)),
            ),
            headers,
        )

    # -- dispatch -------------------------------------------------------------------------
    async def handle(self, request: Request, exchange: Exchange) -> None:
        from trioproxy.harness.mock_upstream.control import handle_control

        self.stats.http_requests += 1
        path = request.path
        record = self.recorder.start(request, transport="ws" if request.is_websocket else "http")
        if path.startswith("/__mock__/"):
            await handle_control(self, request, exchange)
            return
        self.stats.in_flight += 1
        try:
            await self._dispatch(request, exchange, record)
        finally:
            self.stats.in_flight -= 1

    async def _dispatch(self, request: Request, exchange: Exchange, record: RequestRecord) -> None:
        path = request.path
        if path.rstrip("/") == "/backend-api/codex/responses":
            if request.is_websocket:
                await self.websocket_session(request, exchange, record)
            elif request.method == "POST":
                await self.http_responses(request, exchange, record)
            else:
                await self.reply(
                    exchange,
                    record,
                    405,
                    err("Method not allowed", "invalid_request_error", "method_not_allowed"),
                )
            return
        routes = {
            ("POST", "/backend-api/codex/responses/compact"): self.compact,
            ("GET", "/backend-api/codex/models"): self.models,
            ("GET", "/backend-api/wham/usage"): self.usage,
            ("GET", "/api/codex/usage"): self.usage,
            ("GET", "/backend-api/wham/accounts/check"): self.accounts_check,
            ("POST", "/oauth/token"): self.oauth_token,
        }
        route = routes.get((request.method, path.rstrip("/")))
        if route is None:
            await self.reply(exchange, record, 404, {"detail": "Not Found"})
            return
        try:
            await route(request, exchange, record)
        except Failure as failure:
            await self.reply(exchange, record, failure.status, failure.body, failure.headers)

    async def reply(
        self,
        exchange: Exchange,
        record: RequestRecord,
        status: int,
        body: Any,
        headers: dict[str, str] | Iterable[tuple[str, str]] = (),
    ) -> None:
        record.status = status
        if isinstance(body, dict) and "error" in body and isinstance(body["error"], dict):
            record.error_code = body["error"].get("code") or body["error"].get("type")
        extra = list(headers.items()) if isinstance(headers, dict) else list(headers)
        await exchange.respond(status, [*JSON, *extra], dumps(body).encode())

    async def apply_point_fault(
        self,
        on: str,
        request: Request,
        exchange: Exchange,
        record: RequestRecord,
        account: MockAccount | None,
    ) -> Fault | None:
        """Faults at the non-streaming endpoints: stall, drop, or an error answer. Returns
        the fault taken (a ``slow`` one is the caller's to apply)."""
        fault = self.take_fault(on, account.account_id if account else None, "http")
        if fault is None:
            return None
        record.fault = fault.kind
        if fault.kind == "stall":
            await fault.stall()
            return fault
        if fault.kind in ("close_before_created", "close_after_created"):
            await exchange.abort()
        failure = self.fault_failure(fault, account)
        if failure is not None:
            raise failure
        return fault

    # -- simple endpoints -----------------------------------------------------------------
    async def models(self, request: Request, exchange: Exchange, record: RequestRecord) -> None:
        account = self.authenticate(request)
        record.account = account.account_id
        await self.apply_point_fault("models", request, exchange, record, account)
        await self.reply(
            exchange,
            record,
            200,
            {"models": models_for_plan(account.plan)},
            [("x-models-etag", MODELS_ETAG), ("etag", MODELS_ETAG)],
        )

    async def usage(self, request: Request, exchange: Exchange, record: RequestRecord) -> None:
        account = self.authenticate(request)
        record.account = account.account_id
        await self.apply_point_fault("usage", request, exchange, record, account)
        await self.reply(exchange, record, 200, account.usage_payload(self.clock.now()))

    async def accounts_check(
        self, request: Request, exchange: Exchange, record: RequestRecord
    ) -> None:
        account = self.authenticate(request)
        record.account = account.account_id
        entry = {
            "id": account.account_id,
            "workspace_backend_origin": "https://chatgpt.com",
            "account_routing_override": "NO_CONSTRAINT",
            "plan_type": account.plan,
            "name": None,
            "structure": "personal",
        }
        await self.reply(
            exchange,
            record,
            200,
            {
                "accounts": [entry],
                "account_ordering": [account.account_id],
                "default_account_id": account.account_id,
            },
        )

    async def oauth_token(
        self, request: Request, exchange: Exchange, record: RequestRecord
    ) -> None:
        content_type = (request.header("content-type") or "").lower()
        if "application/x-www-form-urlencoded" in content_type:
            from urllib.parse import parse_qsl

            body: Any = dict(parse_qsl(request.body.decode("utf-8", "replace")))
        else:
            body = self.decode_json(request)
        record.body = (
            {**body, "refresh_token": "<redacted>"}
            if isinstance(body, dict) and "refresh_token" in body
            else body
        )
        if (
            not isinstance(body, dict)
            or body.get("grant_type") != "refresh_token"
            or not body.get("refresh_token")
        ):
            raise Failure(
                400,
                err(
                    "Unsupported grant_type or missing refresh_token.",
                    "invalid_request_error",
                    "invalid_request",
                ),
            )
        token = str(body["refresh_token"])
        account = next((a for a in self.accounts.values() if a.refresh_token == token), None)
        reused = next((a for a in self.accounts.values() if token in a.used_refresh_tokens), None)
        known = account or reused
        record.account = known.account_id if known is not None else None
        fault = await self.apply_point_fault("token", request, exchange, record, known)
        if account is None:
            if reused is not None:
                raise Failure(
                    401,
                    err(
                        "Your refresh token has already been used to generate a new access token. Please try signing in again.",
                        "invalid_request_error",
                        "refresh_token_reused",
                    ),
                )
            raise Failure(
                401,
                err(
                    "Your refresh token has been invalidated. Please try signing in again.",
                    "invalid_request_error",
                    "refresh_token_invalidated",
                ),
            )
        if account.refresh_mode == "expired":
            raise Failure(
                401,
                err(
                    "Your refresh token has expired. Please try signing in again.",
                    "invalid_request_error",
                    "refresh_token_expired",
                ),
            )
        if account.refresh_mode == "invalidated":
            raise Failure(
                401,
                err(
                    "Your refresh token has been invalidated. Please try signing in again.",
                    "invalid_request_error",
                    "refresh_token_invalidated",
                ),
            )
        now = self.clock.now()
        access = account.mint(now)
        refresh = account.new_refresh_token()
        account.refresh_count += 1
        self.stats.refreshes += 1
        if fault is not None and fault.kind == "slow":
            # the refresh took effect (the old refresh token is spent), the answer is late:
            # a client that gives up now has lost the only valid refresh token
            await trio.sleep(fault.params["first_event_delay"])
        await self.reply(
            exchange,
            record,
            200,
            {
                "access_token": access,
                "id_token": account.id_token,
                "refresh_token": refresh,
                "expires_in": int(account.token_ttl),
                "token_type": "Bearer",
                "scope": "openid profile email offline_access",
            },
        )

    async def compact(self, request: Request, exchange: Exchange, record: RequestRecord) -> None:
        account = self.authenticate(request)
        record.account = account.account_id
        body = self.validate(self.decode_json(request), [])
        record.body = body
        await self.apply_point_fault("compact", request, exchange, record, account)
        failure = self.quota_failure(account)
        if failure is not None:
            raise failure
        account.charge(plans.estimate_tokens(body["input"]), 64)
        await self.reply(
            exchange,
            record,
            200,
            plans.compact_output(body, account.account_id),
            self.response_headers(account, request, body.get("model")),
        )

    # -- responses over HTTP --------------------------------------------------------------
    async def http_responses(
        self, request: Request, exchange: Exchange, record: RequestRecord
    ) -> None:
        try:
            account = self.authenticate(request)
            record.account = account.account_id
            body = self.decode_json(request)
            record.body = body
            fault = self.take_fault("responses", account.account_id, "http")
            if fault is not None:
                record.fault = fault.kind
            body = await self.before_stream(body, account, fault, [], exchange=exchange)
            if body.get("previous_response_id"):
                raise Failure(400, prev_not_found(str(body["previous_response_id"])))
        except Failure as failure:
            await self.reply(exchange, record, failure.status, failure.body, failure.headers)
            return
        plan = self.plan(body, [], account, fault)
        record.status = 200
        record.response_id = plan.events[0]["response"]["id"]
        headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            *self.response_headers(account, request, body.get("model")),
        ]
        self.stats.http_streams_open += 1
        try:
            answer = HttpAnswer(exchange, self.segmenter(fault))
            await answer.start(200, headers)
            outcome = await self.stream_events(
                plan, account, fault, answer.send, answer.drop, record
            )
            if outcome != "dropped":
                await answer.finish()
        finally:
            self.stats.http_streams_open -= 1

    async def before_stream(
        self,
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
            failure = self.fault_failure(fault, account)
            if failure is not None:
                raise failure
        body = self.validate(body, context, account)
        # like the captured backend, an exhausted account answers every request with the
        # usage-limit error, prewarms included (the WebSocket upgrade itself is accepted)
        failure = self.quota_failure(account)
        if failure is not None:
            raise failure
        checked: dict[str, Any] = body
        return checked

    def plan(
        self, body: dict[str, Any], context: list[Any], account: MockAccount, fault: Fault | None
    ) -> plans.TurnPlan:
        answer = None
        if self.script and body.get("generate") is not False:
            answer = self.script.popleft()
        deltas = self.config.deltas
        if fault is not None and fault.kind == "slow" and fault.params["deltas"]:
            deltas = int(fault.params["deltas"])
        return plans.plan_response(
            body,
            context,
            response_id=plans.new_id("resp"),
            created_at=int(self.clock.now()),
            account_id=account.account_id,
            deltas=deltas,
            delta_bytes=self.config.delta_bytes,
            answer=answer,
        )

    def jittered(self, delay: float) -> float:
        """``delay`` spread uniformly over ``delay * (1 +/- latency_jitter)``."""
        jitter = self.config.latency_jitter
        if not jitter:
            return delay
        return max(0.0, delay * (1.0 + self.faults.rng.uniform(-jitter, jitter)))

    async def stream_events(
        self,
        plan: plans.TurnPlan,
        account: MockAccount,
        fault: Fault | None,
        send: Any,
        drop: Any,
        record: RequestRecord,
    ) -> str:
        """Send a plan's events, applying streaming faults. Returns the outcome: completed, failed or dropped."""
        first_delay = self.config.first_event_delay
        between = self.config.event_delay
        events = plan.events
        if fault is not None and fault.kind == "slow":
            first_delay = fault.params["first_event_delay"] or first_delay
            between = fault.params["event_delay"] or between
        if plan.kind != "prewarm":
            account.charge(plan.usage["input_tokens"], plan.usage["output_tokens"])
        now = self.clock.now()
        if first_delay:
            await trio.sleep(self.jittered(first_delay))
        if self.config.rate_limit_events:
            await send(account.rate_limits_event(now))
        for index, event in enumerate(events):
            if index and between:
                await trio.sleep(self.jittered(between))
            if (
                fault is not None
                and fault.kind == "close_after_created"
                and index == max(1, int(fault.params["after_events"]))
            ):
                await drop(int(fault.params["code"]))
                return "dropped"
            if (
                fault is not None
                and fault.kind == "response_failed"
                and event["type"] not in ("response.created", "response.in_progress")
            ):
                response = dict(events[0]["response"])
                code = str(fault.params["code"])
                response.update(
                    status="failed",
                    error={
                        "code": code,
                        "message": fault.params["message"] or f"injected failure: {code}",
                        "type": "server_error"
                        if code == "server_error"
                        else "invalid_request_error",
                    },
                )
                await send(
                    {
                        "type": "response.failed",
                        "sequence_number": event["sequence_number"],
                        "response": response,
                    }
                )
                record.error_code = code
                return "failed"
            await send(event)
        self.stats.responses_completed += 1
        return "completed"

    # -- responses over WebSocket ---------------------------------------------------------
    async def websocket_session(
        self, request: Request, exchange: Exchange, record: RequestRecord
    ) -> None:
        try:
            account = self.authenticate(request)
            record.account = account.account_id
            fault = self.take_fault("upgrade", account.account_id, "ws")
            mode = None
            if fault is not None:
                record.fault = fault.kind
                if fault.kind == "segmentation":
                    mode = str(fault.params["mode"])  # every turn of this connection
                elif fault.kind == "stall":
                    await exchange.pause(fault.params["seconds"])
                elif fault.kind in ("close_before_created", "close_after_created"):
                    await exchange.abort()
                else:
                    failure = self.fault_failure(fault, account)
                    if failure is not None:
                        raise failure
            beta = request.header("openai-beta") or ""
            if WS_BETA not in [t.strip() for t in beta.split(",")]:
                raise Failure(
                    400,
                    err(
                        f"Responses over WebSocket need the header OpenAI-Beta: {WS_BETA}.",
                        "invalid_request_error",
                        "invalid_beta_header",
                    ),
                )
        except Failure as failure:
            await self.reply(exchange, record, failure.status, failure.body, failure.headers)
            return
        record.status = 101
        ws = await exchange.accept_websocket(self.response_headers(account, request))
        self.stats.ws_connections_total += 1
        self.stats.ws_open += 1
        record.open = True
        store = ConnectionStore()

        async def session(ws: WebSocket) -> None:
            while True:
                message = await ws.receive()
                self.stats.ws_messages += 1
                await self.ws_message(ws, request, record, account, store, message, mode)

        try:
            await run_websocket(ws, session)
        finally:
            self.stats.ws_open -= 1
            record.open = False
            record.close_code = ws.close_code

    async def ws_message(
        self,
        ws: WebSocket,
        request: Request,
        conn_record: RequestRecord,
        account: MockAccount,
        store: ConnectionStore,
        message: str | bytes,
        mode: str | None = None,
    ) -> None:
        record = self.recorder.ws_message(conn_record, message)
        prev = None
        fault: Fault | None = None
        try:
            if isinstance(message, bytes):
                raise Failure(
                    400,
                    err(
                        "Binary frames are not supported; send JSON text frames.",
                        "invalid_request_error",
                        "invalid_frame",
                    ),
                )
            try:
                body = json.loads(message)
            except ValueError:
                raise Failure(
                    400,
                    err(
                        "We could not parse the JSON body of your request.",
                        "invalid_request_error",
                        "invalid_json",
                    ),
                ) from None
            record.body = body
            if not isinstance(body, dict) or body.get("type") != "response.create":
                raise Failure(
                    400,
                    err(
                        "Unsupported message type; expected response.create.",
                        "invalid_request_error",
                        "invalid_message_type",
                        "type",
                    ),
                )
            fault = self.take_fault("responses", account.account_id, "ws")
            if fault is not None:
                record.fault = fault.kind
            prev = body.get("previous_response_id")
            context: list[Any] = []
            if prev and (fault is None or fault.kind != "previous_response_not_found"):
                found = store.context(str(prev))
                if found is None:
                    raise Failure(400, prev_not_found(str(prev)))
                context = found
            body = await self.before_stream(body, account, fault, context, ws=ws)
        except Failure as failure:
            record.status = failure.status
            record.error_code = failure.body["error"].get("code") or failure.body["error"].get(
                "type"
            )
            event: dict[str, Any] = {
                "type": "error",
                "status": failure.status,
                "error": failure.body["error"],
            }
            if failure.headers:
                event["headers"] = failure.headers
            answer = WsAnswer(ws, self.segmenter(fault, mode), self.recorder, conn_record)
            await answer.send(event)
            await answer.finish()
            if failure.body["error"].get("code") == "websocket_connection_limit_reached":
                await ws.close(1000, "connection limit reached")
                raise WebSocketClosed(1000) from None
            return
        plan = self.plan(body, context, account, fault)
        record.status = 200
        record.response_id = plan.events[0]["response"]["id"]
        answer = WsAnswer(ws, self.segmenter(fault, mode), self.recorder, conn_record)
        outcome = await self.stream_events(plan, account, fault, answer.send, answer.drop, record)
        if outcome != "dropped":
            await answer.finish()
        if outcome == "completed":
            store.remember(
                record.response_id,
                str(prev) if prev else None,
                list(body.get("input") or []),
                plan.output,
            )
