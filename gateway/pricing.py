"""What a request cost, and what the caches and the router saved (issue 15).

Pure arithmetic on a ledger row's usage: the finish stage
(`services._Run.settle`) calls `costs` with the prices the registry keeps.

- Token basis: uncached prompt tokens × prompt price + prefix-cached prompt
  tokens × cached price + completion tokens × completion price (per 1k).
- Hardware basis (local pools): price per hour × the seconds the backend
  spent on the request (open to last event). A batched engine serves many
  requests in the same seconds, so this is an upper bound per request.
- A cache hit costs 0; `saved_cache` is what generating it would have cost
  (token basis only: a hit has no generation time to price).
- `saved_prefix`: prefix-cached prompt tokens × (prompt − cached price).
- `saved_routing`: a request that named no model and was routed away from
  `large` saves what `large` would have charged for the same tokens, less
  what it did cost (when `large` is token-priced).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from gateway.types import Usage

ZERO = Decimal(0)
QUANTUM = Decimal("0.000000001")  # the ledger's 9 decimal places
_THOUSAND = Decimal(1000)
_HOUR_S = Decimal(3600)


@dataclass(frozen=True)
class Price:
    basis: str  # "tokens" | "hardware" (ModelPrice.BASES)
    prompt_per_1k: Decimal = ZERO
    cached_prompt_per_1k: Decimal = ZERO
    completion_per_1k: Decimal = ZERO
    hardware_per_hour: Decimal = ZERO

    @property
    def per_token(self) -> bool:
        return self.basis == "tokens"

    def tokens_cost(self, *, prompt: int, cached: int, completion: int) -> Decimal:
        cached = min(max(cached, 0), prompt)
        return (
            (prompt - cached) * self.prompt_per_1k
            + cached * self.cached_prompt_per_1k
            + completion * self.completion_per_1k
        ) / _THOUSAND


@dataclass(frozen=True)
class Costs:
    cost: Decimal = ZERO
    saved_cache: Decimal = ZERO
    saved_prefix: Decimal = ZERO
    saved_routing: Decimal = ZERO

    def as_fields(self) -> dict:
        return {name: value.quantize(QUANTUM) for name, value in self.__dict__.items()}


def costs(prices: dict[str, Price], *, backend: str, usage: Usage, cache_hit: str,
          generation_s: float | None, routed_from: str | None = None) -> Costs:
    """The cost of one ledger row. `routed_from`: the model the router would
    have escalated to (its price is the routing saving's reference)."""
    price = prices.get(backend)
    if price is None:
        return Costs()
    if cache_hit:
        if not price.per_token:
            return Costs()
        return Costs(saved_cache=price.tokens_cost(prompt=usage.prompt_tokens, cached=0,
                                                   completion=usage.completion_tokens))
    if price.per_token:
        cost = price.tokens_cost(prompt=usage.prompt_tokens, cached=usage.cached_tokens,
                                 completion=usage.completion_tokens)
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        saved_prefix = max(ZERO, cached * (price.prompt_per_1k - price.cached_prompt_per_1k) / _THOUSAND)
    else:
        cost = price.hardware_per_hour * Decimal(str(max(generation_s or 0.0, 0.0))) / _HOUR_S
        saved_prefix = ZERO  # the time the prefix cache saved is already absent from the bill
    saved_routing = ZERO
    reference = prices.get(routed_from) if routed_from and routed_from != backend else None
    if reference is not None and reference.per_token:
        would = reference.tokens_cost(prompt=usage.prompt_tokens, cached=usage.cached_tokens,
                                      completion=usage.completion_tokens)
        saved_routing = max(ZERO, would - cost)
    return Costs(cost=cost, saved_prefix=saved_prefix, saved_routing=saved_routing)
