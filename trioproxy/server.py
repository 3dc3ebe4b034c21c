"""Serve the quart-trio app with hypercorn's trio worker, as a service started with
``nursery.start`` (it reports the bound port)."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from trioproxy.config import Settings
from trioproxy.logs import get_logger
from trioproxy.web.app import create_app

log = get_logger("trioproxy.server")


def _port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


async def serve_proxy(
    settings: Settings,
    *,
    shutdown_event: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until cancelled or until ``shutdown_event`` is set."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through our structured handler
    config.graceful_timeout = 5.0
    shutdown = shutdown_event if shutdown_event is not None else trio.Event()
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: hypercorn_serve(
                app,
                config,
                shutdown_trigger=shutdown.wait,
                task_status=task_status,
            )
        )
        port = _port_of(binds[0])
        log.info("serving", url=f"http://{host}:{port}", data_dir=str(settings.data_dir))
        log.warning(
            "no accounts yet",
            hint="this build serves health checks only; the account pool and "
            "`trioproxy accounts import PATH` (a Codex auth.json) are not implemented yet",
        )
        task_status.started(port)
