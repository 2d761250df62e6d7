"""Helpers shared by the gateway tests."""
from gateway import registry
from gateway.models import Backend


def add_remote(fake, name, remote_model="fake-ok", fallbacks="", **extra) -> Backend:
    backend = Backend.objects.create(
        name=name, kind=Backend.KIND_OPENAI, base_url=fake.base_url, remote_model=remote_model,
        fallbacks=fallbacks, **extra,
    )
    registry.invalidate()
    return backend


def give_plan(user, **limits):
    from gateway.models import Plan, PlanAssignment

    plan = Plan.objects.create(name=f"plan-{user.pk}-{Plan.objects.count()}", **limits)
    PlanAssignment.objects.update_or_create(user=user, defaults={"plan": plan})
    registry.invalidate()
    return plan


async def collect(request):
    """(text, final event) of one gateway call."""
    from gateway.services import stream_chat
    from gateway.types import TokenEvent

    parts, final = [], None
    async for event in stream_chat(request):
        if isinstance(event, TokenEvent):
            parts.append(event.text)
        else:
            final = event
    return "".join(parts), final
