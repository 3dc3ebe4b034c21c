"""The model catalog served at ``GET /backend-api/codex/models``, per plan.

Entries carry every field the Codex CLI 0.169.0 requires to accept a catalog entry (slug,
display_name, supported_reasoning_levels, shell_type, visibility, supported_in_api, priority,
support_verbosity, truncation_policy, experimental_supported_tools, and base_instructions);
an entry missing one of them is silently dropped by the CLI.
"""

from __future__ import annotations

import copy
from typing import Any

_LEVELS = [
    {"effort": "low", "description": "Fast responses with lighter reasoning"},
    {"effort": "medium", "description": "Balances speed and reasoning depth for everyday tasks"},
    {"effort": "high", "description": "Greater reasoning depth for complex problems"},
    {"effort": "xhigh", "description": "Extra high reasoning depth for complex problems"},
]
ALL_PLANS = None


def _model(slug: str, display: str, priority: int, *, lite: bool = False) -> dict[str, Any]:
    return {
        "slug": slug,
        "display_name": display,
        "description": f"{display} served by the trioproxy mock backend.",
        "default_reasoning_level": "medium",
        "supported_reasoning_levels": copy.deepcopy(_LEVELS),
        "shell_type": "unified_exec",
        "visibility": "list",
        "supported_in_api": True,
        "priority": priority,
        "support_verbosity": True,
        "default_verbosity": "low",
        "truncation_policy": {"mode": "tokens", "limit": 10000},
        "experimental_supported_tools": [],
        "context_window": 272000,
        "input_modalities": ["text", "image"],
        "use_responses_lite": lite,
        "base_instructions": "You are Codex, served by the trioproxy mock backend.",
    }


# (entry, plans that may use it; None = every plan)
_CATALOG: list[tuple[dict[str, Any], frozenset[str] | None]] = [
    (_model("gpt-5.5", "GPT-5.5", 1), ALL_PLANS),
    (_model("gpt-5.5-mini", "GPT-5.5 mini", 2), ALL_PLANS),
    (
        _model("gpt-6-astra", "GPT-6 Astra", 3, lite=True),
        frozenset({"plus", "pro", "team", "business", "enterprise", "edu"}),
    ),
]


def models_for_plan(plan: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(m) for m, plans in _CATALOG if plans is None or plan in plans]
