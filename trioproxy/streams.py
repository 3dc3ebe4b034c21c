"""Socket writes that take no trip through the scheduler when the kernel accepts the bytes.

Why: the proxy is one trio thread, and every checkpoint puts the task behind every other task
that is ready at that moment. A trio ``send_all`` is always a checkpoint, even when the
kernel takes the whole buffer at once, which it nearly always does for a relayed SSE event
or a request head. Under load each of those trips costs a turn its share of everybody else's
relay work before its first byte (docs/performance.md, section 3.2). Here a write first goes
to the kernel directly (``os.write`` on the non-blocking socket); only what the kernel does
not take goes through ``send_all``.

Resource handling: a :class:`SocketWriter` orders the writes of several tasks on one
connection (a WebSocket's session and its reader answering pings, say). A write that cannot
finish at once holds a FIFO lock while the rest goes out, and every later write queues
behind it, so bytes reach the socket in the order they were produced. A write that fails or
is cancelled half-way marks the writer ``broken``: the peer has seen part of a message, so
nothing more may be written on that connection.

Error handling: a failed write raises ``trio.BrokenResourceError`` (or
``trio.ClosedResourceError`` for a socket closed locally), the errors trio's streams raise.
"""

from __future__ import annotations

import os

import attrs
import trio

READ_SIZE = 65536


class PeerGone(Exception):
    """The other end closed the connection, or it broke, while we read from it."""


async def receive_some(stream: trio.abc.Stream, max_bytes: int = READ_SIZE) -> bytes:
    """The next bytes of ``stream`` (b"" at its end), like ``stream.receive_some``.

    For a plain TCP stream this waits for the socket and reads it directly: trio's
    ``receive_some`` first tries a read that fails when nothing is there yet (an exception)
    and passes two context managers, a noticeable part of a relayed event's CPU
    (docs/performance.md, section 3.2).
    ``wait_readable`` is the checkpoint; a close of the stream by another task wakes it with
    ``ClosedResourceError``, as ``receive_some`` would raise. A reset raises ``OSError``
    (``ConnectionResetError``) where trio would raise ``BrokenResourceError``: callers catch
    both."""
    if not isinstance(stream, trio.SocketStream):
        return bytes(await stream.receive_some(max_bytes))
    sock = stream.socket
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            continue  # woken without data after all


def write_now(stream: trio.abc.Stream, data: bytes | memoryview) -> int:
    """Write what the kernel takes at once of ``data`` to a plain TCP stream, with no
    checkpoint. Returns the number of bytes written: 0 for a stream that is not a plain socket
    (TLS), a full socket buffer or a failed socket, whose bytes then go through ``send_all``
    (which raises the error trio would raise)."""
    if not data or not isinstance(stream, trio.SocketStream):
        return 0
    try:
        return os.write(stream.socket.fileno(), data)
    except OSError:  # BlockingIOError (buffer full), a reset or closed socket
        return 0


@attrs.define(eq=False)
class SocketWriter:
    """The write side of one connection, shared by the tasks that write to it."""

    stream: trio.abc.Stream
    broken: bool = False
    _lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)

    async def write(self, data: bytes) -> None:
        """Write ``data`` after every write started before it; raise if the connection cannot
        carry it."""
        if self.broken:
            raise trio.BrokenResourceError("an earlier write on this connection failed")
        rest: bytes | memoryview = data
        if not self._lock.locked():
            written = write_now(self.stream, data)
            if written == len(data):
                return
            rest = memoryview(data)[written:]
        try:
            async with self._lock:
                if self.broken:
                    raise trio.BrokenResourceError("an earlier write on this connection failed")
                await self.stream.send_all(rest)
        except BaseException:
            self.broken = True
            raise
