"""The abandonment storm: hundreds of clients leave at every point a request can be at, and
afterwards nothing is left behind.

Three proxies in this process, each in front of its own mock, take the storm at once:

* ``flow``: HTTP and WebSocket clients leave at random (seeded) moments of ordinary traffic:
  before the upgrade completes, before ``response.created``, mid-stream, idle between turns;
  and Chat Completions and Messages conversations (their later turns on bridge sessions, as
  continuations) before their answer starts, mid-answer or between turns.
  Where each one left is what the client itself saw (no 101 yet, 101 but no
  ``response.created``, deltas arriving, a turn completed and nothing in flight).
* ``setup``: the points a client cannot see from outside, each reached on purpose and
  confirmed from the mock's side before anyone leaves: a token refresh in progress (tokens
  expired upstream, ``/oauth/token`` stalled: every client's request was answered 401 and the
  refresh hangs), the upstream WebSocket connect (upgrades stalled at the mock, every one of
  them arrived there) and the wait for ``response.created`` (first event delayed, every
  request's fault fired).
* ``lanes``: small lanes with a wait: holders fill them, waiters queue (the lane says so),
  then the waiters leave while still queued. Then clients that stop reading a huge stream
  but keep their sockets open (a write to them would wait forever): the proxy must cut
  them off by itself (``stalled_client_timeout``) while their sockets are still open.

Afterwards, polled within a bound (never a timed assertion): every lane of every proxy is at
zero in use and zero waiting, every per-account gauge is zero and every account still active,
the mocks have no request, stream or WebSocket open, and the process's file descriptors are
back to the baseline taken before the storm (see ``FdLedger`` for how idle keep-alive
connections are accounted for).
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from tests.conftest import MockEnv, MockFactory, ProxyEnv, ProxyFactory
from tests.helpers import WS_BETA, request_body, wait_until
from trioproxy.harness.mock_upstream import MockConfig
from trioproxy.upstream.ws import UpstreamRejected, open_upstream_websocket

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="counts descriptors and sockets through /proc"
)

SEED = 20260521
BETA = [("openai-beta", WS_BETA)]
TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}
RESPONSES = "/backend-api/codex/responses"
SETTLE_SECONDS = 30.0  # bound of every poll: a leak never comes back, a slow machine does

Leave = Callable[[], Awaitable[None]]
Work = Callable[[], Awaitable[None]]


# -- clients ------------------------------------------------------------------------------
@attrs.define(eq=False)
class Client:
    """One storm client: ``stage`` is the last thing it saw before it left."""

    stage: str = "not_started"


def ws_url(proxy: ProxyEnv) -> str:
    return proxy.codex_url.replace("http://", "ws://", 1)


async def http_client(
    http: httpx.AsyncClient, proxy: ProxyEnv, me: Client, *, repeat: bool, prefix: str = "http"
) -> None:
    """POST streamed turns (one, or one after another) and read them as they come."""
    while True:
        me.stage = f"{prefix}_before_response"
        async with http.stream("POST", proxy.codex_url, json=request_body()) as response:
            if response.status_code != 200:
                me.stage = f"{prefix}_status_{response.status_code}"
                await response.aread()
                return
            me.stage = f"{prefix}_before_created"
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                kind = json.loads(line[5:])["type"]
                if kind == "response.created":
                    me.stage = f"{prefix}_mid_stream"
                elif kind in TERMINAL:
                    me.stage = f"{prefix}_completed"
        if not repeat:
            return


FRONTS = {"chat": "/v1/chat/completions", "messages": "/v1/messages"}


def front_body(front: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    if front == "chat":
        return {"model": "gpt-5.5", "messages": messages, "stream": True}
    return {"model": "claude-sonnet-4-5", "max_tokens": 256, "messages": messages, "stream": True}


def front_text(front: str, line: str) -> tuple[str, bool]:
    """(the answer's text in one stream line, whether the turn ended with it)."""
    if front == "chat":
        if line == "data: [DONE]":
            return "", True
        if not line.startswith("data:"):
            return "", False
        choices = json.loads(line[5:]).get("choices") or [{}]
        return choices[0].get("delta", {}).get("content") or "", False
    if line == "event: message_stop":
        return "", True
    if not line.startswith("data:"):
        return "", False
    event = json.loads(line[5:])
    return event.get("delta", {}).get("text", "") if event[
        "type"
    ] == "content_block_delta" else "", False


async def front_client(http: httpx.AsyncClient, proxy: ProxyEnv, me: Client, front: str) -> None:
    """A Chat Completions or Messages conversation, its whole history resent every turn (so
    its later turns run on a bridge session, as continuations)."""
    messages: list[dict[str, Any]] = []
    url = proxy.root + FRONTS[front]
    for turn in itertools.count(1):
        messages.append({"role": "user", "content": f"turn {turn}"})
        me.stage = f"{front}_before_response"
        async with http.stream("POST", url, json=front_body(front, messages)) as response:
            if response.status_code != 200:
                me.stage = f"{front}_status_{response.status_code}"
                await response.aread()
                return
            me.stage = f"{front}_before_content"
            answer = ""
            async for line in response.aiter_lines():
                text, ended = front_text(front, line)
                if text:
                    me.stage = f"{front}_mid_stream"
                    answer += text
                if ended:
                    me.stage = f"{front}_completed"
        messages.append({"role": "assistant", "content": answer})


async def ws_client(
    proxy: ProxyEnv,
    me: Client,
    rng: random.Random,
    *,
    turns: float = math.inf,
    prefix: str = "ws",
) -> None:
    """Open a WebSocket (the project's own wsproto client: it never leaks its socket when
    cancelled mid-handshake), then run turns with idle gaps between them."""
    me.stage = f"{prefix}_before_upgrade"
    try:
        # (the connect timeout is the test's bound, not the client's: parked clients wait)
        async with open_upstream_websocket(ws_url(proxy), BETA, connect_timeout=120) as ws:
            done = 0
            while done < turns:
                me.stage = f"{prefix}_before_created"
                await ws.send_text(json.dumps({"type": "response.create", **request_body()}))
                while True:
                    message = await ws.receive()
                    kind = json.loads(message)["type"]
                    if kind == "response.created":
                        me.stage = f"{prefix}_mid_stream"
                    elif kind in TERMINAL:
                        break
                done += 1
                me.stage = f"{prefix}_idle"
                await trio.sleep(rng.uniform(0.1, 0.6))
            me.stage = f"{prefix}_completed"
    except UpstreamRejected as rejected:
        me.stage = f"{prefix}_rejected_{rejected.status}"


async def run_until_leave(me: Client, work: Callable[[], Awaitable[None]], leave: Leave) -> None:
    """Run ``work`` until ``leave`` returns; then the client is gone (its scope cancelled)."""
    async with trio.open_nursery() as nursery:

        async def leaver() -> None:
            await leave()
            nursery.cancel_scope.cancel(reason="the client leaves")

        nursery.start_soon(leaver)
        await work()
        nursery.cancel_scope.cancel(reason="the client is done")


def after(seconds: float) -> Leave:
    async def leave() -> None:
        await trio.sleep(seconds)

    return leave


def on_signal(go: trio.Event, jitter: float) -> Leave:
    async def leave() -> None:
        await go.wait()
        await trio.sleep(jitter)

    return leave


async def stalled_http_reader(proxy: ProxyEnv, me: Client, cut: trio.Event) -> None:
    """Start a huge stream, read its first bytes, then never read again; keep the socket open
    until ``cut`` (set once the proxy has released everything this client held)."""
    me.stage = "stalled_http_before_response"
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    try:
        body = json.dumps(request_body()).encode()
        await stream.send_all(
            f"POST {RESPONSES} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if await stream.receive_some(1024):
            me.stage = "stalled_http_reading_stopped"
        await cut.wait()
        me.stage = "stalled_http_cut_off"
    finally:
        await trio.aclose_forcefully(stream)


async def stalled_ws_reader(proxy: ProxyEnv, me: Client, cut: trio.Event) -> None:
    me.stage = "stalled_ws_before_upgrade"
    async with open_upstream_websocket(ws_url(proxy), BETA) as ws:
        await ws.send_text(json.dumps({"type": "response.create", **request_body()}))
        await ws.receive()
        me.stage = "stalled_ws_reading_stopped"
        await cut.wait()
        me.stage = "stalled_ws_cut_off"


# -- what is left behind ------------------------------------------------------------------
def _tcp_table() -> dict[int, tuple[int, int, str]]:
    """socket inode -> (local port, remote port, state) for every TCP socket of the host."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            table[inode] = (
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
                state,
            )
    return table


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, already closed
    return fds


@attrs.define(eq=False)
class FdLedger:
    """The process's descriptors against a baseline.

    Everything runs in this process, so each TCP connection between two of its parts costs
    two descriptors. After the storm the proxies may legitimately keep idle keep-alive
    connections to their mocks (httpx's pool); the mocks count their open connections, so
    ``descriptors - 2 * mock connections`` is invariant under keep-alive and must come back
    to its baseline exactly. A leaked socket of any kind breaks it: a proxy-side upstream
    socket whose mock end closed (+1), a downstream socket the server never closed (+1), a
    client socket of this test (+1; all of them are closed before the check), a file (+1).
    A leaked upstream socket whose mock end is still open shows at the mock instead (a
    request, stream or WebSocket in flight). Besides, no socket to or from a proxy port may
    be left (the test's clients are all closed)."""

    mocks: list[MockEnv]
    proxy_ports: set[int]
    baseline: int = 0
    baseline_fds: dict[int, str] = attrs.field(factory=dict)

    def value(self) -> int:
        connections = sum(m.backend.stats.connections_open for m in self.mocks)
        return len(open_fds()) - 2 * connections

    def downstream_sockets(self) -> list[tuple[int, int, int, str]]:
        table = _tcp_table()
        found = []
        for fd, target in open_fds().items():
            if not target.startswith("socket:["):
                continue
            entry = table.get(int(target[8:-1]))
            if entry is None:
                continue
            local, remote, state = entry
            if state != "0A" and (local in self.proxy_ports or remote in self.proxy_ports):
                found.append((fd, local, remote, state))
        return found

    def settled(self) -> bool:
        return not self.downstream_sockets() and self.value() == self.baseline

    async def take_baseline(self) -> None:
        """Once nothing is on its way out: no downstream socket, every mock idle (an
        upstream WebSocket still in its close handshake is counted by the mock while one of
        its two descriptors may already be gone), and the figure the same over 0.3 s."""
        with trio.fail_after(SETTLE_SECONDS):
            while True:
                await wait_until(
                    lambda: not self.downstream_sockets() and all(mock_idle(m) for m in self.mocks),
                    seconds=SETTLE_SECONDS,
                )
                readings = set()
                for _ in range(4):
                    readings.add(self.value())
                    await trio.sleep(0.1)
                if len(readings) == 1:
                    break
        self.baseline = self.value()
        self.baseline_fds = open_fds()

    def describe(self) -> str:
        now = open_fds()
        added = sorted(t for fd, t in now.items() if self.baseline_fds.get(fd) != t)
        gone = sorted(t for fd, t in self.baseline_fds.items() if now.get(fd) != t)
        connections = [m.backend.stats.connections_open for m in self.mocks]
        return (
            f"fds-2*connections={self.value()} baseline={self.baseline}; mock connections "
            f"{connections}; downstream sockets {self.downstream_sockets()}; "
            f"new fds {added[:40]}; gone fds {gone[:40]}"
        )


async def admission(client: httpx.AsyncClient, proxy: ProxyEnv) -> dict[str, Any]:
    response = await client.get(f"{proxy.root}/api/admission")
    assert response.status_code == 200, response.text
    return dict(response.json())


def idle_admission(stats: dict[str, Any]) -> bool:
    lanes = {**stats["lanes"], **stats["work"], **stats["account_totals"]}
    for name, lane in lanes.items():
        in_use = 1 if name == "dashboard" else 0  # the request reading these gauges
        if lane["in_use"] != in_use or lane["waiting"] != 0:
            return False
    return not stats["accounts"]


def mock_idle(mock: MockEnv) -> bool:
    stats = mock.backend.stats
    return stats.in_flight == 0 and stats.http_streams_open == 0 and stats.ws_open == 0


# -- the storm ----------------------------------------------------------------------------
@attrs.define(eq=False)
class Storm:
    rng: random.Random
    http: httpx.AsyncClient
    clients: list[Client] = attrs.field(factory=list)

    def new(self) -> Client:
        client = Client()
        self.clients.append(client)
        return client

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(c.stage for c in self.clients)

    def group(self, proxy: ProxyEnv, size: int, prefix: str) -> list[tuple[Client, Work]]:
        """``size`` clients of one turn each, HTTP and WebSocket alternately; their stages
        are prefixed ``{prefix}_http`` / ``{prefix}_ws``."""
        made: list[tuple[Client, Work]] = []
        for index in range(size):
            me = self.new()
            work: Work = (
                functools.partial(
                    http_client, self.http, proxy, me, repeat=False, prefix=f"{prefix}_http"
                )
                if index % 2
                else functools.partial(
                    ws_client, proxy, me, self.rng, turns=1, prefix=f"{prefix}_ws"
                )
            )
            made.append((me, work))
        return made


async def flow(storm: Storm, proxy: ProxyEnv, n_http: int, n_ws: int, n_fronts: int) -> None:
    """Ordinary traffic; each client leaves at a random moment of its life."""
    rng = storm.rng
    async with trio.open_nursery() as nursery:
        plans = ["http"] * n_http + ["ws"] * n_ws + [*FRONTS] * n_fronts
        rng.shuffle(plans)
        for kind in plans:
            me = storm.new()
            work: Work
            if kind == "http":
                work = functools.partial(http_client, storm.http, proxy, me, repeat=True)
            elif kind == "ws":
                work = functools.partial(ws_client, proxy, me, random.Random(rng.random()))
            else:
                work = functools.partial(front_client, storm.http, proxy, me, kind)
            nursery.start_soon(run_until_leave, me, work, after(rng.uniform(0.0, 3.0)))
            await trio.sleep(rng.uniform(0, 0.004))


async def parked_then_leave(
    storm: Storm,
    group: list[tuple[Client, Work]],
    parked: Callable[[], bool],
    label: str,
) -> None:
    """Start ``group``; once ``parked()`` confirms every client sits at the point, each one
    still waiting for an answer is labelled ``label`` and they leave in a random order over a
    few hundred milliseconds."""
    go = trio.Event()
    async with trio.open_nursery() as nursery:
        for me, work in group:
            nursery.start_soon(run_until_leave, me, work, on_signal(go, storm.rng.uniform(0, 0.3)))
        try:
            await wait_until(parked, seconds=SETTLE_SECONDS)
        except trio.TooSlowError:
            raise AssertionError(f"clients never all reached {label}") from None
        relabel(group, label)
        go.set()


WAITING_STAGES = ("_before_response", "_before_upgrade", "_before_created")


def relabel(group: list[tuple[Client, Work]], label: str) -> None:
    """Clients that got no answer yet are at the point; any other stage is kept (and then
    fails the test's check of the stages seen)."""
    for me, _ in group:
        if me.stage.endswith(WAITING_STAGES):
            me.stage = label


async def setup_points(storm: Storm, proxy: ProxyEnv, mock: MockEnv) -> None:
    """Token refresh, upstream connect, before response.created: reached, confirmed, left."""
    backend = mock.backend

    def rejected_401() -> int:
        return sum(1 for r in backend.recorder.query(path=RESPONSES) if r.status == 401)

    # 1. refresh in progress: tokens expired upstream, /oauth/token hangs
    for account_id in mock.account_ids():
        await mock.control.patch_account(account_id, expire_tokens=True)
    stall = await mock.control.add_fault("stall", on="token", seconds=600)
    group = storm.group(proxy, 36, "refresh")

    def refreshing() -> bool:
        fired = next((f.fired for f in backend.faults.faults if f.id == stall["id"]), 0)
        return rejected_401() >= len(group) and fired >= 1

    await parked_then_leave(storm, group, refreshing, "during_refresh")
    # the refresh is the proxy's, not the clients': let it finish (the next steps need it)
    await mock.control.clear_faults()

    # 2. upstream connect in progress: the mock holds every upgrade before its 101
    stall = await mock.control.add_fault("stall", on="upgrade", seconds=600)
    group = [
        (me, functools.partial(ws_client, proxy, me, storm.rng, turns=1, prefix="connect_ws"))
        for me in (storm.new() for _ in range(30))
    ]

    def connecting() -> bool:
        fired = next((f.fired for f in backend.faults.faults if f.id == stall["id"]), 0)
        return fired >= len(group)

    await parked_then_leave(storm, group, connecting, "during_upstream_connect")
    await mock.control.clear_faults()

    # 3. before response.created: upstream answers, but its first event never comes
    slow = await mock.control.add_fault("slow", first_event_delay=600)
    group = storm.group(proxy, 36, "created")

    def waiting_for_created() -> bool:
        fired = next((f.fired for f in backend.faults.faults if f.id == slow["id"]), 0)
        return fired >= len(group)

    await parked_then_leave(storm, group, waiting_for_created, "before_response_created")
    await mock.control.clear_faults()


async def lane_points(storm: Storm, proxy: ProxyEnv, mock: MockEnv, limit: int) -> None:
    """Clients leave while queued for a lane; then clients stop reading without closing."""
    async with httpx.AsyncClient() as poll:

        async def lanes() -> dict[str, Any]:
            return dict((await admission(poll, proxy))["lanes"])

        async def until(predicate: Callable[[dict[str, Any]], bool]) -> None:
            last: dict[str, Any] = {}
            try:
                with trio.fail_after(SETTLE_SECONDS):
                    while not predicate(last := await lanes()):  # noqa: ASYNC110 (over HTTP)
                        await trio.sleep(0.02)
            except trio.TooSlowError:
                raise AssertionError(f"lanes never got there: {last}") from None

        # holders: one slow turn each, answered only when they are told to leave
        await mock.control.add_fault("slow", first_event_delay=600, count=2 * limit)
        holders_go = trio.Event()
        async with trio.open_nursery() as nursery:
            for me, hold in storm.group(proxy, 2 * limit, "holder"):
                nursery.start_soon(run_until_leave, me, hold, on_signal(holders_go, 0))
            await until(
                lambda s: (
                    s["proxy_http"]["in_use"] == limit and s["proxy_websocket"]["in_use"] == limit
                )
            )
            # waiters queue behind them, then leave while still queued
            go = trio.Event()
            waiters = storm.group(proxy, 60, "queued")
            for me, wait in waiters:
                nursery.start_soon(
                    run_until_leave, me, wait, on_signal(go, storm.rng.uniform(0, 0.3))
                )
            await until(
                lambda s: s["proxy_http"]["waiting"] == 30 and s["proxy_websocket"]["waiting"] == 30
            )
            relabel(waiters, "waiting_for_admission")
            go.set()
            # the queue empties as they leave, while the holders still hold every slot
            await until(
                lambda s: (
                    s["proxy_http"]["waiting"] == 0
                    and s["proxy_websocket"]["waiting"] == 0
                    and s["proxy_http"]["in_use"] == limit
                    and s["proxy_websocket"]["in_use"] == limit
                )
            )
            holders_go.set()
        await mock.control.clear_faults()
        await until(
            lambda s: s["proxy_http"]["in_use"] == 0 and s["proxy_websocket"]["in_use"] == 0
        )

        # clients that stop reading a huge stream but keep their sockets open
        cut = trio.Event()
        readers = [storm.new() for _ in range(2 * (limit - 1))]
        async with trio.open_nursery() as nursery:
            for index, me in enumerate(readers):
                nursery.start_soon(
                    stalled_http_reader if index % 2 else stalled_ws_reader, proxy, me, cut
                )
            await until(
                lambda s: (
                    s["proxy_http"]["in_use"] == limit - 1
                    and s["proxy_websocket"]["in_use"] == limit - 1
                )
            )
            await wait_until(lambda: all(m.stage.endswith("reading_stopped") for m in readers))
            # the proxy gives up on them by itself: their slots come back while their
            # sockets are still open
            await until(
                lambda s: s["proxy_http"]["in_use"] == 0 and s["proxy_websocket"]["in_use"] == 0
            )
            await wait_until(lambda: mock_idle(mock), seconds=SETTLE_SECONDS)
            cut.set()


async def test_abandonment_storm_leaves_nothing_behind(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    # flow: slow enough that a random moment falls in every stage of a turn
    flow_mock = await make_mock(
        MockConfig(accounts=3, deltas=12, first_event_delay=0.1, event_delay=0.01, seed=SEED)
    )
    setup_mock = await make_mock(MockConfig(accounts=3, seed=SEED))
    # huge answers (~16 MB on the wire each) for the clients that stop reading
    lanes_mock = await make_mock(MockConfig(accounts=2, deltas=4000, delta_bytes=4096, seed=SEED))
    limit = 4
    # (bridge sessions of the front conversations close after a short idle time)
    flow_proxy = await make_proxy(flow_mock, bridge_idle_ttl=2.0)
    setup_proxy = await make_proxy(setup_mock)
    lanes_proxy = await make_proxy(
        lanes_mock,
        lane_proxy_http_limit=limit,
        lane_proxy_http_wait=60,
        lane_proxy_websocket_limit=limit,
        lane_proxy_websocket_wait=60,
        stalled_client_timeout=1.5,
    )
    proxies = [flow_proxy, setup_proxy, lanes_proxy]
    mocks = [flow_mock, setup_mock, lanes_mock]
    # some upgrades take a while, so that leaving before the 101 happens often
    await flow_mock.control.add_fault("stall", on="upgrade", seconds=0.25, probability=0.5)

    # warm up every path (store connections, pools) with short answers, then close every
    # client of ours
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as http:
        for proxy in proxies:
            short = await proxy.mock.control.add_fault("slow", deltas=2, count=4)
            for _ in range(2):
                warm = Client()
                await http_client(http, proxy, warm, repeat=False)
                assert warm.stage == "http_completed", warm.stage
                await ws_client(proxy, warm, random.Random(0), turns=1)
                assert warm.stage == "ws_completed", warm.stage
            assert short["id"] not in [f["id"] for f in await proxy.mock.control.faults()]
    for proxy in proxies:
        await proxy.client.aclose()
    ledger = FdLedger(mocks, {p.port for p in proxies})
    await ledger.take_baseline()

    storm = Storm(
        random.Random(SEED), httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0))
    )
    async with storm.http, trio.open_nursery() as nursery:
        nursery.start_soon(flow, storm, flow_proxy, 120, 120, 40)
        nursery.start_soon(setup_points, storm, setup_proxy, setup_mock)
        nursery.start_soon(lane_points, storm, lanes_proxy, lanes_mock, limit)

    # every client left where it was meant to, and every point was reached by several
    counts = storm.counts()
    reached = {
        "ws_before_upgrade": 5,
        "ws_before_created": 5,
        "ws_mid_stream": 5,
        "ws_idle": 5,
        "http_before_response": 5,
        "http_mid_stream": 5,
        "chat_before_response": 3,
        "chat_mid_stream": 3,
        "messages_before_response": 3,
        "messages_mid_stream": 3,
        "during_refresh": 36,
        "during_upstream_connect": 30,
        "before_response_created": 36,
        "waiting_for_admission": 60,
        "holder_http_before_response": limit,
        "holder_ws_before_created": limit,
        "stalled_http_cut_off": limit - 1,
        "stalled_ws_cut_off": limit - 1,
    }
    print("storm:", len(storm.clients), "clients;", dict(sorted(counts.items())))
    assert len(storm.clients) >= 300
    for stage, at_least in reached.items():
        assert counts[stage] >= at_least, (stage, counts)
    # (a flow client may also leave between two turns, right after a completed one)
    between = {f"{kind}_{stage}" for kind in FRONTS for stage in ("completed", "before_content")}
    assert set(counts) <= {*reached, *between, "http_completed", "http_before_created"}, counts

    # and nothing is left behind
    async with httpx.AsyncClient() as poll:
        # (front conversations reached their continuations before their clients left)
        counters = (await poll.get(f"{flow_proxy.root}/api/stats")).json()["counters"]
        assert counters.get("continued", 0) > 0, counters
        for proxy in proxies:
            stats: dict[str, Any] = {}
            try:
                with trio.fail_after(SETTLE_SECONDS):
                    while not idle_admission(stats := await admission(poll, proxy)):  # noqa: ASYNC110
                        await trio.sleep(0.05)
            except trio.TooSlowError:
                raise AssertionError(f"gauges not back to zero: {stats}") from None
            accounts = (await poll.get(f"{proxy.root}/api/accounts")).json()["accounts"]
            assert all(a["in_flight"] == 0 for a in accounts), accounts
            assert all(a["state"] == "active" for a in accounts), accounts
    for mock in mocks:
        await wait_until(functools.partial(mock_idle, mock), seconds=SETTLE_SECONDS)
        view = await mock.control.stats()
        assert (view["in_flight"], view["http_streams_open"], view["ws_open"]) == (0, 0, 0), view
    try:
        await wait_until(ledger.settled, seconds=SETTLE_SECONDS)
    except trio.TooSlowError:
        raise AssertionError(f"descriptors did not come back: {ledger.describe()}") from None


async def test_a_connection_closed_before_its_first_request_is_released_at_once(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    # found by the storm: hypercorn's trio worker kept such a socket (in CLOSE_WAIT) until
    # its keep-alive timer ran out, 75 s; TCP health checks and scanners do this all day
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    await proxy.client.aclose()
    ledger = FdLedger([mock], {proxy.port})
    await ledger.take_baseline()
    for _ in range(5):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await trio.testing.wait_all_tasks_blocked()  # the server has taken the connection
        await stream.aclose()
    await wait_until(ledger.settled, seconds=10)


async def test_a_token_refresh_whose_clients_all_left_still_completes(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    # upstream rotates refresh tokens: once it has answered a refresh, the old one is spent.
    # A refresh cancelled with its clients would keep only the spent token, and the account
    # would need a new login.
    mock = await make_mock(MockConfig(accounts=1))
    proxy = await make_proxy(mock)
    await mock.control.patch_account("acct-mock-1", expire_tokens=True)
    await mock.control.add_fault("slow", on="token", first_event_delay=1.0, count=1)
    limits = httpx.Limits(max_keepalive_connections=0)
    storm = Storm(random.Random(SEED), httpx.AsyncClient(limits=limits))
    async with storm.http:
        group = storm.group(proxy, 10, "refresh")
        # every client is parked behind the refresh, which upstream has already carried out
        await parked_then_leave(
            storm,
            group,
            lambda: (
                mock.backend.stats.refreshes == 1
                and sum(1 for r in mock.backend.recorder.query(path=RESPONSES) if r.status == 401)
                == len(group)
            ),
            "during_refresh",
        )
        assert storm.counts() == {"during_refresh": 10}
        me = Client()
        await http_client(storm.http, proxy, me, repeat=False)
    assert me.stage == "http_completed"
    accounts = (await proxy.client.get(f"{proxy.root}/api/accounts")).json()["accounts"]
    assert [a["state"] for a in accounts] == ["active"]
    assert mock.backend.stats.refreshes == 1
