"""Every request the mock saw, for tests to assert what reached "upstream".

A record holds the method, path, headers, decoded body, the account it authenticated as, the
status answered and, for a WebSocket, the frames in both directions. Each WebSocket
``response.create`` also gets a record of its own (``method == "WS"``, ``parent`` = the
upgrade record), so "every model request" is one filter over HTTP and WebSocket alike.
Bounded: the oldest records are dropped past ``max_records``.
"""

from __future__ import annotations

import collections
import itertools
import json
from typing import Any

import attrs
import trio

from trioproxy.harness.mock_upstream.transport import Request

MAX_FRAMES_PER_CONNECTION = 10000


@attrs.define(eq=False)
class RequestRecord:
    id: int
    time: float
    transport: str
    method: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]
    body: Any = None
    account: str | None = None
    status: int | None = None
    error_code: str | None = None
    fault: str | None = None
    response_id: str | None = None
    parent: int | None = None
    open: bool = False
    close_code: int | None = None
    frames: list[dict[str, Any]] = attrs.field(factory=list)

    def view(self, *, frames: bool = True) -> dict[str, Any]:
        data = {
            "id": self.id,
            "time": self.time,
            "transport": self.transport,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(h) for h in self.headers],
            "body": self.body,
            "account": self.account,
            "status": self.status,
            "error_code": self.error_code,
            "fault": self.fault,
            "response_id": self.response_id,
            "parent": self.parent,
            "open": self.open,
            "close_code": self.close_code,
        }
        if frames:
            data["frames"] = self.frames
        return data


def _decode_frame(data: str | bytes) -> Any:
    if isinstance(data, bytes):
        return {"binary": data[:256].hex(), "length": len(data)}
    try:
        return json.loads(data)
    except ValueError:
        return data


@attrs.define(eq=False)
class Recorder:
    enabled: bool = True
    frames: bool = True
    max_records: int = 20000
    records: collections.deque[RequestRecord] = attrs.field(init=False)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    def __attrs_post_init__(self) -> None:
        self.records = collections.deque(maxlen=self.max_records)

    def _store(self, record: RequestRecord) -> RequestRecord:
        if self.enabled:
            self.records.append(record)
        return record

    def start(self, request: Request, transport: str) -> RequestRecord:
        """A record for a request; stored at once (control API calls are not recorded)
        and updated in place as the exchange goes on."""
        record = RequestRecord(
            id=next(self._ids),
            time=trio.current_time(),
            transport=transport,
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
        )
        if request.path.startswith("/__mock__/"):
            return record
        return self._store(record)

    def ws_message(self, parent: RequestRecord, message: str | bytes) -> RequestRecord:
        self.frame(parent, "in", message)
        return self._store(
            RequestRecord(
                id=next(self._ids),
                time=trio.current_time(),
                transport="ws",
                method="WS",
                path=parent.path,
                query=parent.query,
                headers=parent.headers,
                account=parent.account,
                parent=parent.id,
            )
        )

    def frame(self, record: RequestRecord, direction: str, data: str | bytes) -> None:
        if self.enabled and self.frames and len(record.frames) < MAX_FRAMES_PER_CONNECTION:
            record.frames.append(
                {"dir": direction, "time": trio.current_time(), "data": _decode_frame(data)}
            )

    def clear(self) -> None:
        self.records.clear()

    def query(
        self,
        *,
        path: str | None = None,
        account: str | None = None,
        transport: str | None = None,
        method: str | None = None,
        since: int = 0,
    ) -> list[RequestRecord]:
        out = []
        for record in self.records:
            if record.id <= since:
                continue
            if path is not None and record.path != path:
                continue
            if account is not None and record.account != account:
                continue
            if transport is not None and record.transport != transport:
                continue
            if method is not None and record.method != method:
                continue
            out.append(record)
        return out
