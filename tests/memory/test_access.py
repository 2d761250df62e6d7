"""Save to memory on a message, and every memory endpoint answering 404 to
other users (and sending anonymous visitors to sign in)."""
import uuid

import pytest
from django.test import Client

from conversations import services
from memory.models import Memory

pytestmark = pytest.mark.django_db


def test_save_to_memory_on_a_message(alice, alice_client, fake_gateway, chat_turn):
    reply = chat_turn(services.conversation_create(user=alice), "I am a vegetarian", answer="Noted, lots of options.")
    response = alice_client.post(f"/m/{reply.parent_id}/remember", headers={"HX-Request": "true"})
    assert response.status_code == 200 and "Saved to memory" in response.content.decode()
    memory = Memory.objects.get(user=alice)
    assert (memory.text, memory.status, memory.source, memory.source_reply_id) == (
        "I am a vegetarian", "active", "message", reply.parent_id)
    # Again: the same memory, not a copy; a reply's text can be saved too.
    alice_client.post(f"/m/{reply.parent_id}/remember", headers={"HX-Request": "true"})
    alice_client.post(f"/m/{reply.id}/remember")
    assert sorted(Memory.objects.values_list("text", flat=True)) == ["I am a vegetarian", "Noted, lots of options."]
    page = alice_client.get(f"/c/{reply.conversation_id}/").content.decode()
    assert page.count('aria-label="Save to memory"') == 2


def test_a_message_too_long_for_a_memory_gets_a_clear_error(alice, alice_client, fake_gateway, chat_turn):
    reply = chat_turn(services.conversation_create(user=alice), "word " * 200)
    response = alice_client.post(f"/m/{reply.parent_id}/remember", headers={"HX-Request": "true"})
    assert response.status_code == 422 and "at most 500 characters" in response.content.decode()
    assert Memory.objects.count() == 0


def test_every_memory_endpoint_answers_404_to_another_user(alice, bob, bob_client, fake_gateway, chat_turn):
    memory = Memory.objects.create(user=alice, text="I live in Lisbon", source="manual", status="suggested")
    reply = chat_turn(services.conversation_create(user=alice), "I am a vegetarian")
    for url, data in [
        (f"/memory/{memory.id}/accept", {"text": "hijacked"}),
        (f"/memory/{memory.id}/edit", {"text": "hijacked"}),
        (f"/memory/{memory.id}/delete", {}),
        (f"/memory/{uuid.uuid4()}/delete", {}),
        (f"/m/{reply.parent_id}/remember", {}),
    ]:
        assert bob_client.post(url, data).status_code == 404, url
    memory.refresh_from_db()
    assert (memory.text, memory.status) == ("I live in Lisbon", "suggested")
    assert Memory.objects.filter(user=bob).count() == 0
    assert "I live in Lisbon" not in bob_client.get("/memory/").content.decode()
    anonymous = Client()
    for url in ("/memory/", f"/memory/{memory.id}/delete", "/memory/settings"):
        response = anonymous.post(url) if url != "/memory/" else anonymous.get(url)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"], url
    assert Memory.objects.filter(id=memory.id).exists()
