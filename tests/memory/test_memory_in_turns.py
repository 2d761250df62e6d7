"""Memory in a turn: "remember that …" saves the fact and the reply confirms
it, the memories nearest to the message go into the context within memory's
own token budget, and the reply says which it used."""
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from conversations import context, services, tasks, turns
from conversations.models import Conversation, Message
from memory import services as memory_services
from memory import tasks as memory_tasks
from memory.models import Memory, MemoryUse
from tests.conversations.conftest import reply_shown_live_or_whole

FACTS = ["My dog is called Rex", "I work as a dentist in Porto", "My favourite colour is green"]


def _system(request) -> str:
    return request.messages[0]["content"] if request.messages[0]["role"] == "system" else ""


def _remember(user, *texts):
    return [memory_services.memory_create(user_id=user.id, text=t, source=Memory.Source.MANUAL) for t in texts]


@pytest.mark.django_db(transaction=True)
async def test_remember_that_saves_the_fact_and_the_streamed_reply_confirms_it(alice, fake_gateway, fast_streams):
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.post("/c/new", {"text": "Remember that my cat is called Miso. Any name ideas for a second cat?"},
                                 headers={"HX-Request": "true"})
    assert response.status_code == 200 and reply_shown_live_or_whole(response.content.decode())
    await turns.wait_idle(10)
    memory = await sync_to_async(Memory.objects.get)(user=alice)
    assert (memory.text, memory.status, memory.source) == ("My cat is called Miso", "active", "explicit")
    assert memory.embedding is not None
    # The model is told to confirm it; the reply streamed and ended as usual.
    chat_request = next(r for r in fake_gateway.requests if r.source == "chat")
    assert 'asked you to remember: "My cat is called Miso"' in _system(chat_request)
    assert chat_request.messages[-1]["content"].startswith("Remember that my cat is called Miso.")
    reply = await sync_to_async(Message.objects.get)(conversation__user=alice, role="assistant")
    assert (reply.status, reply.content) == ("complete", "Hello, world!")
    page = (await client.get(f"/c/{reply.conversation_id}/")).content.decode()
    assert "Saved to memory: “My cat is called Miso”" in page
    # An explicit request is already saved: no suggestion job for that turn.
    assert await sync_to_async(Memory.objects.filter(status="suggested").count)() == 0


@pytest.mark.django_db
def test_the_memories_nearest_to_the_message_go_into_the_context(alice, bob, fake_gateway, settings, alice_client):
    settings.MEMORY_MAX_RESULTS = 1
    rex, dentist, _ = _remember(alice, *FACTS)
    _remember(bob, "My dog is called Bolt")  # another user's memory is never a candidate
    conversation = services.conversation_create(user=alice)
    reply = services.message_send(conversation=conversation, text="What is my dog's name?")
    system = _system(context.build_request(reply_id=reply.id))
    assert "- My dog is called Rex" in system and "dentist" not in system and "Bolt" not in system
    assert list(MemoryUse.objects.filter(reply_id=reply.id).values_list("memory_id", "kind")) == [(rex.id, "used")]
    reply2 = services.message_send(conversation=services.conversation_create(user=alice), text="Any tips for a dentist's job?")
    system = _system(context.build_request(reply_id=reply2.id))
    assert "dentist in Porto" in system and "Rex" not in system
    page = alice_client.get(f"/c/{conversation.id}/").content.decode()
    assert "Used 1 memory" in page and "My dog is called Rex" in page


@pytest.mark.django_db
def test_memories_take_only_their_own_share_of_the_window(alice, fake_gateway, settings):
    """The fake counts words + 6 per system text: a budget that holds the
    header and one fact keeps exactly the nearest one; the history gets the rest."""
    _remember(alice, "My dog is called Rex", "My dog Rex likes walks")  # as many words each
    one = len((memory_services.MEMORY_HEADER + "\n- My dog is called Rex").split()) + 6
    settings.MEMORY_CONTEXT_TOKENS, settings.MEMORY_CONTEXT_SHARE = one, 0.5
    reply = services.message_send(conversation=services.conversation_create(user=alice), text="What is my dog called?")
    system = _system(context.build_request(reply_id=reply.id))
    assert system.count("\n- ") == 1
    assert MemoryUse.objects.filter(reply_id=reply.id).count() == 1
    # The share caps the budget below MEMORY_CONTEXT_TOKENS on a small window.
    assert memory_services.budget_tokens(2048) == one
    settings.MEMORY_CONTEXT_SHARE = 0.01
    assert memory_services.budget_tokens(2048) == 20
    reply = services.message_send(conversation=services.conversation_create(user=alice), text="What is my dog called?")
    assert "\n- " not in _system(context.build_request(reply_id=reply.id))


@pytest.mark.django_db
def test_switched_off_memory_is_neither_used_nor_saved(alice, alice_client, fake_gateway, chat_turn,
                                                       django_capture_on_commit_callbacks):
    _remember(alice, "My dog is called Rex")
    assert alice_client.post("/memory/settings", {"return_to": "preferences"}).status_code == 302  # unchecked: off
    assert 'name="enabled" value="1" >' in alice_client.get("/c/preferences/").content.decode()
    reply = services.message_send(conversation=services.conversation_create(user=alice),
                                  text="Remember that my cat is Miso. What is my dog called?")
    system = _system(context.build_request(reply_id=reply.id))
    assert "Rex" not in system and "Miso" not in system
    assert list(Memory.objects.values_list("text", flat=True)) == ["My dog is called Rex"]
    fake_gateway.completions = ["A title", "- I live in Lisbon"]
    with django_capture_on_commit_callbacks(execute=True):
        tasks.enqueue_after_reply(reply_id=chat_turn(services.conversation_create(user=alice), "I live in Lisbon now").id)
    assert Memory.objects.count() == 1
    assert not any(r.messages[0]["content"] == memory_tasks.EXTRACT_SYSTEM for r in fake_gateway.requests)
    response = alice_client.post(f"/m/{reply.parent_id}/remember", headers={"HX-Request": "true"})
    assert response.status_code == 422 and "Memory is switched off" in response.content.decode()
    alice_client.post("/memory/settings", {"enabled": "1"})
    reply = services.message_send(conversation=services.conversation_create(user=alice), text="What is my dog called?")
    assert "Rex" in _system(context.build_request(reply_id=reply.id))


@pytest.mark.django_db
def test_a_failing_memory_lookup_does_not_cost_the_reply(alice, fake_gateway, monkeypatch):
    _remember(alice, "My dog is called Rex")

    def broken(*args, **kwargs):
        raise RuntimeError("embedding model gone")

    monkeypatch.setattr(memory_services, "_vector", broken)
    reply = services.message_send(conversation=services.conversation_create(user=alice), text="What is my dog called?")
    request = context.build_request(reply_id=reply.id)
    assert request.messages == [{"role": "user", "content": "What is my dog called?"}]


@pytest.mark.django_db
def test_saying_the_same_fact_twice_keeps_one_memory(alice, fake_gateway):
    for text in ("Remember that I live in Lisbon", "please remember: I live in Lisbon."):
        reply = services.message_send(conversation=services.conversation_create(user=alice), text=text)
        context.build_request(reply_id=reply.id)
    assert list(Memory.objects.values_list("text", flat=True)) == ["I live in Lisbon"]
    assert MemoryUse.objects.filter(kind="saved").count() == 2
    assert Conversation.objects.count() == 2
