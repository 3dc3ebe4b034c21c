"""A mock of the ChatGPT Codex backend and its OAuth server, for tests, benchmarks and users.

Start it inside a nursery; it reports its bound port::

    backend = MockBackend(MockConfig(accounts=3))
    port = await nursery.start(serve_mock, backend, "127.0.0.1", 0)
"""

from __future__ import annotations

import functools

import trio

from trioproxy.harness.mock_upstream.backend import MockBackend, MockConfig
from trioproxy.harness.mock_upstream.faults import (
    Fault,
    FaultSpecError,
    fault_from_dict,
    parse_fault_spec,
)
from trioproxy.harness.mock_upstream.routes import handle
from trioproxy.harness.mock_upstream.transport import serve_listeners

__all__ = [
    "Fault",
    "FaultSpecError",
    "MockBackend",
    "MockConfig",
    "fault_from_dict",
    "parse_fault_spec",
    "serve_mock",
]


async def serve_mock(
    backend: MockBackend,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``backend`` on ``host:port`` until cancelled; report the bound port.

    Several listeners may share one backend (the Codex CLI needs its ChatGPT base URL on a
    different origin from its model base URL)."""
    backend.ensure_accounts()
    await serve_listeners(
        functools.partial(handle, backend),
        host,
        port,
        track=backend.connection,
        task_status=task_status,
    )
