"""The arithmetic of a ledger row's cost and savings (gateway.pricing)."""
from decimal import Decimal

from gateway.pricing import Price, costs
from gateway.types import Usage

TOKENS = Price(basis="tokens", prompt_per_1k=Decimal("0.5"), cached_prompt_per_1k=Decimal("0.1"),
               completion_per_1k=Decimal("1.5"))
LARGE = Price(basis="tokens", prompt_per_1k=Decimal("3"), completion_per_1k=Decimal("6"))
HARDWARE = Price(basis="hardware", hardware_per_hour=Decimal("3.6"))
PRICES = {"small": TOKENS, "large": LARGE, "gpu": HARDWARE}


def test_token_prices_charge_uncached_and_cached_prompt_and_completion():
    result = costs(PRICES, backend="small", usage=Usage(1000, 2000, cached_tokens=400), cache_hit="",
                   generation_s=1.0)
    # 600 × 0.5 + 400 × 0.1 + 2000 × 1.5, per 1k
    assert result.cost == Decimal("3.34")
    assert result.saved_prefix == Decimal("0.16")  # 400 × (0.5 − 0.1) / 1k
    assert result.saved_cache == 0 and result.saved_routing == 0


def test_hardware_time_is_price_per_hour_times_generation_seconds():
    result = costs(PRICES, backend="gpu", usage=Usage(1000, 2000), cache_hit="", generation_s=2.5)
    assert result.cost == Decimal("0.0025")  # 3.6 / 3600 × 2.5


def test_a_cache_hit_costs_nothing_and_saves_what_generating_would_have_cost():
    result = costs(PRICES, backend="small", usage=Usage(1000, 2000, cached_tokens=3000), cache_hit="exact",
                   generation_s=None)
    assert result.cost == 0 and result.saved_cache == Decimal("3.5")


def test_routing_away_from_large_saves_the_difference():
    result = costs(PRICES, backend="small", usage=Usage(1000, 1000), cache_hit="", generation_s=1.0,
                   routed_from="large")
    assert result.cost == Decimal("2") and result.saved_routing == Decimal("7")


def test_an_unpriced_model_costs_nothing():
    assert costs(PRICES, backend="remote", usage=Usage(10, 10), cache_hit="", generation_s=1.0).cost == 0
