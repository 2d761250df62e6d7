"""Every ledger row carries its cost, priced in the finish stage from the admin's prices."""
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from gateway import registry
from gateway.models import ModelPrice, UsageRecord
from gateway.types import ChatRequest
from tests.conftest import tiny_smollm2_engine
from tests.gateway.helpers import collect


def ask(user, text="what is the capital of France", max_tokens=20, **extra):
    return ChatRequest(messages=[{"role": "user", "content": text}], user_id=user.pk, temperature=0.0,
                       max_tokens=max_tokens, **extra)


async def price(model, **fields):
    await ModelPrice.objects.acreate(model=model, **fields)
    registry.invalidate()


async def test_a_remote_reply_is_priced_per_1k_tokens_and_a_cache_hit_costs_nothing(remote, alice):
    await price("remote", prompt_per_1k=Decimal("2"), completion_per_1k=Decimal("4"))
    _, first = await collect(ask(alice))
    _, hit = await collect(ask(alice))
    assert hit.cache_hit == "exact"
    generated, cached = [r async for r in UsageRecord.objects.order_by("created_at")]
    expected = (Decimal(first.usage.prompt_tokens) * 2 + Decimal(first.usage.completion_tokens) * 4) / 1000
    assert generated.cost == expected > 0
    assert generated.itl_ms is not None and generated.itl_ms >= 0 and generated.generation_ms is not None
    assert cached.cost == 0 and cached.saved_cache == expected
    assert cached.itl_ms is None


async def test_an_unpriced_model_is_ledgered_at_zero(remote, alice):
    await collect(ask(alice))
    row = await UsageRecord.objects.aget()
    assert row.cost == 0 and row.prompt_tokens > 0


@pytest.fixture(scope="module")
def hw_engine(smollm2_dir):
    from chatapp import runtime

    engine = tiny_smollm2_engine(smollm2_dir, kv_cache_mb=16, model_name="hw-pool")
    runtime.register_engine("hw-pool", engine)
    yield engine
    runtime.unregister_engine("hw-pool")
    engine.shutdown()


async def test_a_local_pool_priced_by_hardware_time_charges_price_per_hour_times_generation_seconds(
        hw_engine, transactional_db, settings, alice):
    settings.MODEL_POOLS = {"hw-pool": {"model": "tiny"}}
    settings.DEFAULT_POOL = "hw-pool"
    await price("hw-pool", basis=ModelPrice.BASIS_HARDWARE, hardware_per_hour=Decimal("36"))
    _, final = await collect(ask(alice, model="hw-pool", max_tokens=8))
    assert final.finish_reason in ("stop", "length")
    row = await UsageRecord.objects.aget()
    assert row.generation_ms is not None and row.generation_ms <= row.duration_ms
    # 36 per hour is 0.01 per second; the row keeps the exact seconds, its millisecond copy rounds down.
    assert Decimal(row.generation_ms) / 100_000 <= row.cost <= Decimal(row.generation_ms + 1) / 100_000
    assert row.cost > 0 and row.saved_prefix == 0


def test_a_hardware_price_is_refused_for_a_remote_model(db):
    price = ModelPrice(model="remote-x", basis=ModelPrice.BASIS_HARDWARE, hardware_per_hour=Decimal("1"))
    with pytest.raises(Exception, match="local engine pools"):
        price.full_clean()


def test_the_usage_page_shows_spend_by_day_and_by_model(alice_client, alice, bob):
    now = timezone.now()
    rows = [("small", "0.25", now), ("small", "0.5", now), ("large", "2", now), ("large", "1", now - timedelta(days=1))]
    for model, cost, when in rows:
        record = UsageRecord.objects.create(user=alice, request_id="r", source="chat", model="", backend=model,
                                            route="default", status="stop", cost=Decimal(cost))
        UsageRecord.objects.filter(pk=record.pk).update(created_at=when)
    UsageRecord.objects.create(user=bob, request_id="b", source="chat", backend="large", route="", status="stop",
                               cost=Decimal("100"))
    html = alice_client.get("/settings/usage/").content.decode()
    assert "3.7500 USD" in html  # alice's total; bob's 100 is not hers
    day = html.split('class="usage-spend-day"')[1].split("</table>")[0]
    assert f"<td>{now:%Y-%m-%d}</td>" in day and "2.7500" in day and "1.0000" in day
    by_model = html.split('class="usage-spend-model"')[1].split("</table>")[0]
    assert by_model.index("large") < by_model.index("small")  # largest spend first
    assert "3.0000" in by_model and "0.7500" in by_model
