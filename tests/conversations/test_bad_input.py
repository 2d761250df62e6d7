"""Bad input on the chat pages and the SSE endpoint: a clear 400/422, nothing
lost or half-saved, never a 500. PostgreSQL text cannot hold NUL characters,
so text carrying one is refused before it reaches a save or a query."""
import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError

from conversations import services
from conversations.models import Conversation, Message
from tests.conversations.conftest import open_stream, read_stream

pytestmark = pytest.mark.django_db(transaction=True)

NUL_TEXT = "before\x00after"


@pytest.fixture
def chat(alice, fake_gateway):
    conversation = services.conversation_create(user=alice, system_prompt="Be kind.")
    services.message_send(conversation=conversation, text="First question")
    Message.objects.filter(conversation=conversation, role="assistant").update(status="complete")
    return conversation


@pytest.mark.parametrize("page", ["²", "٣x", "9" * 5000, "-1", "1.5", "", "abc"],
                         ids=["superscript", "arabic-digit", "5000-digits", "negative", "float", "empty", "letters"])
def test_page_parameters_that_are_not_page_numbers_show_a_page(alice_client, chat, page):
    for url in ("/c/sidebar", "/c/archived/"):
        response = alice_client.get(url, {"page": page})
        assert response.status_code == 200, (url, page)


def test_nul_in_a_new_chat_is_422_and_creates_nothing(alice_client, alice, fake_gateway):
    for fields in ({"text": NUL_TEXT}, {"text": "ok", "system_prompt": NUL_TEXT}):
        response = alice_client.post("/c/new", fields, headers={"HX-Request": "true"})
        assert response.status_code == 422
        assert "NUL" in response.content.decode()
    response = alice_client.post("/c/new", {"text": NUL_TEXT})
    assert response.status_code == 422 and "NUL" in response.content.decode()
    assert not Conversation.objects.filter(user=alice).exists()


def test_nul_in_a_message_or_an_edit_is_422_and_adds_nothing(alice_client, chat):
    before = Message.objects.filter(conversation=chat).count()
    response = alice_client.post(f"/c/{chat.id}/send", {"text": NUL_TEXT}, headers={"HX-Request": "true"})
    assert response.status_code == 422 and "NUL" in response.content.decode()
    user_message = Message.objects.get(conversation=chat, role="user")
    response = alice_client.post(f"/m/{user_message.id}/edit", {"text": NUL_TEXT}, headers={"HX-Request": "true"})
    assert response.status_code == 422
    assert Message.objects.filter(conversation=chat).count() == before


def test_nul_in_a_title_system_prompt_or_instructions_is_422_and_keeps_the_old_value(alice_client, alice, chat):
    assert alice_client.post(f"/c/{chat.id}/rename", {"title": NUL_TEXT}).status_code == 422
    assert alice_client.post(f"/c/{chat.id}/settings", {"system_prompt": NUL_TEXT}).status_code == 422
    chat.refresh_from_db()
    assert "\x00" not in chat.title and chat.system_prompt == "Be kind."
    response = alice_client.post("/c/preferences/", {"custom_instructions": NUL_TEXT})
    assert response.status_code == 422 and "NUL" in response.content.decode()


def test_nul_in_a_search_is_400(alice_client, chat):
    response = alice_client.get("/c/search/", {"q": "first\x00"})
    assert response.status_code == 400 and "NUL" in response.content.decode()
    assert alice_client.get("/c/search/", {"q": "first"}).status_code == 200


@sync_to_async
def _reply(user):
    conversation = services.conversation_create(user=user)
    reply = services.message_send(conversation=conversation, text="Hi")
    services.reply_start(reply_id=reply.id, request_id="r")
    services.reply_finish(reply_id=reply.id, status="complete", content="Hello", stream_seq=2)
    return reply


@pytest.mark.parametrize("last_event_id", ["²", "1_000", "-1", "9" * 4000, str(2**63), "1e3"],
                         ids=["superscript", "underscore", "negative", "4000-digits", "2**63", "exponent"])
async def test_a_last_event_id_that_no_server_sent_is_400(alice, fake_gateway, fast_streams, last_event_id):
    reply = await _reply(alice)
    for comm in (open_stream(reply.id, user=alice, last_event_id=last_event_id),
                 open_stream(reply.id, user=alice, query=f"last_event_id={last_event_id}")):
        start, body = await read_stream(comm)
        assert start["status"] == 400 and b"Last-Event-ID" in body


async def test_a_valid_last_event_id_still_replays(alice, fake_gateway, fast_streams):
    reply = await _reply(alice)
    start, body = await read_stream(open_stream(reply.id, user=alice, last_event_id=" 1 "))
    assert start["status"] == 200 and b"event: done" in body


def _raise_from(cause):
    def fail(*args, **kwargs):
        raise OperationalError(str(cause)) from cause
    return fail


@pytest.mark.parametrize("cause, words", [
    (psycopg.errors.DiskFull("could not extend file: No space left on device"), "out of storage space"),
    (psycopg.OperationalError("connection refused"), "database is unreachable"),
], ids=["disk-full", "database-down"])
def test_a_database_that_cannot_store_answers_503_with_a_sentence_not_a_bare_500(
        alice_client, alice, fake_gateway, monkeypatch, cause, words):
    monkeypatch.setattr(services, "conversation_start", _raise_from(cause))
    response = alice_client.post("/c/new", {"text": "Keep me"}, headers={"HX-Request": "true"})
    assert response.status_code == 503 and response["Retry-After"]
    assert words in response.content.decode() and "nothing was saved" in response.content.decode()
    assert response["HX-Retarget"] == "#composer-error"  # shown in the composer, whose text stays
    response = alice_client.post("/c/new", {"text": "Keep me"})
    assert response.status_code == 503 and words in response.content.decode()
    assert not Conversation.objects.filter(user=alice).exists()
