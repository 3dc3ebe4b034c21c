"""What hostile clients cost the proxy, measured (docs/security.md).

``python -m trioproxy.harness.bench.hostile [PROBE ...]`` starts the mock and a proxy with its
default options in front of it (the bench's stack: two processes on loopback, no API key),
then runs each ``PROBE`` (default: all, in this order) with raw sockets against the proxy:

* ``deflate``: one WebSocket message of about 1 MB compressed (``permessage-deflate``, agreed
  with wsproto) that inflates to about 1 GB, far past ``max_body_bytes``, on an upgraded
  ``/backend-api/codex/responses`` socket; then eight at once.
* ``bodies``: 30 clients posting a 60 MB JSON body each, at once; then one 60 MB body made of
  about 760,000 small items (what parsing it costs is the point).
* ``trickle``: 1,000 sockets that send a request head, then a body at 1 byte per second, for
  at most 30 s: when they are cut (408), and whether a normal client is ever locked out.
* ``pipeline``: 20 connections that each send a request whose long streamed answer they never
  read (the mock's ``slow`` fault: an event a second for about two minutes), then 1 MiB of
  small pipelined requests behind it; after they close, how long the proxy takes to give
  their lane slots back.

Each phase of a probe runs against a fresh stack (memory a phase left with the allocator
would hide the next one's). For each it prints, as one JSON object per line, the proxy
process's RSS before, its peak (sampled every 10 ms with psutil) and once settled (after the
probe's clients have gone: stable within 1 MiB for a second, at most 20 s later), what the
probe's clients got (statuses, close codes, times), and how normal requests fared meanwhile
(a small streamed ``POST /backend-api/codex/responses`` after another, each answered by the
mock); then a Markdown table of it all. Every loop is bounded in count and in time, every
socket is closed on every path, and the processes stop with the run.

:func:`run_probes` is the same with other sizes (:class:`Sizes`) and proxy options, for tests.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import attrs
import httpx
import psutil
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request
from wsproto.extensions import PerMessageDeflate

from trioproxy.harness.bench import bodies
from trioproxy.harness.bench.clients import HttpClient
from trioproxy.harness.bench.stack import Stack, start_stack
from trioproxy.harness.mock_upstream.client import MockControl

MIB = 1024 * 1024
PROBES = ("deflate", "bodies", "trickle", "pipeline")
WS_BETA = "responses_websockets=2026-02-06"
READ = 65536
SAMPLE_EVERY = 0.01  # seconds between RSS samples
# a small Responses input item: a 60 MB body of them is about 760,000 items
ITEM = b'{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}'
NORMAL_BODY = bodies.encode(bodies.request([bodies.user_message("mock:say hi")], thread=None))


@attrs.frozen
class Sizes:
    """How big each probe is (the defaults are the documented run)."""

    deflate_compressed: int = 1_000_000  # bytes on the wire of one message
    deflate_many: int = 8  # messages at once in the second phase (0: no second phase)
    body_clients: int = 30
    body_bytes: int = 60_000_000
    items_body_bytes: int = 60_000_000  # 0: no items phase
    tricklers: int = 1000
    trickle_length: int = 100_000  # Content-Length the tricklers announce
    trickle_limit: float = 30.0  # seconds the trickle probe may last
    pipelines: int = 20
    pipeline_bytes: int = MIB  # pipelined behind each unread answer
    pipeline_hold: float = 3.0  # seconds the pipelining sockets stay open
    settle_limit: float = 20.0
    client_limit: float = 60.0  # seconds one hostile client may take


@attrs.define(eq=False)
class Target:
    """The proxy under test and the mock behind it."""

    host: str
    port: int
    pid: int
    path: str
    mock: MockControl
    root: str

    @classmethod
    def of(cls, stack: Stack) -> Target:
        assert stack.proxy_pid is not None and stack.mock is not None
        return cls(
            stack.proxy.host,
            stack.proxy.port,
            stack.proxy_pid,
            stack.proxy.path,
            stack.mock,
            stack.proxy.root,
        )

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def post_head(self, length: int) -> bytes:
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.authority}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode("ascii")

    async def admission(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            answer = await client.get(f"{self.root}/api/admission")
            answer.raise_for_status()
            data: dict[str, Any] = answer.json()
            return data


# -- measuring ---------------------------------------------------------------------------------
@attrs.define(eq=False)
class RssSampler:
    """The proxy's RSS every ``SAMPLE_EVERY`` seconds while it runs."""

    process: psutil.Process
    peak: int = 0
    last: int = 0
    samples: int = 0
    recent: list[tuple[float, int]] = attrs.field(factory=list)  # the last second's

    def sample(self) -> int:
        rss: int = self.process.memory_info().rss
        now = trio.current_time()
        self.last, self.peak, self.samples = rss, max(self.peak, rss), self.samples + 1
        self.recent.append((now, rss))
        while self.recent and self.recent[0][0] < now - 1.0:
            self.recent.pop(0)
        return rss

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.sample()
        task_status.started()
        while True:
            await trio.sleep(SAMPLE_EVERY)
            self.sample()

    async def settle(self, limit: float) -> float:
        """Wait until the RSS stayed within 1 MiB for a second (at most ``limit`` s); the
        seconds it took."""
        began = trio.current_time()
        self.recent.clear()
        with trio.move_on_after(limit):
            while True:
                await trio.sleep(0.1)
                values = [rss for _, rss in self.recent]
                covered = self.recent[-1][0] - self.recent[0][0] if self.recent else 0.0
                if covered >= 0.9 and max(values) - min(values) <= MIB:
                    break
        return trio.current_time() - began


@attrs.define(eq=False)
class NormalChecks:
    """Normal requests, one after another, while a probe runs (from ``start``)."""

    target: Target
    began: float
    outcomes: list[dict[str, Any]] = attrs.field(factory=list)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    async def run(self) -> None:
        with self.scope:
            for _ in range(10_000):
                client = HttpClient(self.target.host, self.target.port)
                try:
                    outcome = await client.sse_turn(self.target.path, NORMAL_BODY, [], limit=15.0)
                finally:
                    await client.aclose()
                self.outcomes.append(
                    {
                        "at": round(outcome.started - self.began, 2),
                        "status": outcome.status,
                        "completed": outcome.completed,
                        "overload": outcome.overload,
                        "error": outcome.error,
                        "latency": outcome.latency,
                    }
                )
                await trio.sleep(0.2)

    def summary(self) -> dict[str, Any]:
        served = [o for o in self.outcomes if o["completed"]]
        overloaded = [o for o in self.outcomes if o["status"] == 429]
        latencies = [o["latency"] for o in served if o["latency"] is not None]
        return {
            "attempts": len(self.outcomes),
            "served": len(served),
            "answers": dict(Counter(label(o) for o in self.outcomes)),
            "first_429_s": overloaded[0]["at"] if overloaded else None,
            "max_latency_s": round(max(latencies), 2) if latencies else None,
        }


def label(outcome: dict[str, Any]) -> str:
    if outcome["completed"]:
        return "200"
    if outcome["status"]:
        return f"{outcome['status']}:{outcome['error']}"
    return str(outcome["error"])


@attrs.define(eq=False)
class Probe:
    """What a probe's work gets: when it began, and the normal checks to start."""

    target: Target
    sizes: Sizes
    nursery: trio.Nursery
    checks: NormalChecks
    started: bool = False

    def start_checks(self) -> None:
        if not self.started:
            self.started = True
            self.nursery.start_soon(self.checks.run)

    def elapsed(self) -> float:
        return round(trio.current_time() - self.checks.began, 2)


Work = Callable[[Probe], Awaitable[dict[str, Any]]]


async def measure(
    target: Target, sizes: Sizes, name: str, work: Work, *, checks_at_once: bool = True
) -> dict[str, Any]:
    """Run ``work`` (which returns once its clients are gone) with the RSS sampled and normal
    requests going on; then wait for the RSS to settle."""
    sampler = RssSampler(psutil.Process(target.pid))
    refused_before = (await target.admission())["memory"]["requests"]["refused_total"]
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(sampler.run)
        before = sampler.last
        probe = Probe(target, sizes, nursery, NormalChecks(target, began))
        if checks_at_once:
            probe.start_checks()
        clients = await work(probe)
        probe.checks.scope.cancel()
        duration = trio.current_time() - began
        settle_s = await sampler.settle(sizes.settle_limit)
        nursery.cancel_scope.cancel()
    admission = await target.admission()
    requests = admission["memory"]["requests"]
    return {
        "probe": name,
        "rss_before_mib": round(before / MIB, 1),
        "rss_peak_mib": round(sampler.peak / MIB, 1),
        "rss_settled_mib": round(sampler.last / MIB, 1),
        "settle_s": round(settle_s, 1),
        "duration_s": round(duration, 1),
        "samples": sampler.samples,
        "clients": clients,
        "normal": probe.checks.summary(),
        "budget_refused": requests["refused_total"] - refused_before,
        "after": {
            "budget_held": requests["held"],
            "proxy_http_in_use": admission["lanes"]["proxy_http"]["in_use"],
            "proxy_websocket_in_use": admission["lanes"]["proxy_websocket"]["in_use"],
        },
    }


# -- raw HTTP ----------------------------------------------------------------------------------
@attrs.define(eq=False)
class Answer:
    status: int | None = None
    overload: str | None = None
    completed: bool = False
    error: str | None = None
    at: float | None = None  # when the status line came, from the probe's start

    @property
    def label(self) -> str:
        if self.status is None:
            return self.error or "no_answer"
        if self.overload:
            return f"{self.status}:{self.overload}"
        if self.status == 200 and not self.completed:
            return "200:incomplete"
        return str(self.status)


async def read_answer(stream: trio.SocketStream, probe: Probe, *, whole: bool) -> Answer:
    """The answer's status (and, with ``whole``, a 200's stream up to its end)."""
    answer = Answer()
    buffer = bytearray()
    while True:
        try:
            data = await stream.receive_some(READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            answer.error = answer.error or "reset"
            return answer
        if not data:
            if answer.status is None:
                answer.error = "closed"
            return answer
        buffer += data
        if answer.status is None and b"\r\n\r\n" in buffer:
            head = bytes(buffer[: buffer.index(b"\r\n\r\n")]).decode("latin-1").split("\r\n")
            answer.status = int(head[0].split(" ")[1])
            answer.at = probe.elapsed()
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "x-trioproxy-overload":
                    answer.overload = value.strip()
            if not whole or answer.status != 200:
                return answer
        if answer.status == 200 and b"response.completed" in buffer:
            answer.completed = True
            return answer
        if len(buffer) > 4 * MIB:
            del buffer[:-READ]


async def close(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)


async def post(probe: Probe, body: bytes) -> Answer:
    """One client posting ``body`` whole (while reading its answer)."""
    target = probe.target
    answer = Answer(error="timeout")
    with trio.move_on_after(probe.sizes.client_limit):
        try:
            stream = await trio.open_tcp_stream(target.host, target.port)
        except OSError:
            return Answer(error="connect_error")
        try:
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    view = memoryview(body)
                    try:
                        await stream.send_all(target.post_head(len(body)))
                        for at in range(0, len(body), MIB):
                            await stream.send_all(view[at : at + MIB])
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass  # answered (and closed) before the whole body went out

                nursery.start_soon(send)
                answer = await read_answer(stream, probe, whole=True)
                nursery.cancel_scope.cancel()
        finally:
            await close(stream)
    return answer


def counted(answers: list[Answer]) -> dict[str, int]:
    return dict(Counter(a.label for a in answers))


# -- deflate -----------------------------------------------------------------------------------
_bombs: dict[tuple[int, int], tuple[bytes, int]] = {}


def deflate_bomb(compressed: int, window_bits: int) -> tuple[bytes, int]:
    """About ``compressed`` bytes of raw deflate data (RFC 7692: the trailing 00 00 ff ff
    removed) of spaces (valid text, JSON whitespace), and the bytes they inflate to."""
    key = (compressed, window_bits)
    if key not in _bombs:
        packer = zlib.compressobj(9, zlib.DEFLATED, -window_bits, 9, zlib.Z_RLE)
        chunk = b" " * MIB
        pieces: list[bytes] = []
        size = inflated = 0
        while size < compressed and inflated < 4096 * MIB:
            piece = packer.compress(chunk)
            pieces.append(piece)
            size += len(piece)
            inflated += len(chunk)
        pieces.append(packer.flush(zlib.Z_SYNC_FLUSH))
        data = b"".join(pieces)
        assert data.endswith(b"\x00\x00\xff\xff")
        _bombs[key] = (data[:-4], inflated)
    return _bombs[key]


def masked_frame(payload: bytes) -> bytes:
    """One final, compressed (RSV1) text frame carrying ``payload``, masked."""
    key = os.urandom(4)
    n = len(payload)
    mask = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(
        n, "little"
    )
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | 0x40 | 0x1]) + length + key + body


async def deflate_client(probe: Probe, results: list[dict[str, Any]]) -> None:
    """Upgrade, agree permessage-deflate, send one bomb, report how the socket ended."""
    target = probe.target
    result: dict[str, Any] = {"end": "timeout"}
    results.append(result)
    with trio.move_on_after(probe.sizes.client_limit):
        try:
            stream = await trio.open_tcp_stream(target.host, target.port)
        except OSError:
            result["end"] = "connect_error"
            return
        try:
            await _deflate_session(probe, stream, result)
        finally:
            await close(stream)


async def _deflate_session(probe: Probe, stream: trio.SocketStream, result: dict[str, Any]) -> None:
    target = probe.target
    ws = WSConnection(ConnectionType.CLIENT)
    extension = PerMessageDeflate()
    request = Request(
        host=target.authority,
        target=target.path,
        extensions=[extension],
        extra_headers=[(b"openai-beta", WS_BETA.encode())],
    )
    try:
        await stream.send_all(ws.send(request))
        accepted: AcceptConnection | None = None
        while accepted is None:
            data = await stream.receive_some(READ)
            if not data:
                result["end"] = "closed_before_handshake"
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = event
                elif isinstance(event, RejectConnection):
                    result["end"] = f"http_{event.status_code}"
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        result["end"] = "reset_before_handshake"
        return
    if not any(isinstance(e, PerMessageDeflate) for e in accepted.extensions):
        result["end"] = "deflate_not_agreed"
        return
    bits = extension.client_max_window_bits or 15
    payload, inflated = deflate_bomb(probe.sizes.deflate_compressed, bits)
    frame = masked_frame(payload)
    result.update(compressed=len(payload), inflates_to=inflated, sent=0)

    async with trio.open_nursery() as nursery:

        async def send() -> None:
            view = memoryview(frame)
            try:
                for at in range(0, len(frame), READ):
                    await stream.send_all(view[at : at + READ])
                    result["sent"] = min(len(frame), at + READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # closed on us before the whole message went out

        nursery.start_soon(send)
        result["end"] = await _close_code(probe, stream, ws, result)
        nursery.cancel_scope.cancel()


async def _close_code(
    probe: Probe, stream: trio.SocketStream, ws: WSConnection, result: dict[str, Any]
) -> str:
    while True:
        try:
            data = await stream.receive_some(READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return "reset"
        if not data:
            return "closed_without_close_frame"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, CloseConnection):
                result["at"] = probe.elapsed()
                return f"close_{event.code}"


def deflate_work(clients: int) -> Work:
    async def work(probe: Probe) -> dict[str, Any]:
        deflate_bomb(probe.sizes.deflate_compressed, 15)  # built before, not while measured
        results: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(deflate_client, probe, results)
        first = results[0] if results else {}
        return {
            "messages": clients,
            "compressed_bytes": first.get("compressed"),
            "inflates_to_mib": round(first.get("inflates_to", 0) / MIB),
            "ends": dict(Counter(r["end"] for r in results)),
            "sent_before_close_max": max((r.get("sent", 0) for r in results), default=0),
            "closed_at_s": max((r.get("at", 0.0) for r in results), default=None),
        }

    return work


# -- bodies ------------------------------------------------------------------------------------
def string_body(size: int) -> bytes:
    """A Responses request of ``size`` bytes, most of it one user message's text."""
    shell = bodies.encode(bodies.request([bodies.user_message("@")], thread=None))
    head, _, tail = shell.partition(b"@")
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def items_body(size: int) -> tuple[bytes, int]:
    """A Responses request of about ``size`` bytes made of small input items; and their
    number."""
    head = b'{"model":"gpt-5.5","stream":true,"store":false,"input":['
    tail = b"]}"
    count = max(1, (size - len(head) - len(tail)) // (len(ITEM) + 1))
    return head + b",".join([ITEM] * count) + tail, count


def bodies_work(probe_sizes: Sizes) -> Work:
    async def work(probe: Probe) -> dict[str, Any]:
        body = string_body(probe_sizes.body_bytes)
        answers: list[Answer] = []

        async def one() -> None:
            answers.append(await post(probe, body))

        async with trio.open_nursery() as nursery:
            for _ in range(probe_sizes.body_clients):
                nursery.start_soon(one)
        return {
            "clients": probe_sizes.body_clients,
            "body_bytes": len(body),
            "answers": counted(answers),
        }

    return work


def items_work(size: int) -> Work:
    async def work(probe: Probe) -> dict[str, Any]:
        body, count = items_body(size)
        answer = await post(probe, body)
        return {"clients": 1, "body_bytes": len(body), "items": count, "answers": counted([answer])}

    return work


# -- trickle -----------------------------------------------------------------------------------
async def trickler(
    probe: Probe, limiter: trio.CapacityLimiter, answers: list[Answer], sent: list[int]
) -> None:
    target = probe.target
    answer = Answer(error="still_open")
    answers.append(answer)
    try:
        async with limiter:
            stream = await trio.open_tcp_stream(target.host, target.port)
    except OSError:
        answer.error = "connect_error"
        return
    try:
        async with trio.open_nursery() as nursery:

            async def drip() -> None:
                try:
                    await stream.send_all(target.post_head(probe.sizes.trickle_length))
                    for _ in range(probe.sizes.trickle_length):
                        await trio.sleep(1.0)
                        await stream.send_all(b" ")
                        sent[0] += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

            nursery.start_soon(drip)
            got = await read_answer(stream, probe, whole=False)
            answer.status, answer.overload, answer.at = got.status, got.overload, got.at
            answer.error = got.error
            nursery.cancel_scope.cancel()
    finally:
        await close(stream)


def trickle_work(probe_sizes: Sizes) -> Work:
    async def work(probe: Probe) -> dict[str, Any]:
        answers: list[Answer] = []
        sent = [0]
        limiter = trio.CapacityLimiter(200)  # connects at once
        with trio.move_on_after(probe_sizes.trickle_limit) as bound:
            async with trio.open_nursery() as nursery:
                for _ in range(probe_sizes.tricklers):
                    nursery.start_soon(trickler, probe, limiter, answers, sent)
        cut = sorted(a.at for a in answers if a.status == 408 and a.at is not None)
        return {
            "tricklers": probe_sizes.tricklers,
            "answers": counted(answers),
            "body_bytes_sent": sent[0],
            "cut_408_first_s": cut[0] if cut else None,
            "cut_408_median_s": round(statistics.median(cut), 2) if cut else None,
            "cut_408_last_s": cut[-1] if cut else None,
            "bounded_at_s": probe_sizes.trickle_limit if bound.cancelled_caught else None,
        }

    return work


# -- pipeline ----------------------------------------------------------------------------------
def pipeline_work(probe_sizes: Sizes) -> Work:
    async def work(probe: Probe) -> dict[str, Any]:
        target = probe.target
        n = probe_sizes.pipelines
        small = (f"GET /health/live HTTP/1.1\r\nHost: {target.authority}\r\n\r\n").encode()
        blob = small * max(1, probe_sizes.pipeline_bytes // len(small))
        long_body = bodies.encode(
            bodies.request([bodies.user_message("mock:say a long answer")], thread=None)
        )
        # each of the n first requests streams for about two minutes
        await target.mock.add_fault("slow", event_delay=1.0, deltas=120, count=n)
        streams: list[trio.SocketStream] = []
        sent = [0] * n
        try:
            for _ in range(n):
                stream = await trio.open_tcp_stream(target.host, target.port)
                streams.append(stream)
                await stream.send_all(target.post_head(len(long_body)) + long_body)
            in_flight = 0
            with trio.move_on_after(10.0):
                while in_flight < n:
                    in_flight = (await target.admission())["lanes"]["proxy_http"]["in_use"]
                    await trio.sleep(0.05)
            probe.start_checks()

            async def pipeline(i: int) -> None:
                view = memoryview(blob)
                with trio.move_on_after(10.0):
                    try:
                        for at in range(0, len(blob), READ):
                            await streams[i].send_all(view[at : at + READ])
                            sent[i] = min(len(blob), at + READ)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(pipeline, i)
            await trio.sleep(probe_sizes.pipeline_hold)
            lanes = (await target.admission())["lanes"]["proxy_http"]["in_use"]
            answers = [await _answers_so_far(s) for s in streams]
        finally:
            for stream in streams:
                await close(stream)
            closed = trio.current_time()
            with trio.CancelScope(shield=True):
                await target.mock.clear_faults()
        # how long the proxy takes to notice that the clients left (their requests still
        # hold their lane slots until then)
        released: float | None = None
        with trio.move_on_after(probe_sizes.settle_limit):
            while True:  # the gauge of another process: polled
                if (await target.admission())["lanes"]["proxy_http"]["in_use"] == 0:
                    released = round(trio.current_time() - closed, 2)
                    break
                await trio.sleep(0.05)
        return {
            "connections": n,
            "in_flight_before_pipelining": in_flight,
            "pipelined_requests_each": len(blob) // len(small),
            "pipelined_bytes_each": len(blob),
            "sent_min": min(sent),
            "sent_max": max(sent),
            "proxy_http_in_use_while_held": lanes,
            "answers_read_at_end": dict(Counter(answers)),
            "lane_released_after_close_s": released,
        }

    return work


async def _answers_so_far(stream: trio.SocketStream) -> str:
    """What came on a connection whose answer was never read: the first status line and the
    number of response heads (the pipelined requests are not answered while the first one
    streams)."""
    data = bytearray()
    with trio.move_on_after(0.5):
        try:
            while len(data) < 64 * MIB:
                piece = await stream.receive_some(READ)
                if not piece:
                    break
                data += piece
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    status = bytes(data[:12]).decode("latin-1").split(" ")[1] if data.startswith(b"HTTP/") else "-"
    return f"{status} ({data.count(b'HTTP/1.1 ')} heads)"


# -- running -----------------------------------------------------------------------------------
def phases(probe: str, sizes: Sizes) -> list[tuple[str, Work, bool]]:
    """The measured phases of ``probe``: (name, work, normal checks from the start)."""
    if probe == "deflate":
        out = [("deflate x1", deflate_work(1), True)]
        if sizes.deflate_many:
            out.append((f"deflate x{sizes.deflate_many}", deflate_work(sizes.deflate_many), True))
        return out
    if probe == "bodies":
        out = [
            (f"bodies {sizes.body_clients}x{sizes.body_bytes // 10**6}MB", bodies_work(sizes), True)
        ]
        if sizes.items_body_bytes:
            mb = sizes.items_body_bytes // 10**6
            out.append((f"bodies items {mb}MB", items_work(sizes.items_body_bytes), True))
        return out
    if probe == "trickle":
        return [(f"trickle x{sizes.tricklers}", trickle_work(sizes), True)]
    if probe == "pipeline":
        return [(f"pipeline x{sizes.pipelines}", pipeline_work(sizes), False)]
    raise ValueError(f"unknown probe {probe!r} (one of {', '.join(PROBES)})")


def raise_descriptor_limit() -> None:
    """Thousands of sockets here and in the proxy (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_probes(
    probes: list[str],
    sizes: Sizes,
    proxy_options: dict[str, Any] | None = None,
    *,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``probes``, each phase against a stack of its own (a proxy with
    ``proxy_options`` over its defaults); one result per phase."""
    for probe in probes:
        phases(probe, sizes)  # an unknown name fails before anything starts
    raise_descriptor_limit()
    results: list[dict[str, Any]] = []
    for probe in probes:
        for name, work, at_once in phases(probe, sizes):
            result = await _on_fresh_stack(proxy_options or {}, sizes, name, work, at_once)
            results.append(result)
            if emit is not None:
                emit(result)
    return results


async def _on_fresh_stack(
    proxy_options: dict[str, Any], sizes: Sizes, name: str, work: Work, at_once: bool
) -> dict[str, Any]:
    """One phase against a proxy of its own: memory one phase left to the allocator does
    not hide the next one's."""
    logs: list[TextIO] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            async with trio.open_nursery() as nursery:
                stack = await start_stack(
                    nursery, Path(tmp), accounts=2, proxy_options=proxy_options, logs=logs
                )
                target = Target.of(stack)
                try:
                    result = await measure(target, sizes, name, work, checks_at_once=at_once)
                finally:
                    await target.mock.aclose()
                nursery.cancel_scope.cancel(reason="phase done")
        finally:
            for log in logs:
                log.close()
    return result


def clients_cell(result: dict[str, Any]) -> str:
    clients = result["clients"]
    for key in ("ends", "answers"):
        if key in clients:
            text = ", ".join(f"{k} x{v}" for k, v in sorted(clients[key].items()))
            break
    else:
        text = ""
    if clients.get("cut_408_median_s") is not None:
        text += (
            f"; 408 at {clients['cut_408_first_s']}-{clients['cut_408_last_s']} s"
            f" (median {clients['cut_408_median_s']})"
        )
    if "answers_read_at_end" in clients:
        text += "; sent " + f"{clients['sent_min']}-{clients['sent_max']} B each, read at end: "
        text += ", ".join(f"{k} x{v}" for k, v in clients["answers_read_at_end"].items())
        text += f"; lane slots freed {clients['lane_released_after_close_s']} s after close"
    return text


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| probe | RSS before | peak | settled (after) | clients got | normal requests served |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        normal = r["normal"]
        locked = (
            f", first 429 at {normal['first_429_s']} s" if normal["first_429_s"] is not None else ""
        )
        lines.append(
            f"| {r['probe']} | {r['rss_before_mib']} MiB | {r['rss_peak_mib']} MiB "
            f"| {r['rss_settled_mib']} MiB ({r['settle_s']} s) | {clients_cell(r)} "
            f"| {normal['served']}/{normal['attempts']}{locked} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    probes = argv or list(PROBES)

    def emit(result: dict[str, Any]) -> None:
        print(json.dumps(result), flush=True)

    results = trio.run(partial(run_probes, probes, Sizes(), None, emit=emit))
    print(table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
