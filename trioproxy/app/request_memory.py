"""What a client's request costs in memory while the proxy works on it, charged to the
server's request-memory budget (``web/budget.py``): an HTTP body's parse, a WebSocket
message from the moment it is queued to the end of its turn.

The server puts its budget into every ASGI scope; :func:`request_memory` opens a reservation
on it for as long as its ``with`` block lasts (a request, a WebSocket session), and
:func:`charge` grows it, turning a budget that cannot take the cost into the proxy's
answers: ``429 proxy_overloaded`` (``x-trioproxy-overload: memory``) when it cannot now,
``413 payload_too_large`` when it never could. Under a server without a budget (hypercorn)
nothing is charged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from trioproxy.admission import Overloaded
from trioproxy.protocol.errors import ProxyError
from trioproxy.web.asgi import Scope
from trioproxy.web.budget import BudgetFull, ByteBudget, Reservation
from trioproxy.web.connection import MEMORY_EXTENSION


def scope_budget(scope: Scope) -> ByteBudget | None:
    """The server's request-memory budget, from a request's scope; None under a server
    without one."""
    budget = scope.get("extensions", {}).get(MEMORY_EXTENSION)
    return budget if isinstance(budget, ByteBudget) else None


@contextmanager
def request_memory(scope: Scope) -> Iterator[Reservation | None]:
    """A reservation on the server's request-memory budget, given back when the block
    ends; None under a server without a budget."""
    budget = scope_budget(scope)
    if budget is None:
        yield None
        return
    with budget.reserve() as reservation:
        yield reservation


def charge(memory: Reservation | None, cost: int, retry_after: int) -> None:
    """Take ``cost`` more bytes; ``Overloaded("memory")`` when the budget cannot hold them
    now, ``ProxyError(413)`` when it never could."""
    if memory is None:
        return
    try:
        memory.grow(cost)
    except BudgetFull as exc:
        if cost > exc.limit:
            raise ProxyError.of(
                413,
                f"Parsing this request would take about {cost} bytes of memory, more than "
                f"the proxy holds for all requests ({exc.limit} bytes).",
                "payload_too_large",
            ) from None
        raise Overloaded("memory", exc.limit, retry_after) from None
