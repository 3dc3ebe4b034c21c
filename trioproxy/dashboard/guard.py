"""Who reaches a dashboard handler: decorators that give it the signed-in session and the
management API on its behalf (:class:`Page`), or refuse the request.

A page without a session redirects to the sign-in page; a fragment (fetched by a script)
answers 401; an action (a form that changes something) needs the session and its CSRF
token (the form's field, or the header scripts send), else 401 / 403.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import quote

import attrs
from quart import Response, redirect, request
from quart_trio import QuartTrio
from werkzeug.wrappers.response import Response as WerkzeugResponse

from trioproxy.dashboard.api import ManagementAPI
from trioproxy.dashboard.auth import CSRF_FIELD, CSRF_HEADER, DashboardAuth
from trioproxy.dashboard.sessions import Session
from trioproxy.protocol.errors import ProxyError
from trioproxy.web.asgi import Scope

PREFIX = "/dashboard"
Answer = Response | WerkzeugResponse | str | tuple[Any, ...]


@attrs.define(eq=False)
class Page:
    """What a page handler gets: the signed-in session and the management API on its
    behalf."""

    session: Session
    api: ManagementAPI

    def notice(self, kind: str, text: str) -> None:
        """A message for the next page shown (``ok`` or ``error``)."""
        self.session.notices.append((kind, text))


PageHandler = Callable[..., Awaitable[Answer]]


@attrs.define(eq=False)
class Guard:
    """Decorators that give handlers their :class:`Page`, or refuse the request."""

    app: QuartTrio
    auth: DashboardAuth

    async def _page(self) -> Page | None:
        session = await self.auth.request_session(request)
        if session is None:
            return None
        scope = cast(Scope, request.scope)
        return Page(session, ManagementAPI(self.app, scope, session.csrf_token))

    def page(self, handler: PageHandler) -> Callable[..., Awaitable[Answer]]:
        """A page: without a session, a redirect to the sign-in page."""

        @functools.wraps(handler)
        async def guarded(**kwargs: Any) -> Answer:
            page = await self._page()
            if page is None:
                target = request.full_path.rstrip("?")
                return redirect(f"{PREFIX}/login?next={quote(target)}", 303)
            return await handler(page, **kwargs)

        return guarded

    def fragment(self, handler: PageHandler) -> Callable[..., Awaitable[Answer]]:
        """A part of a page fetched by a script: without a session, 401."""

        @functools.wraps(handler)
        async def guarded(**kwargs: Any) -> Answer:
            page = await self._page()
            if page is None:
                return _unauthorized()
            return await handler(page, **kwargs)

        return guarded

    def action(self, handler: PageHandler) -> Callable[..., Awaitable[Answer]]:
        """A form that changes something: a session and its CSRF token (the form's
        field, or the header scripts send), else 401 / 403."""

        @functools.wraps(handler)
        async def guarded(**kwargs: Any) -> Answer:
            page = await self._page()
            if page is None:
                return _unauthorized()
            form = await request.form
            presented = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
            if not page.session.csrf_matches(presented):
                error = ProxyError.of(
                    403,
                    "The form's CSRF token is missing or wrong; reload the page.",
                    "csrf_token_invalid",
                )
                return error.body, 403
            return await handler(page, **kwargs)

        return guarded


def _unauthorized() -> tuple[dict[str, Any], int]:
    error = ProxyError.of(401, "Sign in to the dashboard first.", "dashboard_login_required")
    return error.body, 401
