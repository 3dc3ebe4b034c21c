"""The dashboard's pages, each made from management API answers (``api.py``):

=========  ====================================================================================
Pool       ``GET /api/accounts`` (accounts, their quota, the pool and its routing strategy),
           the last hour of ``GET /api/usage`` by account; the table refreshes itself every 2 s
Accounts   the accounts with sign-in again, pause and resume
           (``POST /api/accounts/ID/pause|resume``) and remove (``DELETE /api/accounts/ID``);
           new ones by device or browser login (``/api/logins``) or an auth.json
           (``POST /api/accounts``)
Keys       ``/api/keys``: create (the secret and the Codex CLI configuration shown once),
           change, disable, enable, rotate, revoke; each key's budgets as the server counts them
Live       ``GET /api/admission`` and ``GET /api/stats`` as server-sent events (``events.py``)
Usage      ``GET /api/usage`` by key, account or model, by hour or day: charts and tables
Requests   ``GET /api/requests`` with its filters; each request's routing as sentences
Alerts     ``GET /api/alerts``: the recent alerts with their delivery, and the counts
=========  ====================================================================================

A change is a form posted to the dashboard, passed on to the API with the session's CSRF
token; what the API says (its error message when it refuses) is shown on the next page.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import segno
from quart import Blueprint, redirect, render_template, request
from quart_trio import QuartTrio

from trioproxy.dashboard.api import ManagementAPI
from trioproxy.dashboard.forms import budget_lines, key_body
from trioproxy.dashboard.guard import PREFIX, Answer, Guard, Page
from trioproxy.dashboard.views import (
    METRICS,
    account_rows,
    decision_summary,
    decision_text,
    pool_windows,
    usage_charts,
)
from trioproxy.keys.options import format_budget_spec
from trioproxy.keys.policy import EFFORTS

RANGES = {"24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days"}
GROUPS = ("key", "account", "model")
REQUEST_FILTERS = ("status", "key", "account", "model", "route", "since", "until")
ENV_KEY = "TRIOPROXY_API_KEY"
FINAL_LOGIN_STATES = ("succeeded", "failed", "expired", "cancelled")
DELIVERY_LABELS = {
    "pending": "pending",
    "delivered": "delivered",
    "failed": "failed",
    "dropped": "dropped (queue full)",
    "not_sent": "not sent (no webhook)",
}


async def _render(name: str, page: Page, **values: Any) -> str:
    values.setdefault("now", time.time())
    return await render_template(
        f"dashboard/{name}",
        csrf_token=page.session.csrf_token,
        admin=page.session.name,
        notices=page.session.take_notices(),
        path=request.path,
        **values,
    )


def _back(page: Page, where: str, answer_ok: bool, ok: str, error: str) -> Answer:
    page.notice("ok" if answer_ok else "error", ok if answer_ok else error)
    return redirect(where, 303)


def proxy_root() -> str:
    """The proxy's address as the browser reached it (for the Codex CLI configuration)."""
    return f"{request.scheme}://{request.host}"


def codex_config(root: str) -> str:
    """The Codex CLI's ``~/.codex/config.toml`` lines that use this proxy with a key in
    :data:`ENV_KEY`."""
    return (
        'model_provider = "trioproxy"\n'
        "\n"
        "[model_providers.trioproxy]\n"
        'name = "trioproxy"\n'
        f'base_url = "{root}/backend-api/codex"\n'
        'wire_api = "responses"\n'
        "supports_websockets = true\n"
        f'env_key = "{ENV_KEY}"'
    )


def script_json(value: object) -> str:
    """``value`` as JSON to put inside a ``<script type="application/json">``: ``<``, ``>``
    and ``&`` escaped, so no text in it (a model name is what a client sent) can end the
    element."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- pool -------------------------------------------------------------------------------------
async def _pool_values(api: ManagementAPI) -> dict[str, Any]:
    accounts = await api.get_json("/api/accounts")
    usage = await api.get_json(
        "/api/usage", {"since": "1h", "group_by": "account", "bucket": "total"}
    )
    pool = accounts.get("pool") or {}
    rows = account_rows(accounts.get("accounts", []), usage.get("rows", []))
    return {
        "rows": rows,
        "pool": pool,
        "pool_windows": pool_windows(pool),
        "now": accounts.get("now") or time.time(),
        "strategy": pool.get("routing_strategy"),
        "counts": {
            state: sum(1 for r in rows if r.state == state)
            for state in ("active", "exhausted", "reauth_required", "deactivated", "paused")
        },
        "usage_totals": usage.get("totals") or {},
    }


# -- live -------------------------------------------------------------------------------------
async def live_panel(app: QuartTrio, api: ManagementAPI) -> str:
    """The live page's panel (also each server-sent snapshot)."""
    admission = await api.get_json("/api/admission")
    stats = await api.get_json("/api/stats")
    template = app.jinja_env.get_template("dashboard/live_panel.html")
    return await template.render_async(
        admission=admission, stats=stats, at=time.time(), prefix=PREFIX
    )


def register(blueprint: Blueprint, guard: Guard) -> None:
    """Add the pages to the dashboard's blueprint."""
    _pool_pages(blueprint, guard)
    _account_pages(blueprint, guard)
    _key_pages(blueprint, guard)
    _report_pages(blueprint, guard)


def _pool_pages(blueprint: Blueprint, guard: Guard) -> None:
    @blueprint.get("/pool")
    @guard.page
    async def pool(page: Page) -> Answer:
        return await _render("pool.html", page, title="Pool", **await _pool_values(page.api))

    @blueprint.get("/pool/table")
    @guard.fragment
    async def pool_table(page: Page) -> Answer:
        return await render_template("dashboard/pool_table.html", **await _pool_values(page.api))

    @blueprint.get("/live")
    @guard.page
    async def live(page: Page) -> Answer:
        panel = await live_panel(guard.app, page.api)
        return await _render("live.html", page, title="Live", panel=panel)

    @blueprint.get("/alerts")
    @guard.page
    async def alerts(page: Page) -> Answer:
        state = await page.api.get_json("/api/alerts")
        return await _render(
            "alerts.html", page, title="Alerts", alerts=state, delivery_labels=DELIVERY_LABELS
        )


# -- accounts ---------------------------------------------------------------------------------
def _account_pages(blueprint: Blueprint, guard: Guard) -> None:
    @blueprint.get("/accounts")
    @guard.page
    async def accounts(page: Page) -> Answer:
        listing = await page.api.get_json("/api/accounts")
        rows = account_rows(listing.get("accounts", []), [])
        return await _render(
            "accounts.html", page, title="Accounts", rows=rows, now=listing.get("now")
        )

    @blueprint.post("/accounts/logins")
    @guard.action
    async def start_login(page: Page) -> Answer:
        flow = (await request.form).get("flow", "device")
        answer = await page.api.call("POST", "/api/logins", body={"flow": flow})
        if not answer.ok:
            return _back(page, f"{PREFIX}/accounts", False, "", f"Login: {answer.error()}")
        return redirect(f"{PREFIX}/accounts/logins/{answer.json()['id']}", 303)

    async def login_values(page: Page, login_id: str) -> dict[str, Any] | None:
        answer = await page.api.get(f"/api/logins/{login_id}")
        if not answer.ok:
            return None
        login = answer.json()
        qr = None
        if login.get("verification_url") and login.get("status") == "pending":
            qr = segno.make(login["verification_url"], error="m").svg_data_uri(
                scale=4, dark="#000", light="#fff"
            )
        return {
            "login": login,
            "qr": qr,
            "final": login.get("status") in FINAL_LOGIN_STATES,
            "now": time.time(),
        }

    @blueprint.get("/accounts/logins/<login_id>")
    @guard.page
    async def login_page(page: Page, login_id: str) -> Answer:
        values = await login_values(page, login_id)
        if values is None:
            return _back(
                page,
                f"{PREFIX}/accounts",
                False,
                "",
                "That login is gone (finished logins are kept 10 minutes).",
            )
        return await _render("login_flow.html", page, title="Add an account", **values)

    @blueprint.get("/accounts/logins/<login_id>/status")
    @guard.fragment
    async def login_status(page: Page, login_id: str) -> Answer:
        values = await login_values(page, login_id)
        if values is None:
            return "<p>That login is gone.</p>", 200
        return await render_template(
            "dashboard/login_status.html", csrf_token=page.session.csrf_token, **values
        )

    @blueprint.post("/accounts/logins/<login_id>/complete")
    @guard.action
    async def complete_login(page: Page, login_id: str) -> Answer:
        url = ((await request.form).get("redirect_url") or "").strip()
        answer = await page.api.call(
            "POST", f"/api/logins/{login_id}/complete", body={"redirect_url": url}
        )
        if not answer.ok:
            page.notice("error", answer.error())
        return redirect(f"{PREFIX}/accounts/logins/{login_id}", 303)

    @blueprint.post("/accounts/logins/<login_id>/cancel")
    @guard.action
    async def cancel_login(page: Page, login_id: str) -> Answer:
        answer = await page.api.call("DELETE", f"/api/logins/{login_id}")
        return _back(page, f"{PREFIX}/accounts", answer.ok, "Login cancelled.", answer.error())

    @blueprint.post("/accounts/import")
    @guard.action
    async def import_account(page: Page) -> Answer:
        files = await request.files
        upload = files.get("auth_file")
        text = ""
        if upload is not None and upload.filename:
            text = upload.read().decode("utf-8", "replace")
        text = text or (await request.form).get("auth_json", "")
        try:
            data = json.loads(text)
        except ValueError:
            return _back(
                page,
                f"{PREFIX}/accounts",
                False,
                "",
                "That is not JSON: choose a Codex auth.json file or paste its text.",
            )
        answer = await page.api.call("POST", "/api/accounts", body=data)
        if not answer.ok:
            return _back(page, f"{PREFIX}/accounts", False, "", answer.error())
        done = [
            f"{'imported' if a.get('created') else 'updated'} {a.get('account_id')} ({a.get('email') or 'no email'})"
            for a in answer.json().get("accounts", [])
        ]
        return _back(page, f"{PREFIX}/accounts", True, "; ".join(done) or "Nothing imported.", "")

    async def pause_or_resume(page: Page, account_id: str, verb: str) -> Answer:
        answer = await page.api.call("POST", f"/api/accounts/{account_id}/{verb}")
        if not answer.ok:
            return _back(page, f"{PREFIX}/accounts", False, "", answer.error())
        body = answer.json()
        state = (body.get("account") or {}).get("state")
        done = f"{'Paused' if verb == 'pause' else 'Resumed'} account {account_id}."
        return _back(
            page,
            f"{PREFIX}/accounts",
            True,
            done if body.get("changed") else f"Account {account_id} is {state}.",
            "",
        )

    @blueprint.post("/accounts/<account_id>/pause")
    @guard.action
    async def pause_account(page: Page, account_id: str) -> Answer:
        return await pause_or_resume(page, account_id, "pause")

    @blueprint.post("/accounts/<account_id>/resume")
    @guard.action
    async def resume_account(page: Page, account_id: str) -> Answer:
        return await pause_or_resume(page, account_id, "resume")

    @blueprint.post("/accounts/<account_id>/remove")
    @guard.action
    async def remove_account(page: Page, account_id: str) -> Answer:
        answer = await page.api.call("DELETE", f"/api/accounts/{account_id}")
        return _back(
            page, f"{PREFIX}/accounts", answer.ok, f"Removed account {account_id}.", answer.error()
        )


# -- keys -------------------------------------------------------------------------------------
def _key_pages(blueprint: Blueprint, guard: Guard) -> None:
    async def account_ids(api: ManagementAPI) -> list[str]:
        listing = await api.get_json("/api/accounts")
        return [str(a["account_id"]) for a in listing.get("accounts", [])]

    async def form_accounts() -> list[str]:
        return [a for a in (await request.form).getlist("accounts") if a]

    @blueprint.get("/keys")
    @guard.page
    async def keys(page: Page) -> Answer:
        listing = await page.api.get_json("/api/keys")
        return await _render(
            "keys.html",
            page,
            title="Keys",
            keys=listing.get("keys", []),
            accounts=await account_ids(page.api),
            efforts=EFFORTS,
            form={},
        )

    async def show_secret(page: Page, view: dict[str, Any], secret: str, verb: str) -> Answer:
        root = proxy_root()
        return await _render(
            "key_secret.html",
            page,
            title=f"Key {verb}",
            key=view,
            secret=secret,
            verb=verb,
            config=codex_config(root),
            env_key=ENV_KEY,
        )

    @blueprint.post("/keys")
    @guard.action
    async def create_key(page: Page) -> Answer:
        form = await request.form
        body = key_body(form, await form_accounts(), creating=True)
        answer = await page.api.call("POST", "/api/keys", body=body)
        if not answer.ok:
            listing = await page.api.get_json("/api/keys")
            page.notice("error", answer.error())
            return await _render(
                "keys.html",
                page,
                title="Keys",
                keys=listing.get("keys", []),
                accounts=await account_ids(page.api),
                efforts=EFFORTS,
                form=form,
            ), 400
        created = answer.json()
        return await show_secret(page, created["key"], created["secret"], "created")

    @blueprint.get("/keys/<key_id>")
    @guard.page
    async def key_page(page: Page, key_id: str) -> Answer:
        answer = await page.api.get(f"/api/keys/{key_id}")
        if not answer.ok:
            return _back(page, f"{PREFIX}/keys", False, "", answer.error())
        view = answer.json()
        policy = view.get("policy") or {}
        return await _render(
            "key.html",
            page,
            title=f"Key {view['name']}",
            key=view,
            accounts=await account_ids(page.api),
            efforts=EFFORTS,
            models_text=", ".join(policy.get("models") or ()),
            budgets_text=budget_lines(policy, format_budget_spec),
            expires_text=_iso(view.get("expires_at")),
        )

    @blueprint.post("/keys/<key_id>")
    @guard.action
    async def change_key(page: Page, key_id: str) -> Answer:
        form = await request.form
        body = key_body(form, await form_accounts(), creating=False)
        answer = await page.api.call("PATCH", f"/api/keys/{key_id}", body=body)
        return _back(page, f"{PREFIX}/keys/{key_id}", answer.ok, "Key changed.", answer.error())

    @blueprint.post("/keys/<key_id>/<verb>")
    @guard.action
    async def key_action(page: Page, key_id: str, verb: str) -> Answer:
        if verb == "revoke":
            answer = await page.api.call("DELETE", f"/api/keys/{key_id}")
            return _back(
                page,
                f"{PREFIX}/keys/{key_id}",
                answer.ok,
                "Key revoked: requests with it are refused from now on.",
                answer.error(),
            )
        if verb not in ("disable", "enable", "rotate"):
            return _back(page, f"{PREFIX}/keys/{key_id}", False, "", f"Unknown action {verb!r}.")
        answer = await page.api.call("POST", f"/api/keys/{key_id}/{verb}")
        if verb == "rotate" and answer.ok:
            rotated = answer.json()
            return await show_secret(page, rotated["key"], rotated["secret"], "rotated")
        return _back(page, f"{PREFIX}/keys/{key_id}", answer.ok, f"Key {verb}d.", answer.error())


# -- usage, requests --------------------------------------------------------------------------
def _report_pages(blueprint: Blueprint, guard: Guard) -> None:
    @blueprint.get("/usage")
    @guard.page
    async def usage(page: Page) -> Answer:
        since = request.args.get("range", "24h")
        since = since if since in RANGES else "24h"
        bucket = request.args.get("bucket", "hour" if since == "24h" else "day")
        bucket = bucket if bucket in ("hour", "day") else "hour"
        group = request.args.get("group", "key")
        group = group if group in GROUPS else "key"
        params = {"since": since, "bucket": bucket, "group_by": group}
        report = await page.api.get_json("/api/usage", params)
        names: dict[str, str] = {}
        if group == "key":
            listing = await page.api.get_json("/api/keys")
            names = {k["key_id"]: k["name"] for k in listing.get("keys", [])}
        elif group == "account":
            listing = await page.api.get_json("/api/accounts")
            names = {
                a["account_id"]: a["email"] for a in listing.get("accounts", []) if a.get("email")
            }
        now = time.time()
        charts = usage_charts(
            report.get("rows", []), group, bucket, report.get("since") or now - 86400, now, names
        )
        chart_data = script_json({"bucket": bucket, "charts": [c.as_json() for c in charts]})
        return await _render(
            "usage.html",
            page,
            title="Usage",
            charts=charts,
            metrics={m: fmt for m, _, fmt in METRICS},
            chart_data=chart_data,
            totals=report.get("totals") or {},
            params=params,
            range_=since,
            ranges=RANGES,
            groups=GROUPS,
            csv_params={**params, "format": "csv"},
        )

    @blueprint.get("/requests")
    @guard.page
    async def requests(page: Page) -> Answer:
        filters = {name: request.args.get(name, "").strip() for name in REQUEST_FILTERS}
        params: dict[str, object] = {k: v for k, v in filters.items() if v}
        before = request.args.get("before", "").strip()
        if before:
            params["before"] = before
        params["limit"] = 50
        answer = await page.api.get("/api/requests", params)
        records: list[dict[str, Any]] = []
        if answer.ok:
            records = answer.json().get("requests", [])
        else:
            page.notice("error", answer.error())
        for record in records:
            record["decision_text"] = decision_text(record.get("decision"))
            record["decision_summary"] = decision_summary(record.get("decision"))
        older = None
        if len(records) == 50:
            older = {**{k: v for k, v in filters.items() if v}, "before": records[-1]["id"]}
        return await _render(
            "requests.html",
            page,
            title="Requests",
            records=records,
            filters=filters,
            older=older,
        )
