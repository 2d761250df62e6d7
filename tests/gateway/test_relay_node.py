"""A relay node: no local pools (MODEL_POOLS_JSON='{}'), every model a remote
backend, as the web tier in front of vLLM or llama.cpp servers runs.

A chat that names no model, the API's `auto`, and the background tasks all
land on a backend the registry serves, even when DEFAULT_POOL still names the
local pool of an earlier configuration; with no model at all, a reply fails
with a clear error instead of naming a pool that was never there.
"""
import pytest

from conversations import tasks as conversation_tasks
from conversations import turns
from gateway import client as gateway_client
from gateway import registry
from gateway.types import ChatRequest, ModelNotFound
from memory import tasks as memory_tasks
from tests.conversations.conftest import events_of, load, new_reply, open_stream, read_stream, text_of
from tests.conversations.conftest import serving_api_in_process  # noqa: F401 (a fixture)
from tests.gateway.helpers import add_remote, collect

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def relay_node(settings, fake_openai):
    settings.MODEL_POOLS = {}
    settings.GATEWAY_BACKENDS = {"vllm": {"base_url": fake_openai.base_url, "model": "fake-ok"}}
    settings.DEFAULT_POOL = "small"  # left over from a configuration with a local pool
    settings.STREAM_HEARTBEAT_S = 0.2
    settings.STREAM_MATERIALIZE_S = 0.05
    settings.CELERY_TASK_ALWAYS_EAGER = True
    registry.invalidate()
    return fake_openai


def test_the_default_model_is_a_backend_the_node_serves(relay_node, alice_client):
    gateway = gateway_client.current()
    assert gateway.default_model() == "vllm"
    assert gateway.background_model() == "vllm"
    assert gateway.model_info().name == "vllm"
    assert gateway.count_prompt_tokens([{"role": "user", "content": "hello there"}]) > 0
    page = alice_client.get("/").content.decode()
    assert "default (vllm)" in page and "Replies are written by vllm" in page
    assert "small" not in page


async def test_a_chat_that_names_no_model_is_relayed_to_the_backend(relay_node, alice):
    reply = await new_reply(alice, "hello relay")
    turns.start_reply(reply.id)
    _, raw = await read_stream(open_stream(reply.id, user=alice), timeout_s=30)
    done = events_of(raw)[-1]
    assert done["event"] == "done" and done["data"]["status"] == "complete", done
    stored = await load(reply.id)
    assert stored.model == "vllm"
    assert stored.content == text_of(raw) == "echo: hello relay"
    assert relay_node.requests[-1]["model"] == "fake-ok"


async def test_auto_on_the_api_path_is_relayed_to_the_backend(relay_node):
    text, final = await collect(ChatRequest(messages=[{"role": "user", "content": "hi there"}], model="auto"))
    assert final.finish_reason == "stop" and final.model == "vllm"
    assert text == "echo: hi there"


def test_background_tasks_use_the_backend_or_a_backend_named_small(relay_node, serving_api_in_process):  # noqa: F811
    assert conversation_tasks.background_model() == memory_tasks._background_model() == "vllm"
    # A title, through the serving API as the worker sends it.
    assert conversation_tasks._complete([{"role": "user", "content": "name this chat"}], 8) == "echo: name this chat"
    add_remote(relay_node, "small")
    assert conversation_tasks.background_model() == memory_tasks._background_model() == "small"


def test_an_admin_backend_named_by_default_pool_is_the_default(relay_node, settings):
    add_remote(relay_node, "hosted")
    settings.DEFAULT_POOL = "hosted"
    assert gateway_client.current().default_model() == "hosted"
    settings.DEFAULT_POOL = "nowhere"
    assert gateway_client.current().default_model() == "vllm"


async def test_with_no_model_at_all_a_chat_fails_with_a_clear_error(relay_node, settings, alice):
    settings.GATEWAY_BACKENDS = {}
    registry.invalidate()
    assert gateway_client.current().default_model() is None
    with pytest.raises(ModelNotFound, match="No model is configured"):
        gateway_client.current().model_info()
    reply = await new_reply(alice, "anyone there?")
    turns.start_reply(reply.id)
    _, raw = await read_stream(open_stream(reply.id, user=alice), timeout_s=30)
    end = events_of(raw)[-1]
    assert end["event"] == "error" and "No model is configured" in end["data"]["error"], end
    assert (await load(reply.id)).status == "error"
