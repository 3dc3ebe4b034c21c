"""The price table: estimated cost of a request from its token counts (sans-IO).

Prices are US dollars per million tokens (input, cached input, output), OpenAI's list
prices for API use of each model. ChatGPT accounts are not billed per token: the cost is an
estimate of what the same traffic would cost on the API, for comparing keys and setting
budgets in money. Reasoning tokens are output tokens and are priced as such.

A model is looked up by its exact name, else by the longest entry that is a prefix of it
followed by ``-`` (``gpt-5.5-codex`` falls back to ``gpt-5.5``); a model with no price is
counted in tokens only (its cost is 0 and budgets in ``cost_usd`` do not see it).

The operator's ``prices`` option adds or replaces entries:
``"gpt-5.5=5/0.5/30, my-model=1.25/0.125/10"`` (input/cached input/output per million).
"""

from __future__ import annotations

import math

import attrs


@attrs.frozen
class Price:
    input: float
    cached_input: float
    output: float

    def cost(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> float:
        """US dollars for one request (``cached_tokens`` are part of ``input_tokens``)."""
        cached = min(max(cached_tokens, 0), max(input_tokens, 0))
        fresh = max(input_tokens, 0) - cached
        return (
            fresh * self.input + cached * self.cached_input + max(output_tokens, 0) * self.output
        ) / 1_000_000


#: list prices per million tokens as published by OpenAI (checked 2026-11)
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5.5": Price(5.00, 0.50, 30.00),
    "gpt-5.4": Price(2.50, 0.25, 15.00),
    "gpt-5.4-mini": Price(0.75, 0.075, 4.50),
    "gpt-5.4-nano": Price(0.20, 0.02, 1.25),
    "gpt-5.3-codex": Price(1.75, 0.175, 14.00),
    "gpt-5.2-codex": Price(1.75, 0.175, 14.00),
    "gpt-5.2": Price(1.75, 0.175, 14.00),
    "gpt-5.1-codex-max": Price(1.25, 0.125, 10.00),
    "gpt-5.1-codex": Price(1.25, 0.125, 10.00),
    "gpt-5.1": Price(1.25, 0.125, 10.00),
    "gpt-5-codex": Price(1.25, 0.125, 10.00),
    "gpt-5": Price(1.25, 0.125, 10.00),
}


def parse_prices(text: str) -> dict[str, Price]:
    """The ``prices`` option: ``model=input/cached/output`` entries, comma-separated.
    A ValueError names the entry that cannot be read."""
    prices: dict[str, Price] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        model, _, figures = entry.partition("=")
        parts = figures.split("/")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if (
            not model.strip()
            or len(values) != 3
            or not all(math.isfinite(v) and v >= 0 for v in values)
        ):
            raise ValueError(
                f"price entry {entry!r} is not model=input/cached_input/output "
                "(US dollars per million tokens, each >= 0)"
            )
        prices[model.strip()] = Price(*values)
    return prices


@attrs.define(eq=False)
class PriceTable:
    """The default prices with the operator's entries on top; lookups are cached."""

    prices: dict[str, Price] = attrs.field(factory=lambda: dict(DEFAULT_PRICES))
    _cache: dict[str, Price | None] = attrs.field(factory=dict)

    @classmethod
    def with_overrides(cls, text: str) -> PriceTable:
        return cls({**DEFAULT_PRICES, **parse_prices(text)})

    def price(self, model: str | None) -> Price | None:
        if not model:
            return None
        if model in self._cache:
            return self._cache[model]
        found = self.prices.get(model)
        if found is None:
            prefixes = [m for m in self.prices if model.startswith(m + "-")]
            found = self.prices[max(prefixes, key=len)] if prefixes else None
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[model] = found
        return found

    def cost(self, model: str | None, input_tokens: int, cached: int, output: int) -> float:
        price = self.price(model)
        return 0.0 if price is None else price.cost(input_tokens, cached, output)

    def as_json(self) -> dict[str, dict[str, float]]:
        return {
            model: {"input": p.input, "cached_input": p.cached_input, "output": p.output}
            for model, p in sorted(self.prices.items())
        }
