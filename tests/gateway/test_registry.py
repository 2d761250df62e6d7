"""The registry's cache: kept long, dropped in every process when an edit commits."""
import pytest
from asgiref.sync import sync_to_async

from chatapp import runtime
from gateway import registry
from gateway.models import Plan, PlanAssignment
from tests.gateway.helpers import give_plan

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def kept(settings, monkeypatch):
    """Entries kept for minutes, as in production; the counter read at every lookup."""
    settings.GATEWAY_REGISTRY_TTL_S = 300
    monkeypatch.setattr(registry, "GENERATION_CHECK_S", 0.0)


def _counter() -> int:
    return int(runtime.redis_sync().get(registry._generation_key()) or 0)


async def test_limits_are_kept_until_another_process_announces_an_edit(kept, alice):
    plan = await sync_to_async(give_plan)(alice, requests_per_minute=7)
    assert (await registry.alimits(alice.pk)).requests_per_minute == 7
    # Written as another process (or raw SQL) would, without this process's signals.
    await sync_to_async(lambda: Plan.objects.filter(pk=plan.pk).update(requests_per_minute=9))()
    assert (await registry.alimits(alice.pk)).requests_per_minute == 7  # kept
    await runtime.redis_async().incr(registry._generation_key())  # that process's announcement
    assert (await registry.alimits(alice.pk)).requests_per_minute == 9


async def test_a_saved_plan_is_seen_here_at_once_and_announced_once_committed(kept, alice):
    plan = await sync_to_async(give_plan)(alice, requests_per_minute=7)
    assert (await registry.alimits(alice.pk)).requests_per_minute == 7
    before = await sync_to_async(_counter)()

    def edit():
        plan.requests_per_minute = 11
        plan.save()

    await sync_to_async(edit)()
    assert (await registry.alimits(alice.pk)).requests_per_minute == 11
    assert await sync_to_async(_counter)() > before


def test_an_edit_rolled_back_is_not_announced(kept, alice):
    from django.db import transaction

    plan = give_plan(alice, requests_per_minute=7)
    before = _counter()
    with pytest.raises(RuntimeError), transaction.atomic():
        plan.requests_per_minute = 11
        plan.save()
        raise RuntimeError("rolled back")
    assert _counter() == before
    assert registry.limits(alice.pk).requests_per_minute == 7


def test_deleting_an_assignment_falls_back_to_the_default_plan_everywhere(kept, alice, settings):
    give_plan(alice, requests_per_minute=7)
    assert registry.limits(alice.pk).requests_per_minute == 7
    before = _counter()
    PlanAssignment.objects.filter(user=alice).get().delete()
    assert registry.limits(alice.pk).requests_per_minute == settings.GATEWAY_DEFAULT_RPM
    assert _counter() > before


async def test_without_redis_lookups_still_answer_from_the_database(kept, alice, monkeypatch):
    await sync_to_async(give_plan)(alice, requests_per_minute=7)

    def no_redis():
        raise runtime.REDIS_ERRORS[0]("Redis is down")

    monkeypatch.setattr(runtime, "redis_async", no_redis)
    monkeypatch.setattr(runtime, "redis_sync", no_redis)
    assert (await registry.alimits(alice.pk)).requests_per_minute == 7
    assert (await registry.alimits(alice.pk)).requests_per_minute == 7
