"""A temporary chat: not listed or searched, uses no memory and saves none,
gets no model-written title, and is deleted once idle."""
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.utils import timezone

from conversations import context, services, tasks, turns
from conversations.models import Conversation
from memory import services as memory_services
from memory.models import Memory, MemoryUse


@pytest.mark.django_db(transaction=True)
async def test_a_temporary_chat_is_unlisted_and_uses_and_saves_no_memory(alice, fake_gateway, fast_streams):
    await sync_to_async(memory_services.memory_create)(user_id=alice.id, text="My dog is called Rex", source="manual")
    fake_gateway.completions = ["A Title", "- I have a dog"]
    client = AsyncClient()
    await sync_to_async(client.force_login)(alice)
    response = await client.post("/c/new", {"text": "Remember that I have a cat. What is my dog called?", "temporary": "1"},
                                 headers={"HX-Request": "true"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Temporary chat" in html and "conversation-list" not in html  # no sidebar entry
    await turns.wait_idle(10)
    conversation = await sync_to_async(Conversation.objects.get)(user=alice)
    assert conversation.temporary
    chat_request = next(r for r in fake_gateway.requests if r.source == "chat")
    assert [m["role"] for m in chat_request.messages] == ["user"]  # no memory in its context
    assert await sync_to_async(list)(Memory.objects.values_list("text", flat=True)) == ["My dog is called Rex"]
    assert await sync_to_async(MemoryUse.objects.count)() == 0
    # No title job and no suggestion job: the fake's completions were never asked for.
    assert fake_gateway.completions == ["A Title", "- I have a dog"]
    home = (await client.get("/")).content.decode()
    assert f"/c/{conversation.id}/" not in home
    assert "What is my dog called" not in (await client.get("/c/search/?q=dog")).content.decode()
    page = (await client.get(f"/c/{conversation.id}/")).content.decode()
    assert 'aria-label="Save to memory"' not in page and "Share a link" not in page


@pytest.mark.django_db
def test_temporary_chats_are_deleted_once_idle(alice, fake_gateway, chat_turn):
    temporary = services.conversation_create(user=alice, temporary=True)
    chat_turn(temporary, "Just between us")
    kept = services.conversation_create(user=alice)
    chat_turn(kept, "Keep this one")
    assert tasks.purge_temporary_chats() == 0  # still fresh
    Conversation.objects.filter(id__in=[temporary.id, kept.id]).update(updated_at=timezone.now() - timedelta(hours=2))
    assert tasks.purge_temporary_chats() == 1
    assert list(Conversation.objects.values_list("id", flat=True)) == [kept.id]


@pytest.mark.django_db
def test_a_temporary_chat_refuses_save_to_memory(alice, alice_client, fake_gateway, chat_turn):
    reply = chat_turn(services.conversation_create(user=alice, temporary=True), "I am a vegetarian")
    response = alice_client.post(f"/m/{reply.parent_id}/remember", headers={"HX-Request": "true"})
    assert response.status_code == 422 and "temporary chat" in response.content.decode()
    assert Memory.objects.count() == 0
    reply = services.message_send(conversation=reply.conversation, text="Remember that I am vegan")
    context.build_request(reply_id=reply.id)
    assert Memory.objects.count() == 0
