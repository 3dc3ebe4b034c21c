"""The proxy served by hypercorn's trio worker: TLS, HTTP/2 (ALPN ``h2``) and h2c.

``trioproxy serve --server hypercorn`` runs the same ASGI application as the project's own
server (``web/serving.py``, the default and the faster of the two); hypercorn brings what the
own server does not speak: TLS termination at the proxy (``certfile``, ``keyfile``), HTTP/2
over TLS, and h2c (HTTP/2 in clear text, by prior knowledge or by an ``Upgrade: h2c``).

Theory of operation: :func:`serve_hypercorn` is ``web.serving.serve_asgi``'s counterpart
built from hypercorn's parts: it owns hypercorn's lifespan task and a nursery of connection
tasks fed by ``trio.serve_listeners``, each connection a :class:`GuardedTCPServer`. The
listeners are the caller's (``web.serving.open_listeners``), so the socket options and the
port reported are the same under both servers. hypercorn's own ``worker_serve`` is not used:
it would open its own sockets, name the connection class it builds, and never close its
listeners when it drains.

Guards, where hypercorn's defaults do not fit a proxy:

* ``TCP_USER_TIMEOUT`` on the listening sockets (the caller's; accepted sockets inherit it).
  hypercorn shields every socket write from cancellation, so a client that stops reading
  but keeps its socket open would pin its handler and its upstream stream forever (no
  deadline, not even the drain's, reaches a shielded write); the kernel gives up on such a
  client after ``stalled_client_timeout`` and the write fails.
* An exception escaping one connection is logged and closes that connection only. hypercorn
  lets some out of its connection handler (a WebSocket upgrade whose ``permessage-deflate``
  offer wsproto cannot parse, an h2c upgrade with a malformed ``HTTP2-Settings``), and in
  ``serve_listeners`` one would take every other connection and the listener down with it.
* A connection its client closed before its first request is released at once: hypercorn
  leaves the connection's keep-alive timer running, and the connection's task group, and
  so its socket, waits for it for ``keep_alive_timeout``.
* An HTTP exchange's ``receive()`` that waits past the end of its response is not told
  that the client disconnected when only the exchange ended (:class:`_Exchange`): the app
  would read it as its client leaving, and cancel what its handler still does.
* Limits that fit Codex traffic (:func:`hypercorn_config`): request heads up to 1 MiB,
  WebSocket messages up to ``max_body_bytes``, idle keep-alive connections closed after
  75 s, no read or response timeout (a stream's client is silent while it reads; the
  stalled-client guard and the app's own timers bound it), drain after ``drain_timeout``.

Resource handling: the listeners are closed on the way out, and every connection task has
ended by the time :func:`serve_hypercorn` returns. While the server drains, idle connections
close at once (HTTP/2 ones with a GOAWAY once their streams are done) and busy HTTP/1.1 ones
after their current response; ``graceful_timeout`` later whatever is left is cancelled.

Error handling: a certificate or key that cannot be loaded is a :class:`ConfigError` before
anything listens; an exception in one connection's code closes that connection only.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import wrap_app

from trioproxy.config import ConfigError, Settings
from trioproxy.logs import get_logger
from trioproxy.web.asgi import ASGIApp, Message, Receive, Scope, Send
from trioproxy.web.serving import accept_until

log = get_logger("trioproxy.server")

MAX_HEAD_BYTES = 1024 * 1024  # request line and headers, as the own server takes them
KEEP_ALIVE_TIMEOUT = 75.0  # an idle keep-alive connection, as the own server keeps it
LIFESPAN_TIMEOUT = 30.0  # the app's lifespan startup and shutdown


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """hypercorn's configuration for the proxy (the limits of the module docstring). A
    certificate or key that cannot be loaded is a :class:`ConfigError`."""
    config = HypercornConfig()
    config.accesslog = None  # the request log and the app's log lines say what was served
    config.errorlog = logging.getLogger("hypercorn.error")  # through the structured handler
    config.certfile = settings.certfile or None
    config.keyfile = settings.keyfile or None
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    config.websocket_max_message_size = settings.max_body_bytes
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.read_timeout = None
    config.graceful_timeout = settings.drain_timeout
    config.startup_timeout = LIFESPAN_TIMEOUT
    config.shutdown_timeout = LIFESPAN_TIMEOUT
    config.include_server_header = False  # the own server sends none either
    tls_context(config)  # refuse to start rather than fail at the first connection
    return config


def tls_context(config: HypercornConfig) -> ssl.SSLContext | None:
    """The server's TLS context (ALPN ``h2`` and ``http/1.1``), or None without a
    certificate. A file that cannot be loaded is a :class:`ConfigError`."""
    try:
        return config.create_ssl_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"options certfile/keyfile: cannot load {config.certfile} with {config.keyfile}: {exc}"
        ) from None


class GuardedTCPServer(TCPServer):
    """hypercorn's per-connection server, with the connection guards of the module
    docstring: an exception ends this connection only, and a connection its client closed
    is released at once."""

    async def run(self) -> None:
        try:
            await super().run()
        except Exception:
            # a bug in one connection must never reach the listener (and every other client)
            log.exception("connection handler failed; closing that connection")
            await trio.aclose_forcefully(self.stream)

    async def _read_data(self) -> None:
        await super()._read_data()
        # Nothing more can be read (the client closed, or reading failed): the keep-alive
        # timer would hold the connection's task group, and its socket, for
        # keep_alive_timeout.
        await self.idle_task.stop()


def disconnects_of_the_client(app: ASGIApp) -> ASGIApp:
    """``app``, whose HTTP exchanges see ``http.disconnect`` only for a client that left
    (see :class:`_Exchange`)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        exchange = _Exchange(receive, send)
        await app(scope, exchange.receive, exchange.send)

    return wrapped


@attrs.define(eq=False)
class _Exchange:
    """One HTTP exchange's ``receive``/``send`` between hypercorn and the app.

    hypercorn ends an exchange when its response is complete, and tells a ``receive()``
    that is waiting then that the client disconnected (ASGI allows it: the exchange is
    over). The app reads a disconnect as its client leaving and cancels what its handler
    still does after the last byte (a bridged turn's bookkeeping, then the bridge session's
    upstream socket with it). So a ``receive()`` that was already waiting when the response
    completed does not return that disconnect: it waits until the handler is done with it,
    as under the own server, where only the client's leaving ends such a wait. A
    ``receive()`` called after the response still gets the disconnect at once."""

    _receive: Receive
    _send: Send
    complete: bool = False  # the app sent the last byte of its response

    async def receive(self) -> Message:
        waiting_since_before = not self.complete
        message = await self._receive()
        if message["type"] == "http.disconnect" and self.complete and waiting_since_before:
            await trio.sleep_forever()  # the handler cancels its wait when it is done
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True  # before the send: hypercorn ends the exchange inside it
        await self._send(message)


async def serve_hypercorn(
    app: ASGIApp,
    config: HypercornConfig,
    listeners: list[trio.SocketListener],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn on ``listeners`` (over TLS when ``config`` has a
    certificate) until ``shutdown_trigger`` returns, then drain: stop accepting, close idle
    connections, give busy ones ``config.graceful_timeout``. Reports the bound addresses
    once the app's lifespan startup is done.

    Resource handling: the listeners are closed on the way out, and every connection task
    has ended by the time this returns."""
    try:
        context_tls = tls_context(config)
        # hypercorn types ASGI messages as TypedDicts; the app takes plain mappings
        wrapped = wrap_app(disconnects_of_the_client(app), config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        lifespan_state: LifespanState = {}
        lifespan = Lifespan(wrapped, config, lifespan_state)
        worker = WorkerContext(None)
        accepted: list[trio.abc.Listener[Any]] = (
            [trio.SSLListener(x, context_tls, https_compatible=True) for x in listeners]
            if context_tls is not None
            else list(listeners)
        )
        handler = partial(
            GuardedTCPServer, wrapped, config, worker, ConnectionState(lifespan_state.copy())
        )
        async with trio.open_nursery() as outer:
            await outer.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as connections:
                await accept_until(
                    handler, accepted, listeners, connections, shutdown_trigger, task_status
                )
                # idle keep-alive connections close now, busy ones after their response
                await worker.terminated.set()
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
            with trio.CancelScope(shield=True):  # bounded by config.shutdown_timeout
                await lifespan.wait_for_shutdown()
            outer.cancel_scope.cancel(reason="server stopped")
    finally:
        for listener in listeners:
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await trio.aclose_forcefully(listener)
