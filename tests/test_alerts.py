"""Alerts: pool transitions become webhook events; delivery is bounded, retried, and never
holds up a request (a stalled or refused receiver does not slow the proxy)."""

from __future__ import annotations

import json
from typing import Any

import attrs
import h11
import httpx
import trio
import trio.testing

from tests.conftest import MockFactory, ProxyEnv, ProxyFactory
from tests.dashboard_support import (  # noqa: F401
    DashboardFactory,
    browser_client,
    make_dashboard,
    sign_in,
)
from tests.helpers import post_responses, request_body
from tests.quota_support import accounts, eventually
from trioproxy.accounts.alerts import AlertSender
from trioproxy.harness.mock_upstream import MockConfig


@attrs.define(eq=False)
class Receiver:
    """A webhook receiver on loopback: records JSON bodies; ``stall`` accepts and never answers."""

    stall: bool = False
    status: int = 204  # what it answers
    events: list[dict[str, Any]] = attrs.field(factory=list)
    accepted: int = 0
    port: int = 0

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        async with stream:
            if self.stall:
                await trio.sleep_forever()
            conn = h11.Connection(h11.SERVER)
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some())
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            self.events.append(json.loads(body))
            reply = conn.send(
                h11.Response(
                    status_code=self.status,
                    headers=[("connection", "close"), ("content-length", "0")],
                )
            )
            await stream.send_all((reply or b"") + (conn.send(h11.EndOfMessage()) or b""))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]


async def test_exhausted_and_recovered_events_for_accounts_and_the_pool(
    nursery: trio.Nursery, make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    receiver = Receiver()
    await nursery.start(receiver.serve)
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, alert_webhook_url=receiver.url)
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=4)
    await mock.control.patch_account("acct-mock-2", exhaust="primary", resets_in=5)
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 429  # both accounts answered 429

    async def all_back() -> bool:
        kinds = receiver.kinds()
        return kinds.count("account.recovered") == 2 and "pool.recovered" in kinds

    await eventually(all_back, seconds=20)
    kinds = receiver.kinds()
    assert sorted(kinds[:3]) == ["account.exhausted", "account.exhausted", "pool.exhausted"]
    assert kinds.index("pool.recovered") > kinds.index("pool.exhausted")
    exhausted = [e for e in receiver.events if e["event"] == "account.exhausted"]
    assert {e["account_id"] for e in exhausted} == {"acct-mock-1", "acct-mock-2"}
    assert all(e["until"] for e in exhausted)
    pool = next(e for e in receiver.events if e["event"] == "pool.exhausted")
    assert pool["accounts"] == 2 and pool["earliest_reset"] == min(e["until"] for e in exhausted)
    stats = (await proxy.client.get(proxy.root + "/api/alerts")).json()
    assert stats["sent"] == len(receiver.events) and stats["dropped"] == 0


async def test_reauth_required_and_deactivated_events(
    nursery: trio.Nursery, make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    receiver = Receiver()
    await nursery.start(receiver.serve)
    mock = await make_mock(MockConfig(accounts=3))
    proxy = await make_proxy(mock, alert_webhook_url=receiver.url, routing_strategy="fill_first")
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True, refresh_mode="invalidated")
    await mock.control.patch_account("acct-mock-2", deactivated=True)
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200  # served by acct-mock-3

    async def both() -> bool:
        return {"account.reauth_required", "account.deactivated"} <= set(receiver.kinds())

    await eventually(both)
    by_kind = {e["event"]: e for e in receiver.events}
    assert by_kind["account.reauth_required"]["account_id"] == "acct-mock-1"
    assert by_kind["account.reauth_required"]["command"] == "trioproxy accounts login --device"
    assert by_kind["account.reauth_required"]["fix"] == (
        "run `trioproxy accounts login --device` and sign in as user1@mock.example;"
        " it updates the account in place"
    )
    assert "command" not in by_kind["account.deactivated"]
    assert by_kind["account.deactivated"]["account_id"] == "acct-mock-2"
    assert "deactivated" in by_kind["account.deactivated"]["reason"]
    assert "pool.exhausted" not in receiver.kinds()


async def test_a_stalled_receiver_does_not_hold_up_requests(
    nursery: trio.Nursery, make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    receiver = Receiver(stall=True)
    await nursery.start(receiver.serve)
    mock = await make_mock(MockConfig(accounts=2))
    # one attempt may hang for 10 minutes: the whole test runs inside it
    proxy = await make_proxy(mock, alert_webhook_url=receiver.url, alert_timeout=600)
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=3600)
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200  # failed over to acct-mock-2; an alert is due

    async def delivery_hanging() -> bool:
        stats = (await proxy.client.get(proxy.root + "/api/alerts")).json()
        return bool(receiver.accepted == 1 and stats["attempts"] == 1)

    await eventually(delivery_hanging)
    for _ in range(10):
        response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        assert response.status_code == 200
    stats = (await proxy.client.get(proxy.root + "/api/alerts")).json()
    assert (stats["attempts"], stats["sent"], receiver.accepted) == (1, 0, 1)  # still hanging
    assert (await accounts(proxy))["acct-mock-1"]["state"] == "exhausted"


async def test_a_refused_receiver_does_not_hold_up_requests(
    make_mock: MockFactory, make_proxy: ProxyFactory
) -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_proxy(mock, alert_webhook_url=f"http://127.0.0.1:{port}/hook")
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=3600)
    for _ in range(5):
        response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
        assert response.status_code == 200

    async def attempted() -> bool:
        return bool((await proxy.client.get(proxy.root + "/api/alerts")).json()["attempts"] >= 1)

    await eventually(attempted)
    assert (await proxy.client.get(proxy.root + "/api/alerts")).json()["sent"] == 0


async def test_the_queue_is_bounded_and_drops_the_oldest() -> None:
    sender = AlertSender("http://127.0.0.1:9/hook", None, max_queue=3)
    for n in range(5):
        sender.emit({"event": "account.exhausted", "n": n})
    stats = sender.statistics()
    assert (stats.queued, stats.dropped, stats.emitted) == (3, 2, 5)
    recent = sender.recent()  # newest first; what was pushed out says so
    assert [(a["details"]["n"], a["delivery"]) for a in recent] == [
        (4, "pending"),
        (3, "pending"),
        (2, "pending"),
        (1, "dropped"),
        (0, "dropped"),
    ]


async def test_the_recent_alerts_are_bounded_and_marked_not_sent_without_a_webhook() -> None:
    sender = AlertSender(None, None, max_recent=3)
    for n in range(5):
        sender.emit({"event": "pool.recovered", "time": 1_700_000_000 + n, "accounts": 2})
    recent = sender.recent()
    assert [a["time"] for a in recent] == [1_700_000_004, 1_700_000_003, 1_700_000_002]
    assert {a["delivery"] for a in recent} == {"not_sent"}
    assert recent[0]["summary"] == "an account in rotation has quota again"
    assert sender.statistics().emitted == 5


async def test_delivery_is_retried_with_backoff_then_given_up(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    attempts: list[float] = []
    answers = [500, 503, 204, 500, 500, 500, 500]

    def hook(request: httpx.Request) -> httpx.Response:
        attempts.append(trio.current_time())
        return httpx.Response(answers.pop(0))

    async with httpx.AsyncClient(transport=httpx.MockTransport(hook)) as http:
        sender = AlertSender("http://hook.test/", http, retries=3, backoff=1.0)
        await nursery.start(sender.run)
        start = trio.current_time()
        sender.emit({"event": "pool.exhausted"})
        sender.emit({"event": "pool.recovered"})
        await trio.sleep(60)
        assert [t - start for t in attempts] == [0, 1, 3, 3, 4, 6, 10]
        stats = sender.statistics()
        assert (stats.sent, stats.failed, stats.attempts, stats.queued) == (1, 1, 7, 0)
        newest, oldest = sender.recent()
        assert (newest["event"], newest["delivery"], newest["attempts"]) == (
            "pool.recovered",
            "failed",
            4,
        )
        assert newest["last_error"] == "status 500"
        assert (oldest["delivery"], oldest["attempts"]) == ("delivered", 3)
        nursery.cancel_scope.cancel()


async def alerts_page(proxy: ProxyEnv) -> str:
    async with browser_client(proxy) as client:
        assert (await sign_in(client)).status_code == 303
        page = await client.get("/dashboard/alerts")
        assert page.status_code == 200
        return page.text


async def test_recent_alerts_with_their_delivery_over_the_api_and_on_the_page(
    nursery: trio.Nursery,
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    receiver = Receiver()
    await nursery.start(receiver.serve)
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_dashboard(
        mock, alert_webhook_url=receiver.url, routing_strategy="fill_first"
    )
    await mock.control.patch_account("acct-mock-1", exhaust="primary", resets_in=3600)
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200  # acct-mock-2 served it

    async def delivered() -> bool:
        recent = (await proxy.client.get(proxy.root + "/api/alerts")).json()["recent"]
        return bool(recent) and recent[0]["delivery"] == "delivered"

    await eventually(delivered)
    body = (await proxy.client.get(proxy.root + "/api/alerts")).json()
    assert (body["emitted"], body["sent"], body["webhook_configured"]) == (1, 1, True)
    [alert] = body["recent"]
    assert alert["event"] == "account.exhausted" and alert["account_id"] == "acct-mock-1"
    assert alert["details"] == receiver.events[0]
    assert (alert["attempts"], alert["last_error"]) == (1, None)
    assert alert["time"] == receiver.events[0]["time"]
    assert alert["summary"].startswith("user1@mock.example ran out of quota until ")
    page = await alerts_page(proxy)
    assert 'data-event="account.exhausted" data-delivery="delivered"' in page
    assert "user1@mock.example ran out of quota until" in page


async def test_an_alert_the_webhook_refuses_is_listed_as_failed_with_its_error(
    nursery: trio.Nursery,
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    receiver = Receiver(status=500)
    await nursery.start(receiver.serve)
    mock = await make_mock(MockConfig(accounts=3))
    proxy = await make_dashboard(
        mock, alert_webhook_url=receiver.url, routing_strategy="fill_first"
    )
    await mock.control.patch_account("acct-mock-1", deactivated=True)
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200

    async def given_up() -> bool:  # 4 attempts, 1 + 2 + 4 s apart
        recent = (await proxy.client.get(proxy.root + "/api/alerts")).json()["recent"]
        return bool(recent) and recent[0]["delivery"] == "failed"

    await eventually(given_up, seconds=30)
    body = (await proxy.client.get(proxy.root + "/api/alerts")).json()
    [alert] = body["recent"]
    assert alert["event"] == "account.deactivated" and alert["account_id"] == "acct-mock-1"
    assert (alert["attempts"], alert["last_error"]) == (4, "status 500")
    assert (body["failed"], body["sent"], receiver.accepted) == (1, 0, 4)
    page = await alerts_page(proxy)
    assert 'data-event="account.deactivated" data-delivery="failed"' in page
    assert "last error: status 500" in page and "4 attempts" in page


async def test_without_a_webhook_alerts_are_listed_as_not_sent(
    make_mock: MockFactory,
    make_dashboard: DashboardFactory,  # noqa: F811
) -> None:
    mock = await make_mock(MockConfig(accounts=2))
    proxy = await make_dashboard(mock, routing_strategy="fill_first")
    await mock.control.patch_account("acct-mock-1", revoke_tokens=True, refresh_mode="invalidated")
    response, _ = await post_responses(proxy.client, proxy.codex_url, {}, request_body())
    assert response.status_code == 200

    async def listed() -> bool:
        return bool((await proxy.client.get(proxy.root + "/api/alerts")).json()["recent"])

    await eventually(listed)
    body = (await proxy.client.get(proxy.root + "/api/alerts")).json()
    assert body["webhook_configured"] is False
    [alert] = body["recent"]
    assert (alert["event"], alert["delivery"], alert["attempts"]) == (
        "account.reauth_required",
        "not_sent",
        0,
    )
    assert "trioproxy accounts login --device" in alert["summary"]
    page = await alerts_page(proxy)
    assert "not sent (no webhook)" in page and "No webhook is configured" in page
