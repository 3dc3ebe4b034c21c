"""The model catalog served at ``GET /backend-api/codex/models``, per plan."""

from __future__ import annotations

import copy
from typing import Any

# slug -> plans that may use it (None = every plan)
_CATALOG: list[tuple[dict[str, Any], frozenset[str] | None]] = []


def _model(slug: str, display: str, priority: int) -> dict[str, Any]:
    return {
        "slug": slug,
        "display_name": display,
        "description": f"{display} (mock backend)",
        "priority": priority,
        "visibility": "list",
        "supported_in_api": True,
    }


_CATALOG = [
    (_model("gpt-5.5", "GPT-5.5", 1), None),
    (_model("gpt-5.5-mini", "GPT-5.5 mini", 2), None),
    (
        _model("gpt-6-astra", "GPT-6 Astra", 3),
        frozenset({"pro", "team", "business", "enterprise", "plus"}),
    ),
]


def models_for_plan(plan: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(m) for m, plans in _CATALOG if plans is None or plan in plans]
