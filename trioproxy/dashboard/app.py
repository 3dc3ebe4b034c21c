"""The dashboard mounted on the management app: ``/dashboard`` pages, sign-in and sign-out,
the live page's event stream and the static files.

Every page and fragment needs a session (a page without one redirects to the sign-in page,
a fragment or the event stream answers 401); a form that changes something needs the
session's CSRF token too (``auth.py``). The sign-in page and ``/dashboard/static/`` (the
stylesheet, the scripts and their licences) are open. Pages are never cached (a new key's
secret is on one), nothing may be framed, and scripts come from this origin only
(``Content-Security-Policy``).

What the pages show comes from the management API, called in process (``api.py``); the
pages themselves are in ``pages.py``.
"""

from __future__ import annotations

import functools
from typing import Any

from quart import Blueprint, Response, redirect, render_template, request
from quart_trio import QuartTrio

from trioproxy import __version__
from trioproxy.app.edge import client_of
from trioproxy.dashboard import pages
from trioproxy.dashboard.api import APIError
from trioproxy.dashboard.auth import COOKIE, DashboardAuth, SignInFailed, SignInThrottled
from trioproxy.dashboard.events import SnapshotStream
from trioproxy.dashboard.guard import PREFIX, Answer, Guard, Page
from trioproxy.dashboard.views import FILTERS
from trioproxy.protocol.errors import ProxyError
from trioproxy.sessions.context import ProxyContext

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)


def is_dashboard_path(path: str) -> bool:
    """Whether the dashboard answers ``path`` (it checks its session itself)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard path only (no other site)."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//"):
        return target
    return f"{PREFIX}/pool"


def dashboard_routes(app: QuartTrio, ctx: ProxyContext) -> DashboardAuth:
    """Mount the dashboard on the management ``app``; the returned :class:`DashboardAuth`
    tells the management API which requests carry a dashboard session."""
    auth = DashboardAuth(ctx.store)
    guard = Guard(app, auth)
    blueprint = Blueprint(
        "dashboard",
        __name__,
        url_prefix=PREFIX,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    app.jinja_env.filters.update(FILTERS)

    @blueprint.context_processor
    async def page_context() -> dict[str, Any]:
        return {"version": __version__, "prefix": PREFIX}

    @blueprint.after_request
    async def headers(response: Response) -> Response:
        response.headers["content-security-policy"] = CONTENT_SECURITY_POLICY
        response.headers["x-frame-options"] = "DENY"
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["referrer-policy"] = "same-origin"
        if not request.path.startswith(f"{PREFIX}/static/"):
            response.headers["cache-control"] = "no-store"
        return response

    @blueprint.errorhandler(APIError)
    async def api_refused(exc: APIError) -> Answer:
        """The management API refused a page's read (the session ended meanwhile, a store
        error): say so rather than fail."""
        if exc.answer.status == 401:
            return redirect(f"{PREFIX}/login", 303)
        error = ProxyError.of(
            502, f"The management API answered {exc.answer.status}: {exc}", "dashboard_api_error"
        )
        return error.body, 502

    @blueprint.get("")
    @blueprint.get("/")
    @guard.page
    async def home(page: Page) -> Answer:
        return redirect(f"{PREFIX}/pool", 303)

    @blueprint.get("/login")
    async def login_form() -> Answer:
        session = await auth.request_session(request)
        if session is not None:
            return redirect(_safe_next(request.args.get("next")), 303)
        return await render_template(
            "dashboard/login.html", next=_safe_next(request.args.get("next")), error=None
        )

    @blueprint.post("/login")
    async def login() -> Answer:
        form = await request.form
        name = (form.get("name") or "").strip()
        password = form.get("password") or ""
        target = _safe_next(form.get("next"))
        address, _ = client_of(request.scope)  # type: ignore[arg-type]
        try:
            token, _ = await auth.sign_in(name, password, address)
        except SignInThrottled as exc:
            seconds = max(1, int(exc.retry_after + 0.999))
            page = await render_template(
                "dashboard/login.html",
                next=target,
                error=f"Too many failed sign-ins; try again in {seconds} s.",
            )
            return page, 429, {"retry-after": str(seconds)}
        except SignInFailed:
            page = await render_template(
                "dashboard/login.html", next=target, error="Wrong name or password."
            )
            return page, 401
        response = redirect(target, 303)
        auth.set_cookie(response, token, secure=request.scheme == "https")
        return response

    @blueprint.post("/logout")
    @guard.action
    async def logout(page: Page) -> Answer:
        auth.sessions.close(request.cookies.get(COOKIE))
        response = redirect(f"{PREFIX}/login", 303)
        auth.clear_cookie(response, secure=request.scheme == "https")
        return response

    @blueprint.get("/events")
    @guard.fragment
    async def events(page: Page) -> Answer:
        token = request.cookies.get(COOKIE)

        async def still_valid() -> bool:
            return await auth.session(token) is not None

        stream = SnapshotStream(
            functools.partial(pages.live_panel, app, page.api),
            still_valid,
            ctx.drain_started,
        )
        response = Response(stream, mimetype="text/event-stream")
        response.headers["x-accel-buffering"] = "no"
        response.timeout = None
        return response

    pages.register(blueprint, guard)
    app.register_blueprint(blueprint)

    @app.before_serving
    async def first_admin() -> None:
        app.add_background_task(auth.ensure_first_admin)

    return auth
