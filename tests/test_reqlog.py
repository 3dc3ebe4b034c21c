"""The request log never loses a record, even when shutdown cancels a write in waiting."""

from __future__ import annotations

import threading
from pathlib import Path

import trio
import trio.testing

from trioproxy.reqlog import RequestLog, RequestRecord
from trioproxy.store import Store


def record(n: int) -> RequestRecord:
    return RequestRecord(
        float(n), f"req_{n}", "/backend-api/codex/responses", "http", started=0.0, status=200
    )


async def test_a_batch_waiting_for_the_store_survives_cancellation(tmp_path: Path) -> None:
    store = Store.open(
        f"sqlite:///{tmp_path / 'log.db'}", data_dir=tmp_path
    )  # SQLite: one writer thread
    try:
        log = RequestLog(store)
        gate = threading.Event()
        async with trio.open_nursery() as outer:
            # occupy the store's only thread slot, so the writer's next write has to wait
            outer.start_soon(store.run, gate.wait)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as nursery:
                await nursery.start(log.run)
                for n in range(3):
                    log.emit(record(n))
                await trio.testing.wait_all_tasks_blocked()  # the writer holds the batch, waiting
                log.emit(record(3))  # and one more still queued
                nursery.cancel_scope.cancel()  # shutdown
                gate.set()  # the slot frees while the writer drains, shielded
        rows = store.recent_requests(10)
        assert sorted(r["request_id"] for r in rows) == ["req_0", "req_1", "req_2", "req_3"]
        assert log.written == 4
    finally:
        store.close()
