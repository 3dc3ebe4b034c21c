"""What trioproxy changes in hypercorn's trio worker: the guards of design.md section 6, and
fewer trips through the scheduler on the way to a response's first byte.

Why the trips matter: the proxy is one trio thread, and a task that yields (every
checkpoint) runs again only after every other task that is ready then. Under load (50
streams relaying events) each trip costs about one scheduler batch, so the number of trips
between a request's arrival and its first byte, more than the CPU spent, sets the proxy's
overhead on time to first byte (docs/performance.md section 4). hypercorn's worker takes a
``trio.Lock`` around every socket write and around its keep-alive timer (one trip each even
when nobody holds it; the timer's lock is held while its task starts, which a request
arriving right after a response waited for), and writes a response's head and its first body chunk as two
separate socket writes (two trips, and the client wakes for the head alone).

``install()`` (called by ``trioproxy.server`` before it serves) makes hypercorn's worker build a :class:`GuardedTCPServer` per connection, whose HTTP/1.1 protocol is
:class:`CoalescingH11Protocol`.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.protocol as hypercorn_protocol
import hypercorn.trio.run as hypercorn_run
import hypercorn.trio.tcp_server as hypercorn_tcp_server
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer

from trioproxy.logs import get_logger

log = get_logger("trioproxy.server")


def _write_now(stream: trio.abc.Stream, data: bytes) -> int:
    """Write what the kernel takes at once of ``data`` to a plain TCP stream (no
    checkpoint); the number of bytes written (0 for a TLS stream, or a full socket buffer,
    which then go through ``send_all``)."""
    if not isinstance(stream, trio.SocketStream) or not data:
        return 0
    try:
        return os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        return 0
    except OSError:
        return 0  # a closed or broken socket: send_all raises the error trio would raise


async def _take(lock: trio.Lock) -> None:
    """Acquire ``lock``; at once when it is free (no checkpoint), else by waiting."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class KeepAliveTimer:
    """hypercorn's ``TrioSingleTask`` (one connection's keep-alive timer, restarted after
    each response and stopped when a request arrives), without its lock and without waiting
    for the timer task to start: hypercorn's version holds a lock across ``nursery.start``,
    and a request arriving just after a response (a client's next turn) waited for it.

    The timer's cancel scope is made here and entered by the timer task; cancelling a scope
    not yet entered cancels it on entry, so a timer stopped before it started never runs."""

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        await self.stop()
        scope = self._scope = trio.CancelScope()
        task_group._nursery.start_soon(self._run, scope, action)

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    @staticmethod
    async def _run(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
        with scope:
            await action()


class GuardedTCPServer(TCPServer):
    """hypercorn's per-connection server; an exception ends this connection only, a
    connection its client closed is released at once, and a write takes the connection's
    send lock without a trip through the scheduler when it is free."""

    def __init__(
        self, app: Any, config: Any, context: Any, state: Any, stream: trio.abc.Stream
    ) -> None:
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self.idle_task = KeepAliveTimer()  # type: ignore[assignment]

    async def run(self) -> None:
        try:
            await super().run()
        except Exception:
            log.exception("connection handler failed; closing that connection")
            await trio.aclose_forcefully(self.stream)

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        await _take(self.send_lock)
        try:
            try:
                # hypercorn shields its writes; a client that stops reading is cut off by
                # TCP_USER_TIMEOUT on the listening socket (design.md section 6, trap 1)
                data = event.data
                written = _write_now(self.stream, data)
                if written < len(data):
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(memoryview(data)[written:])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()

    async def _read_data(self) -> None:
        await super()._read_data()
        # Nothing more can be read (the client closed, or reading failed). hypercorn's trio
        # worker leaves the keep-alive idle timer running, and the connection's task group,
        # hence its socket (in CLOSE_WAIT), waits for it: a client that connected and left
        # before its first request held a descriptor for keep_alive_timeout (75 s).
        await self.idle_task.stop()


class AppTaskGroup(TaskGroup):
    """hypercorn's per-connection task group, whose hand-over of request messages to the
    app queues a message without a checkpoint when the app's queue has room: the body and
    the end of a request then reach the app in one scheduler round instead of one each."""

    async def spawn_app(
        self,
        app: Any,
        config: Any,
        scope: Any,
        send: Callable[[Any], Awaitable[None]],
    ) -> Callable[[Any], Awaitable[None]]:
        put = await super().spawn_app(app, config, scope, send)
        channel = getattr(put, "__self__", None)
        if not isinstance(channel, trio.MemorySendChannel):
            return put

        async def put_queued(message: Any) -> None:
            try:
                channel.send_nowait(message)
            except trio.WouldBlock:
                await channel.send(message)

        return put_queued


class CoalescingH11Protocol(H11Protocol):
    """HTTP/1.1 whose response head goes out in the same socket write as the first body
    chunk (or the end of the body) instead of a write of its own.

    Only plain HTTP responses are held: a WebSocket handshake's head is written at once. A
    held head is written with whatever the stream writes next, and at the latest when the
    stream closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held_head: bytes | None = None
        self._holding = False
        write = self.send

        async def send(event: Event) -> None:
            if isinstance(event, RawData):
                if self._holding:
                    self._held_head = (self._held_head or b"") + event.data
                    return
                if self._held_head is not None:
                    event = RawData(data=self._held_head + event.data)
                    self._held_head = None
            elif self._held_head is not None:
                head, self._held_head = self._held_head, None
                await write(RawData(data=head))
            await write(event)

        self.send = send

    async def stream_send(self, event: StreamEvent) -> None:
        if (
            isinstance(event, Response)
            and event.status_code >= 200
            and isinstance(self.stream, HTTPStream)
        ):
            self._holding = True
            try:
                await super().stream_send(event)
            finally:
                self._holding = False
            return
        await super().stream_send(event)
        if self._held_head is not None and not isinstance(event, Response):
            # the event wrote nothing (an empty body, StreamClosed): the head goes now
            head, self._held_head = self._held_head, None
            await self.send(RawData(data=head))


def install() -> None:
    """Make hypercorn's trio worker use the classes above (idempotent)."""
    hypercorn_run.TCPServer = GuardedTCPServer  # type: ignore[attr-defined]
    hypercorn_protocol.H11Protocol = CoalescingH11Protocol  # type: ignore[attr-defined]
    hypercorn_tcp_server.TaskGroup = AppTaskGroup  # type: ignore[attr-defined]
