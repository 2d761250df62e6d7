import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from gateway import backends, registry
from gateway.models import Backend
from tests.gateway.fake_openai import FakeOpenAI


@pytest.fixture(scope="session")
def fake_openai():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_gateway_state(settings):
    """Registry and circuit breakers are per process: start every test clean."""
    settings.GATEWAY_REGISTRY_TTL_S = 0
    registry.invalidate()
    backends.reset_circuits()
    yield
    registry.invalidate()
    backends.reset_circuits()


@pytest.fixture(autouse=True)
async def _close_async_connections():
    yield
    # Async ORM calls run on asgiref's worker thread, whose connection would
    # otherwise stay open and block dropping the test database.
    await sync_to_async(connections.close_all)()


def add_remote(fake, name, remote_model="fake-ok", fallbacks="", **extra) -> Backend:
    backend = Backend.objects.create(
        name=name, kind=Backend.KIND_OPENAI, base_url=fake.base_url, remote_model=remote_model,
        fallbacks=fallbacks, **extra,
    )
    registry.invalidate()
    return backend


@pytest.fixture
def remote(transactional_db, fake_openai, settings):
    """A healthy remote backend named 'remote', the default model."""
    add_remote(fake_openai, "remote")
    settings.DEFAULT_POOL = "remote"
    return fake_openai


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
