"""Fixtures for the abuse-control and web-hardening tests: the gateway's fake
remote backend and clean per-process state, and the chat's fake gateway."""
import pytest
from asgiref.sync import sync_to_async

from accounts import setup
from gateway.keys import api_key_create
from tests.conversations.conftest import fake_gateway, fast_streams, serving_api_in_process  # noqa: F401
from tests.gateway.conftest import _close_thread_connections, _fresh_gateway_state, fake_openai  # noqa: F401
from tests.gateway.helpers import add_remote, give_plan


@pytest.fixture
def slow_remote(transactional_db, fake_openai, settings):
    """The default model streams 200 tokens, one per 50 ms (10 s in all)."""
    add_remote(fake_openai, "slow", remote_model="fake-slow")
    settings.DEFAULT_POOL = "slow"
    return fake_openai


@pytest.fixture
def not_loopback():
    """As `serve` on a public address: the first sign-up is not the admin."""
    setup.set_first_signup_is_admin(False)
    yield
    setup.set_first_signup_is_admin(False)


def key_for(user) -> str:
    return api_key_create(user=user, name="test")[1]


async def akey_for(user) -> str:
    return await sync_to_async(key_for)(user)


async def aplan(user, **fields):
    return await sync_to_async(give_plan)(user, **fields)
