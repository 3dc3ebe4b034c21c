"""trioproxy's HTTP/1.1 and WebSocket server: the listening side and the server's state.

Why not hypercorn (docs/performance.md, section 4): the proxy runs on one trio thread, and
time to first byte under load is set by the CPU a request takes on its way and by how long
each wake-up waits behind every other stream's relay work. hypercorn spends both generously:
a task spawned per request, a queue between the connection and the app, a lock and a
shielded ``send_all`` per write, a response head written apart from its first chunk, several
protocol layers per relayed chunk, and h11, whose header checks cost more than the rest of a
request's way through the proxy. Here a connection is one task that calls the app itself
(``web/connection.py``): requests are parsed by httptools (llhttp, Node's parser), heads are
written by ``protocol/http1.py``, and writes go to the kernel without a checkpoint when it
takes them (``trioproxy.streams``). ASGI ``receive``/``send`` are ``web/http1.py`` (HTTP) and
``web/websocket.py`` (wsproto).

Theory of operation: ``serve_asgi`` owns the lifespan task, the task that returns freed
memory to the system after large requests (``give_back_memory``) and a nursery of connection
tasks fed by ``trio.serve_listeners``; ``Server.handle`` is each connection's task.

Resource handling: the listeners are closed on the way out, and every connection task has
ended by the time ``serve_asgi`` returns. While the server drains, idle connections close at
once and busy ones after their current request; ``graceful_timeout`` later whatever is left
is cancelled.

Error handling: an exception anywhere in a connection's code is logged and closes that
connection only: it never reaches the listener.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import attrs
import trio

from trioproxy.logs import get_logger
from trioproxy.protocol import http1 as wire
from trioproxy.streams import PeerGone
from trioproxy.web.asgi import ASGIApp, Message
from trioproxy.web.budget import ByteBudget
from trioproxy.web.connection import ASGI_VERSION, Connection, Failed, Head, address
from trioproxy.web.http1 import HTTPCycle
from trioproxy.web.state import ServerConfig, ServerState
from trioproxy.web.websocket import serve_websocket

log = get_logger("trioproxy.server")


@attrs.define(eq=False)
class Server(ServerState):
    """A server: its shared state, and the task each accepted connection runs."""

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection until it ends. Never raises (but Cancelled)."""
        self.connections_open += 1
        self.connections_total += 1
        try:
            conn = Connection(self, stream)
            await exchanges(conn)
            await conn.linger()
        except Exception:
            # a bug in one connection must never reach the listener (and every other client)
            log.exception("connection handler failed; closing that connection")
        finally:
            self.connections_open -= 1
            await trio.aclose_forcefully(stream)


async def exchanges(conn: Connection) -> None:
    """The requests of one connection, one at a time, while it can carry them."""
    server = conn.server
    while True:
        try:
            head = await conn.next_head()
        except PeerGone:
            return
        if head is None:
            return
        if isinstance(head, Failed):
            await conn.write_error(head.status, head.message, head.code)
            return
        server.requests_total += 1
        refusal = refuse_head(head, server.config)
        if refusal is not None:
            await conn.write_error(
                refusal.status, refusal.message, refusal.code, target=head.target
            )
            return
        if head.is_websocket:
            await serve_websocket(conn, head)
            return
        cycle = HTTPCycle(conn, head)
        await cycle.run()
        if not cycle.reusable() or server.draining or conn.upgraded is not None or conn.overflowed:
            return


def refuse_head(head: Head, config: ServerConfig) -> Failed | None:
    """The answer to a head that cannot be served, before the app sees it: a version other
    than HTTP/1.0 or 1.1; no Host in an HTTP/1.1 request or two Host headers, or an
    absolute-form target without a host (RFC 9112 3.2); a ``Content-Length`` over
    ``max_body_bytes`` or the request-memory budget (refused before any of the body is
    read)."""
    if head.http_version not in (b"1.0", b"1.1"):
        return Failed(
            505,
            "This server speaks HTTP/1.1 (and WebSocket over it).",
            "http_version_not_supported",
        )
    hosts = head.count(b"host")
    if hosts > 1 or (hosts == 0 and head.http_version == b"1.1"):
        return Failed(400, "A request needs exactly one Host header.", "bad_request")
    if wire.absolute_authority(head.target) == b"":
        return Failed(400, "The request target names no host.", "bad_request")
    length = head.content_length
    if length is not None and length > config.largest_body:
        return Failed(
            413,
            f"The request body is larger than {config.largest_body} bytes.",
            "payload_too_large",
        )
    return None


# -- lifespan ----------------------------------------------------------------------------------
@attrs.define(eq=False)
class Lifespan:
    """The ASGI lifespan protocol: the app's startup before the first connection, its
    shutdown after the last. An app that does not speak it (it raises) is served anyway."""

    app: ASGIApp
    state: dict[str, Any]
    timeout: float
    _to_app: trio.MemorySendChannel[Message] = attrs.field(init=False)
    _app_receive: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)
    _from_app: trio.MemorySendChannel[Message] = attrs.field(init=False)
    _replies: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)
    supported: bool = True

    def __attrs_post_init__(self) -> None:
        self._to_app, self._app_receive = trio.open_memory_channel[Message](1)
        self._from_app, self._replies = trio.open_memory_channel[Message](1)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the app's lifespan task (its own nursery, quart-trio's background tasks among
        them, lives as long as it). Reports started once startup is done."""
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}

        async def app_task() -> None:
            try:
                await self.app(scope, self._app_receive.receive, self._from_app.send)
            except Exception:
                log.debug("the app does not support the ASGI lifespan protocol")
            finally:
                self.supported = False  # from now on there is nobody to tell
                self._from_app.close()
                self._app_receive.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(app_task)
            await self._exchange("startup")
            task_status.started()
            await trio.sleep(math.inf)

    async def _exchange(self, phase: str) -> None:
        with trio.move_on_after(self.timeout) as waited:
            try:
                await self._to_app.send({"type": f"lifespan.{phase}"})
                reply = await self._replies.receive()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                return  # the app finished (or refused the protocol)
        if waited.cancelled_caught:
            raise RuntimeError(f"the app's lifespan {phase} took more than {self.timeout} s")
        if reply["type"] == f"lifespan.{phase}.failed":
            raise RuntimeError(f"the app's lifespan {phase} failed: {reply.get('message', '')}")

    async def shutdown(self) -> None:
        if self.supported:
            await self._exchange("shutdown")


# -- listening ---------------------------------------------------------------------------------
async def open_listeners(
    host: str, port: int, *, backlog: int, user_timeout_ms: int | None
) -> list[trio.SocketListener]:
    """Listening sockets for ``host:port`` (one per address of ``host``; with port 0 only the
    first, so the port reported is the one every client reaches). Accepted sockets inherit
    ``TCP_USER_TIMEOUT`` (milliseconds) from them."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    if port == 0 and len(listeners) > 1:
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    if user_timeout_ms is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        for listener in listeners:
            if listener.socket.family in (socket.AF_INET, socket.AF_INET6):
                listener.socket.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms
                )
    return listeners


# The C allocator keeps what large requests freed for later reuse instead of returning it to
# the system (measured: five bodies of 60 MB parsed and answered left the process 250 MiB
# larger, with nothing of them still allocated); malloc_trim(0) returns it.
TRIM_INTERVAL = 1.0  # seconds between looks at the budget
TRIM_AFTER_BYTES = 32 * 1024 * 1024  # given back since the last trim, to be worth one


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


async def give_back_memory(budget: ByteBudget) -> None:
    """Return freed memory to the system after large requests: once a second, when the
    request-memory budget has given back ``TRIM_AFTER_BYTES`` since the last time, trim the
    C allocator's heap (in a worker thread: it takes tens of milliseconds on a large heap).
    Runs for the server's life in its outer nursery."""
    trim = _malloc_trim()
    if trim is None:
        return
    trimmed_at = budget.statistics().released_total
    while True:
        await trio.sleep(TRIM_INTERVAL)
        released = budget.statistics().released_total
        if released - trimmed_at >= TRIM_AFTER_BYTES:
            trimmed_at = released
            await trio.to_thread.run_sync(trim, 0)


async def accept_until(
    handler: Callable[[Any], Awaitable[None]],
    accepted: Sequence[trio.abc.Listener[Any]],
    listeners: Sequence[trio.SocketListener],
    connections: trio.Nursery,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[tuple[str, int]]],
) -> None:
    """Accept connections from ``accepted`` (the ``listeners``, or wrappers of them such as
    TLS listeners) into ``connections``, each served by ``handler``, until
    ``shutdown_trigger`` returns; report the listeners' addresses once accepting. Then stop
    accepting and close the listeners (connections in flight go on in ``connections``)."""
    async with trio.open_nursery() as accepting:
        await accepting.start(
            partial(trio.serve_listeners, handler, list(accepted), handler_nursery=connections)
        )
        task_status.started([a for a in (address(x.socket, peer=False) for x in listeners) if a])
        await shutdown_trigger()
        accepting.cancel_scope.cancel(reason="server draining")
    for listener in listeners:
        await listener.aclose()


async def serve_asgi(
    server: Server,
    listeners: list[trio.SocketListener],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``server.app`` on ``listeners`` until ``shutdown_trigger`` returns, then drain:
    stop accepting, close idle connections, give busy ones ``graceful_timeout``. Reports the
    bound addresses once the app's lifespan startup is done.

    Resource handling: the listeners are closed on the way out, and every connection task
    has ended by the time this returns."""
    lifespan = Lifespan(server.app, server.state, server.config.lifespan_timeout)
    try:
        async with trio.open_nursery() as outer:
            await outer.start(lifespan.run)
            outer.start_soon(give_back_memory, server.budget)
            async with trio.open_nursery() as connections:
                await accept_until(
                    server.handle, listeners, listeners, connections, shutdown_trigger, task_status
                )
                server.start_draining()
                connections.cancel_scope.deadline = (
                    trio.current_time() + server.config.graceful_timeout
                )
            with trio.CancelScope(shield=True):
                await lifespan.shutdown()
            outer.cancel_scope.cancel(reason="server stopped")
    finally:
        for listener in listeners:
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await trio.aclose_forcefully(listener)
