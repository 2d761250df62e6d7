"""Automatic memory: after a reply the model (at background priority, over
the serving API) suggests facts; they wait on the Memory page until the user
accepts, edits or deletes them, and are never used before."""
import logging

import pytest

from conversations import context, services, tasks
from gateway.types import PRIORITY_BACKGROUND
from memory import tasks as memory_tasks
from memory.models import Memory
from tests.test_serve import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture
def suggested(alice, fake_gateway, chat_turn, django_capture_on_commit_callbacks):
    """Alice's chat after one reply, with the model's suggestions stored."""
    fake_gateway.completions = ["Moving to Lisbon", "- I live in Lisbon\n- I have two cats\nnone"]
    conversation = services.conversation_create(user=alice)
    reply = chat_turn(conversation, "I just moved to Lisbon with my two cats. Where should I shop?")
    with django_capture_on_commit_callbacks(execute=True):
        tasks.enqueue_after_reply(reply_id=reply.id)
    return reply


def test_facts_are_suggested_by_the_model_at_background_priority(alice, fake_gateway, suggested):
    extraction = next(r for r in fake_gateway.requests if r.messages[0]["content"] == memory_tasks.EXTRACT_SYSTEM)
    assert (extraction.priority, extraction.source, extraction.user_id) == (PRIORITY_BACKGROUND, "task", None)
    assert "I just moved to Lisbon" in extraction.messages[1]["content"]
    memories = Memory.objects.filter(user=alice).order_by("created_at")
    assert [(m.text, m.status, m.source, m.source_reply_id) for m in memories] == [
        ("I live in Lisbon", "suggested", "auto", suggested.id), ("I have two cats", "suggested", "auto", suggested.id),
    ]
    assert all(m.embedding is None for m in memories)  # the worker holds no model


def test_a_suggestion_is_not_used_until_accepted(alice, alice_client, fake_gateway, suggested):
    reply = services.message_send(conversation=services.conversation_create(user=alice), text="Where do I live?")
    assert "Lisbon" not in context.build_request(reply_id=reply.id).messages[0]["content"]
    page = alice_client.get("/memory/").content.decode()
    assert "I live in Lisbon" in page and "Suggestions" in page
    lisbon = Memory.objects.get(text="I live in Lisbon")
    assert alice_client.post(f"/memory/{lisbon.id}/accept", {"text": "I live in Lisbon, Portugal"}).status_code == 302
    lisbon.refresh_from_db()
    assert (lisbon.text, lisbon.status) == ("I live in Lisbon, Portugal", "active") and lisbon.embedding is not None
    reply = services.message_send(conversation=services.conversation_create(user=alice), text="Where do I live?")
    assert "- I live in Lisbon, Portugal" in context.build_request(reply_id=reply.id).messages[0]["content"]


def test_suggestions_and_memories_are_edited_and_deleted(alice, alice_client, suggested):
    cats = Memory.objects.get(text="I have two cats")
    assert alice_client.post(f"/memory/{cats.id}/edit", {"text": "I have three cats"}).status_code == 302
    cats.refresh_from_db()
    assert (cats.text, cats.status) == ("I have three cats", "suggested")
    assert alice_client.post(f"/memory/{cats.id}/delete").status_code == 302
    assert not Memory.objects.filter(id=cats.id).exists()
    lisbon = Memory.objects.get(text="I live in Lisbon")
    alice_client.post(f"/memory/{lisbon.id}/accept")
    before = list(Memory.objects.get(id=lisbon.id).embedding)
    alice_client.post(f"/memory/{lisbon.id}/edit", {"text": "I live in Tokyo"})
    lisbon.refresh_from_db()
    assert lisbon.text == "I live in Tokyo" and list(lisbon.embedding) != before  # re-embedded
    # A bad edit is refused with a clear message and changes nothing.
    response = alice_client.post(f"/memory/{lisbon.id}/edit", {"text": "   "})
    assert response.status_code == 422 and "cannot be empty" in response.content.decode()
    response = alice_client.post(f"/memory/{lisbon.id}/edit", {"text": "x " * 400})
    assert response.status_code == 422 and "at most 500 characters" in response.content.decode()
    lisbon.refresh_from_db()
    assert lisbon.text == "I live in Tokyo"


def test_known_facts_are_not_suggested_again(alice, fake_gateway, chat_turn, suggested, django_capture_on_commit_callbacks):
    fake_gateway.completions = ["- I live in Lisbon.\n- I like jazz"]
    reply = chat_turn(suggested.conversation, "I like jazz, and Lisbon is lovely.")
    with django_capture_on_commit_callbacks(execute=True):
        tasks.enqueue_after_reply(reply_id=reply.id)
    assert sorted(Memory.objects.values_list("text", flat=True)) == ["I have two cats", "I like jazz", "I live in Lisbon"]


def test_a_serving_process_that_stays_down_loses_only_the_suggestions(alice, settings, caplog, monkeypatch):
    monkeypatch.undo()  # the real HTTP client, not the in-process API
    settings.SERVE_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="memory.tasks"):
        memory_tasks.extract_memories.apply(args=[alice.id, "00000000-0000-0000-0000-000000000000", "I like green tea"])
    assert Memory.objects.count() == 0
    assert any("giving up" in r.getMessage() for r in caplog.records)


def test_memory_page_adds_a_memory_and_says_what_is_wrong(alice, alice_client, fake_gateway):
    assert alice_client.post("/memory/add", {"text": "I prefer metric units"}).status_code == 302
    assert Memory.objects.get(user=alice).status == "active"
    response = alice_client.post("/memory/add", {"text": "bad\x00text"})
    assert response.status_code == 422 and "NUL" in response.content.decode()
