"""The model registry: which models each plan serves, from ``GET {UPSTREAM}/codex/models``.

Theory of operation
-------------------
For every plan among the accounts in rotation, :meth:`ModelRegistry.refresh` fetches the model
list with the token of one account of that plan. A successful answer becomes the plan's
*authoritative* entry; a failed one leaves the previous entry (or none) in place, so the
registry may be partial: some plans known, others not. :meth:`ModelRegistry.run` (in the app
nursery) refreshes every ``interval`` seconds (sooner while a plan has no list), and
:meth:`ModelRegistry.ensure` refreshes on demand when a client asks for the models and the
lists are missing or stale.

Clients read the registry through ``GET /backend-api/codex/models`` (every model any plan in
the pool serves, in priority order; the built-in :data:`FALLBACK_MODELS` while no plan is
known) and ``GET /v1/models``.

Routing reads :meth:`ModelRegistry.plans_for`: the plans that serve a model, or None (do not
filter) when no authoritative entry names the model. Plans without an entry are always
allowed (they might serve it). Each refresh bumps ``version`` and tells the pool to drop the
plan filters it cached from the old lists.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import httpx
import trio

from trioproxy.accounts.pool import Account, Pool
from trioproxy.accounts.refresh import RefreshError, TokenManager
from trioproxy.logs import get_logger

log = get_logger("trioproxy.registry")

#: ``client_version`` sent with ``GET /codex/models`` (upstream filters models by it).
MODELS_CLIENT_VERSION = "0.169.0"


def _fallback(slug: str, display: str, priority: int) -> dict[str, Any]:
    levels = [
        {"effort": e, "description": d}
        for e, d in (
            ("low", "Fast responses with lighter reasoning"),
            ("medium", "Balances speed and reasoning depth for everyday tasks"),
            ("high", "Greater reasoning depth for complex problems"),
        )
    ]
    return {
        "slug": slug,
        "display_name": display,
        "description": f"{display} (trioproxy built-in entry; upstream's list was not fetched yet).",
        "default_reasoning_level": "medium",
        "supported_reasoning_levels": levels,
        "shell_type": "unified_exec",
        "visibility": "list",
        "supported_in_api": True,
        "priority": priority,
        "support_verbosity": True,
        "default_verbosity": "low",
        "truncation_policy": {"mode": "tokens", "limit": 10000},
        "experimental_supported_tools": [],
        "context_window": 272000,
        "input_modalities": ["text", "image"],
        "base_instructions": "You are Codex, a coding agent.",
    }


#: Served while no plan's list has been fetched (every field the Codex CLI requires).
FALLBACK_MODELS: tuple[dict[str, Any], ...] = (
    _fallback("gpt-5.5", "GPT-5.5", 1),
    _fallback("gpt-5.5-mini", "GPT-5.5 mini", 2),
)


class ModelSource(Protocol):
    async def fetch(self, account: Account) -> tuple[int, Any, str | None]: ...


@attrs.define(eq=False)
class HttpModelSource:
    tokens: TokenManager
    http: httpx.AsyncClient
    upstream: str
    timeout: float = 30.0

    async def fetch(self, account: Account) -> tuple[int, Any, str | None]:
        token = await self.tokens.token_for(account)
        response = await self.http.get(
            f"{self.upstream}/codex/models",
            params={"client_version": MODELS_CLIENT_VERSION},
            headers={"authorization": f"Bearer {token}", "chatgpt-account-id": account.account_id},
            timeout=self.timeout,
        )
        try:
            body = response.json()
        except ValueError:
            body = None
        return response.status_code, body, response.headers.get("x-models-etag")


@attrs.frozen
class PlanModels:
    plan: str
    models: tuple[dict[str, Any], ...]
    etag: str | None
    fetched_at: float
    account_id: str

    def slugs(self) -> frozenset[str]:
        return frozenset(str(m.get("slug")) for m in self.models)


@attrs.define(eq=False)
class ModelRegistry:
    pool: Pool
    source: ModelSource
    interval: float = 900.0
    retry_missing: float = 60.0  # sooner while a plan in rotation has no list
    entries: dict[str, PlanModels] = attrs.field(factory=dict)
    version: int = 0
    last_errors: dict[str, str] = attrs.field(factory=dict)
    #: hands the lists to the other replicas after a refresh (set by the quota services)
    publish: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _last_attempt: float | None = None

    # -- reads ------------------------------------------------------------------------------
    def plans_for(self, model: str) -> frozenset[str] | None:
        holders = {plan for plan, entry in self.entries.items() if model in entry.slugs()}
        if not holders:
            return None  # unknown to every authoritative list: do not filter
        unknown = {a.plan for a in self.pool.in_rotation() if a.plan and a.plan not in self.entries}
        return frozenset(holders | unknown)

    def models(self) -> list[dict[str, Any]]:
        """Every model some plan in the registry serves (fallback list if none is known)."""
        if not self.entries:
            return [copy.deepcopy(m) for m in FALLBACK_MODELS]
        merged: dict[str, dict[str, Any]] = {}
        for plan in sorted(self.entries):
            for model in self.entries[plan].models:
                merged.setdefault(str(model.get("slug")), model)
        ordered = sorted(merged.values(), key=lambda m: (_priority(m), str(m.get("slug"))))
        return [copy.deepcopy(m) for m in ordered]

    def etag(self) -> str:
        tags = {e.etag for e in self.entries.values()}
        if len(tags) == 1 and None not in tags:
            return str(tags.pop())
        digest = hashlib.sha256(
            json.dumps(self.models(), sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:16]
        return f'"trioproxy-{digest}"'

    def view(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": "upstream" if self.entries else "fallback",
            "plans": {
                plan: {
                    "models": sorted(entry.slugs()),
                    "fetched_at": entry.fetched_at,
                    "from_account": entry.account_id,
                    "etag": entry.etag,
                }
                for plan, entry in sorted(self.entries.items())
            },
            "errors": dict(self.last_errors),
        }

    # -- refresh ----------------------------------------------------------------------------
    def missing_plans(self) -> set[str]:
        return {a.plan for a in self.pool.in_rotation() if a.plan and a.plan not in self.entries}

    async def refresh(self) -> None:
        """Fetch the list of every plan in rotation (one account per plan)."""
        self._last_attempt = trio.current_time()
        by_plan: dict[str, list[Account]] = {}
        for account in self.pool.in_rotation():
            if account.plan:
                by_plan.setdefault(account.plan, []).append(account)
        changed = False
        for plan, accounts in sorted(by_plan.items()):
            for account in accounts[:2]:  # a second account if the first cannot answer
                entry = await self._fetch(plan, account)
                if entry is not None:
                    changed = changed or self.entries.get(plan) != entry
                    self.entries[plan] = entry
                    self.last_errors.pop(plan, None)
                    break
        self.version += 1
        self.pool.invalidate_models()
        if changed:
            log.info("model registry refreshed", plans=sorted(self.entries), version=self.version)
        if self.publish is not None and self.entries:
            try:
                await self.publish(self.export())
            except Exception:
                log.exception("sharing the model lists failed")

    # -- sharing between replicas -----------------------------------------------------------
    def export(self) -> dict[str, Any]:
        """The lists, as JSON (what :meth:`absorb` takes)."""
        return {plan: attrs.asdict(entry) for plan, entry in self.entries.items()}

    def absorb(self, shared: Any) -> None:
        """Take the lists another replica fetched (its newer entries replace this one's);
        they count as a refresh, so this process does not fetch them again on demand."""
        if not isinstance(shared, dict):
            return
        changed = False
        for plan, data in shared.items():
            try:
                entry = PlanModels(
                    str(plan),
                    tuple(m for m in data["models"] if isinstance(m, dict)),
                    data.get("etag"),
                    float(data["fetched_at"]),
                    str(data["account_id"]),
                )
            except (KeyError, TypeError, ValueError):
                continue
            current = self.entries.get(entry.plan)
            if current is None or current.fetched_at < entry.fetched_at:
                self.entries[entry.plan] = entry
                changed = True
        if changed:
            self._last_attempt = trio.current_time()
            self.version += 1
            self.pool.invalidate_models()

    async def _fetch(self, plan: str, account: Account) -> PlanModels | None:
        try:
            status, body, etag = await self.source.fetch(account)
        except (RefreshError, httpx.HTTPError) as exc:
            self.last_errors[plan] = f"{type(exc).__name__}"
            return None
        models = body.get("models") if isinstance(body, dict) else None
        if status != 200 or not isinstance(models, list):
            self.last_errors[plan] = f"status {status}"
            return None
        return PlanModels(
            plan,
            tuple(m for m in models if isinstance(m, dict) and isinstance(m.get("slug"), str)),
            etag,
            self.pool.clock.now(),
            account.account_id,
        )

    async def ensure(self) -> None:
        """Refresh first if a plan in rotation has no list yet (at most every
        ``retry_missing`` seconds) or the lists are older than ``interval``: clients asking
        for models get upstream's lists, not the fallback, as soon as an account can fetch."""
        now = trio.current_time()
        stale = self._last_attempt is None or now - self._last_attempt >= self.interval
        retry = self._last_attempt is None or now - self._last_attempt >= self.retry_missing
        if stale or (retry and self.missing_plans()):
            async with self._lock:
                if self._last_attempt is None or trio.current_time() - self._last_attempt >= min(
                    self.interval, self.retry_missing
                ):
                    await self.refresh()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh every ``interval`` seconds, sooner (``retry_missing``) while a plan in
        rotation has no list; the first refresh happens on demand (:meth:`ensure`) or after
        the first pause."""
        task_status.started()
        while True:
            pause = (
                min(self.interval, self.retry_missing) if self.missing_plans() else self.interval
            )
            await trio.sleep(pause)
            try:
                async with self._lock:
                    await self.refresh()
            except Exception:
                log.exception("model registry refresh failed")


def _priority(model: dict[str, Any]) -> float:
    value = model.get("priority")
    return float(value) if isinstance(value, int | float) else float("inf")
