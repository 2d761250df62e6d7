"""Share links: a snapshot of one branch behind an unguessable token, readable
without an account, noindex, revocable, continued into another account, and
404 to anyone but the owner for management."""
import re
import uuid

import pytest
from django.test import Client

from conversations import context, services
from conversations.models import Conversation, Message
from sharing.models import Share

pytestmark = pytest.mark.django_db


@pytest.fixture
def chat(alice, fake_gateway, chat_turn):
    """Alice's chat with two branches of its second question; the newer is shown."""
    conversation = services.conversation_create(user=alice)
    first = chat_turn(conversation, "What is a monad?", answer="A **monoid** in the category of endofunctors.")
    second = chat_turn(conversation, "Explain simpler", answer="A box with rules.")
    edited = services.message_edit(message=second.parent, text="Explain like I'm five")
    services.reply_start(reply_id=edited.id, request_id="r")
    services.reply_finish(reply_id=edited.id, status="complete", content="It wraps things.", stream_seq=2)
    services.conversation_update(conversation=conversation, title="Monads")
    conversation.refresh_from_db()
    return conversation, first


def _share(client, conversation) -> Share:
    response = client.post(f"/c/{conversation.id}/share", headers={"HX-Request": "true"})
    assert response.status_code == 200
    share = Share.objects.get(conversation=conversation)
    assert f"/s/{share.token}/" in response.content.decode()
    return share


def test_a_share_is_a_snapshot_of_the_branch_on_screen(alice_client, chat):
    conversation, _ = chat
    share = _share(alice_client, conversation)
    assert len(share.token) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", share.token)
    assert [(m.role, m.content) for m in share.messages.all()] == [
        ("user", "What is a monad?"), ("assistant", "A **monoid** in the category of endofunctors."),
        ("user", "Explain like I'm five"), ("assistant", "It wraps things."),
    ]
    response = Client().get(f"/s/{share.token}/")  # no account
    html = response.content.decode()
    assert response.status_code == 200 and "<strong>monoid</strong>" in html and "It wraps things." in html
    assert "A box with rules." not in html  # the other branch
    assert response["X-Robots-Tag"] == "noindex, nofollow"
    assert '<meta name="robots" content="noindex, nofollow">' in html
    assert response["Referrer-Policy"] == "no-referrer" and "no-store" in response["Cache-Control"]
    assert "sidebar" not in html and "conversation-list" not in html and "Continue this chat" in html


def test_the_snapshot_does_not_change_with_the_chat(alice, alice_client, chat, chat_turn):
    conversation, first = chat
    share = _share(alice_client, conversation)
    chat_turn(conversation, "A new question after sharing", answer="A new answer.")
    Message.objects.filter(id=first.id).update(content="Rewritten answer")
    services.conversation_update(conversation=conversation, title="Renamed")
    html = Client().get(f"/s/{share.token}/").content.decode()
    assert "endofunctors" in html and "Rewritten" not in html and "A new question" not in html and "Monads" in html
    services.conversation_delete(conversation=conversation)
    assert "endofunctors" in Client().get(f"/s/{share.token}/").content.decode()


def test_a_revoked_link_answers_404(alice_client, chat):
    share = _share(alice_client, chat[0])
    page = alice_client.get("/shares/").content.decode()
    assert f"/s/{share.token}/" in page and "Monads" in page
    assert alice_client.post(f"/shares/{share.id}/revoke").status_code == 302
    assert Client().get(f"/s/{share.token}/").status_code == 404
    assert Client().post(f"/s/{share.token}/continue").status_code == 404
    assert f"/s/{share.token}/" not in alice_client.get("/shares/").content.decode()


def test_unknown_and_overlong_tokens_answer_404(db):
    assert Client().get("/s/not-a-token/").status_code == 404
    assert Client().get("/s/" + "a" * 5000 + "/").status_code == 404


def test_another_user_can_read_but_not_manage_a_share(alice_client, bob_client, chat):
    conversation, _ = chat
    share = _share(alice_client, conversation)
    assert bob_client.post(f"/shares/{share.id}/revoke").status_code == 404
    assert bob_client.post(f"/shares/{uuid.uuid4()}/revoke").status_code == 404
    assert bob_client.post(f"/c/{conversation.id}/share").status_code == 404
    assert f"/s/{share.token}/" not in bob_client.get("/shares/").content.decode()
    assert Client().post(f"/shares/{share.id}/revoke").status_code == 302  # anonymous: to the login page
    assert bob_client.get(f"/s/{share.token}/").status_code == 200
    assert Share.objects.filter(id=share.id).exists() and Share.objects.count() == 1


def test_continue_copies_the_snapshot_into_the_viewers_account(alice, bob, alice_client, bob_client, chat, fake_gateway):
    share = _share(alice_client, chat[0])
    response = Client().post(f"/s/{share.token}/continue")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/?next=/s/")
    response = bob_client.post(f"/s/{share.token}/continue")
    copy = Conversation.objects.get(user=bob)
    assert response.status_code == 302 and response["Location"] == f"/c/{copy.id}/"
    assert copy.title == "Monads" and not copy.temporary
    path = [m for m in copy.messages.all()]
    assert [m.content for m in sorted(path, key=lambda m: m.created_at)][-1] == "It wraps things."
    assert copy.current_leaf.content == "It wraps things." and copy.messages.count() == 4
    # Bob goes on from the copy; Alice's chat is untouched.
    reply = services.message_send(conversation=copy, text="And a functor?")
    contents = [m["content"] for m in context.build_request(reply_id=reply.id).messages]
    assert contents == ["What is a monad?", "A **monoid** in the category of endofunctors.", "Explain like I'm five",
                        "It wraps things.", "And a functor?"]
    assert Conversation.objects.filter(user=alice).count() == 1 and chat[0].messages.count() == 6


def test_a_temporary_or_empty_chat_cannot_be_shared(alice, alice_client, fake_gateway, chat_turn):
    temporary = services.conversation_create(user=alice, temporary=True)
    chat_turn(temporary, "secret")
    response = alice_client.post(f"/c/{temporary.id}/share", headers={"HX-Request": "true"})
    assert response.status_code == 422 and "temporary chat cannot be shared" in response.content.decode()
    empty = services.conversation_create(user=alice)
    response = alice_client.post(f"/c/{empty.id}/share")
    assert response.status_code == 422 and "nothing to share" in response.content.decode()
    assert Share.objects.count() == 0
