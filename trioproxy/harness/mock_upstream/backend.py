"""The mock Codex backend's state and the decisions made from it: configuration, accounts and
authentication, faults, counters, and the plan of each answer. What answers requests is built
on it: ``routes.py`` (dispatch), ``http_routes.py``, ``oauth.py``, ``ws_sessions.py`` and
``control.py``; ``turns.py`` streams one answer for both transports.

Routes::

    POST /backend-api/codex/responses            SSE
    GET  /backend-api/codex/responses  (Upgrade) WebSocket, beta responses_websockets=2026-02-06
    POST /backend-api/codex/responses/compact    legacy unary compaction
    GET  /backend-api/codex/models               {"models": [...]} for the account's plan
    GET  /backend-api/wham/usage                 the account's windows (also /api/codex/usage)
    GET  /backend-api/wham/accounts/check        workspace routing
    POST /oauth/token                            refresh with rotation; the code exchange
    POST /api/accounts/deviceauth/usercode       device code login: a user code
    POST /api/accounts/deviceauth/token          device code login: the poll
    GET  /oauth/authorize                        browser login (PKCE S256), see login.py
    GET  /codex/device                           the device code verification page
    *    /__mock__/...                           control API (see control.py)

Continuity: like the real backend with ``store: false``, a ``previous_response_id`` is only
known to the WebSocket connection that produced it (request input + output items per
response id); HTTP never has one. Anything else answers ``previous_response_not_found``.

Turn state: each account issues its own ``x-codex-turn-state`` values and knows them; see
``accounts.py`` and ``check_turn_state``.
"""

from __future__ import annotations

import collections
import contextlib
import random
from collections.abc import Iterator
from typing import Any

import attrs
import zstandard

from trioproxy.harness.mock_upstream import responses as plans
from trioproxy.harness.mock_upstream.accounts import MockAccount, MockTime, make_account
from trioproxy.harness.mock_upstream.errors import (
    DEACTIVATED_MESSAGE,
    TOKEN_INVALIDATED_MESSAGE,
    Failure,
    fault_failure,
    invalid_request,
    quota_failure,
)
from trioproxy.harness.mock_upstream.faults import Fault, FaultBook
from trioproxy.harness.mock_upstream.login_state import LoginBook
from trioproxy.harness.mock_upstream.recorder import Recorder
from trioproxy.harness.mock_upstream.segmentation import Segmenter, check_mode
from trioproxy.harness.mock_upstream.transport import Headers, Request, WebSocket
from trioproxy.harness.mock_upstream.validation import decode_json, validate

__all__ = ["DEACTIVATED_MESSAGE", "MODELS_ETAG", "MockBackend", "MockConfig", "Stats"]

MODELS_ETAG = '"mock-models-1"'


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
    strict_turn_state: bool = False  # refuse an x-codex-turn-state another account issued
    # how answers are cut into socket writes: event, whole or split (segmentation.py)
    segmentation: str = attrs.field(default="event", validator=lambda _, __, v: check_mode(v))
    device_interval: int = 5  # seconds between device code polls the auth server asks for
    device_code_ttl: float = 900.0  # seconds a device code stays valid
    # WebSocket keep-alive: each connection is pinged every ws_ping_interval seconds (0:
    # never); one whose pong does not come within ws_ping_timeout is closed with 1011
    ws_ping_interval: float = 0.0
    ws_ping_timeout: float = 10.0


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
    foreign_turn_states: int = 0  # requests echoing an x-codex-turn-state of another account
    processed_messages: int = 0  # WebSocket response.processed messages received
    ws_pings_sent: int = 0  # keep-alive pings (ws_ping_interval)
    ws_pongs_received: int = 0  # their pongs, in time
    ws_ping_timeouts: int = 0  # connections closed (1011) for a pong that did not come
    ws_closed_by_control: int = 0  # connections closed through POST /__mock__/websockets/close

    def view(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.define(eq=False)
class MockBackend:
    """Everything the mock knows. Serve it with ``serve_mock`` (``__init__.py``)."""

    config: MockConfig = attrs.field(factory=MockConfig)
    clock: MockTime = attrs.field(factory=MockTime)
    accounts: dict[str, MockAccount] = attrs.field(factory=dict)
    faults: FaultBook = attrs.field(factory=FaultBook)
    logins: LoginBook = attrs.field(factory=LoginBook)
    recorder: Recorder = attrs.field(init=False)
    stats: Stats = attrs.field(factory=Stats)
    script: collections.deque[tuple[str, str]] = attrs.field(factory=collections.deque)
    websockets: set[WebSocket] = attrs.field(factory=set)  # the open WebSocket connections
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
        """The account whose access token the request carries; ``Failure`` (401) if it
        has none, an unknown or expired one, another account's id, or a deactivated one."""
        now = self.clock.now()
        auth = request.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise invalid_request(
                "Missing bearer authentication in header", "missing_authorization", status=401
            )
        owner = next((a for a in self.accounts.values() if token in a.access_tokens), None)
        if owner is None:
            raise invalid_request(TOKEN_INVALIDATED_MESSAGE, "token_invalidated", status=401)
        if owner.access_tokens[token] <= now:
            raise invalid_request(
                "Provided authentication token is expired. Please try signing in again.",
                "token_expired",
                status=401,
            )
        if request.header("chatgpt-account-id") != owner.account_id:
            raise invalid_request(
                "chatgpt-account-id does not match the authentication token.",
                "account_mismatch",
                status=401,
            )
        if owner.deactivated:
            raise invalid_request(DEACTIVATED_MESSAGE, "account_deactivated", status=401)
        return owner

    # -- faults ---------------------------------------------------------------------------
    def take_fault(self, on: str, account: str | None, transport: str) -> Fault | None:
        fault = self.faults.take(on, account, transport)
        if fault is not None:
            self.stats.faults_fired += 1
        return fault

    def fault_failure(self, fault: Fault, account: MockAccount | None) -> Failure | None:
        """The error answer of a fault that answers with an error (None for the others)."""
        return fault_failure(fault, account, self.clock.now())

    def quota_failure(self, account: MockAccount) -> Failure | None:
        return quota_failure(account, self.clock.now())

    def segmenter(self, fault: Fault | None, mode: str | None = None) -> Segmenter:
        """How one turn is written: a ``segmentation`` fault's mode, else ``mode`` (set for
        a WebSocket connection by a fault at its upgrade), else the configured one."""
        if fault is not None and fault.kind == "segmentation":
            mode = str(fault.params["mode"])
        return Segmenter(mode or self.config.segmentation, self.segment_rng)

    # -- requests and answers -------------------------------------------------------------
    def decode_json(self, request: Request) -> Any:
        return decode_json(request, self._zstd)

    def validate(
        self, body: Any, context: list[Any], account: MockAccount | None = None
    ) -> dict[str, Any]:
        return validate(body, context, account, strict=self.config.strict_encrypted_content)

    def check_turn_state(self, account: MockAccount, request: Request) -> None:
        """A request echoing an ``x-codex-turn-state`` that ``account`` did not issue is
        counted, and refused with ``MockConfig.strict_turn_state`` (``Failure``, 400)."""
        echoed = request.header("x-codex-turn-state")
        if not echoed or echoed in account.turn_states:
            return
        self.stats.foreign_turn_states += 1
        if self.config.strict_turn_state:
            raise invalid_request(
                "x-codex-turn-state was not issued for this account.",
                "invalid_turn_state",
                "x-codex-turn-state",
            )

    def response_headers(
        self, account: MockAccount, request: Request | None, model: str | None = None
    ) -> Headers:
        """An answer's headers: the account's rate limits and an ``x-codex-turn-state`` (the
        request's, when the account issued it; else a new one)."""
        now = self.clock.now()
        headers: Headers = list(account.rate_limit_headers(now).items())
        echoed = request.header("x-codex-turn-state") if request else None
        turn_state = echoed if echoed in account.turn_states else account.issue_turn_state()
        headers += [
            ("x-codex-turn-state", turn_state),
            ("x-models-etag", MODELS_ETAG),
            ("x-reasoning-included", "true"),
            ("x-request-id", plans.new_id("req")),
        ]
        if model:
            headers.append(("openai-model", model))
        return headers

    def plan(
        self, body: dict[str, Any], context: list[Any], account: MockAccount, fault: Fault | None
    ) -> plans.TurnPlan:
        """The events of the answer: the next scripted one, else what ``body`` asks for."""
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
