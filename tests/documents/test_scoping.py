"""Owner scoping: no query path returns another user's document, chunk or
sources, and every owned object answers 404 to other users."""
import pytest

from conversations import services as chat_services
from documents import context, selectors
from documents.models import Chunk, ReplySources
from tests.documents.conftest import pdf

pytestmark = pytest.mark.django_db

SECRET = "The launch code of Rosings is swordfish-42."


@pytest.fixture
def both(alice, bob, upload):
    """The same text in alice's library and chat, and in bob's library and chat."""
    alice_chat = chat_services.conversation_create(user=alice)
    bob_chat = chat_services.conversation_create(user=bob)
    docs = {
        "alice_lib": upload(alice, "a.txt", SECRET.encode()),
        "alice_chat": upload(alice, "a.pdf", pdf(SECRET), conversation_id=alice_chat.id),
        "bob_lib": upload(bob, "b.txt", SECRET.encode()),
        "bob_chat": upload(bob, "b.pdf", pdf(SECRET), conversation_id=bob_chat.id),
    }
    return alice_chat, bob_chat, docs


def _owners(hits):
    return {Chunk.objects.get(id=h.chunk_id).user_id for h in hits}


@pytest.fixture(params=["exact", "graph walk"])
def vector_plan(request):
    """Both vector plans: every distance, and the HNSW walk redone exactly."""
    if request.param == "graph walk":
        request.getfixturevalue("graph_walk")
    return request.param


@pytest.mark.parametrize("mode", ["vector", "text", "hybrid"])
@pytest.mark.parametrize("use_library", [False, True])
def test_search_returns_only_the_owners_chunks(alice, bob, both, mode, use_library, vector_plan):
    alice_chat, bob_chat, docs = both
    from retrieval.services import embed

    vector = embed(["launch code"])[0]
    for user, chat in ((alice, alice_chat), (bob, bob_chat)):
        # Even a scope that names the other user's chat finds nothing of theirs.
        for conversation_id in (alice_chat.id, bob_chat.id, None):
            scope = selectors.Scope(user_id=user.id, conversation_id=conversation_id, use_library=use_library)
            hits = selectors.search(scope=scope, query="launch code swordfish", vector=vector, mode=mode)
            assert _owners(hits) <= {user.id}
        scope = selectors.Scope(user_id=user.id, conversation_id=chat.id, use_library=use_library)
        hits = selectors.search(scope=scope, query="launch code swordfish", vector=vector, mode=mode)
        assert len(hits) == (2 if use_library else 1) and _owners(hits) == {user.id}


def test_a_turn_never_gets_another_users_passages(alice, bob, both):
    alice_chat, bob_chat, docs = both
    from documents import services

    services.chat_use_library(conversation_id=alice_chat.id, on=True)
    # Alice's user id with bob's chat (a forged pairing) searches nothing of bob's.
    for conversation_id in (alice_chat.id, bob_chat.id):
        passages = context.passages_for_turn(user_id=alice.id, conversation_id=conversation_id, query="launch code",
                                             prompt_budget_tokens=2000, count_tokens=lambda t: len(t.split()))
        assert {Chunk.objects.get(id=i["chunk_id"]).user_id for i in passages.items} <= {alice.id}
    assert selectors.turn_scope(user_id=alice.id, conversation_id=bob_chat.id) is None
    assert not selectors.attachments(user=alice, conversation_id=bob_chat.id).exists()


def test_every_page_answers_404_for_another_users_objects(alice_client, bob, both):
    alice_chat, bob_chat, docs = both
    bob_doc, bob_chunk = docs["bob_lib"], Chunk.objects.filter(user=bob).first()
    from django.core.files.uploadedfile import SimpleUploadedFile

    urls = [
        ("get", f"/documents/{bob_doc.id}/row", {}),
        ("post", f"/documents/{bob_doc.id}/delete", {}),
        ("get", f"/documents/passages/{bob_chunk.id}/", {}),
        ("get", f"/documents/c/{bob_chat.id}/files", {}),
        ("post", f"/documents/c/{bob_chat.id}/upload", {"file": SimpleUploadedFile("x.txt", b"hi")}),
        ("post", f"/documents/c/{bob_chat.id}/library", {"use_library": "1"}),
        ("get", f"/documents/c/{bob_chat.id}/sources", {}),
    ]
    for method, url, data in urls:
        assert getattr(alice_client, method)(url, data).status_code == 404, url
    assert bob_doc.__class__.objects.filter(id=bob_doc.id).exists()
    assert not bob_doc.__class__.objects.filter(name="x.txt").exists()


def test_the_library_page_lists_only_the_users_documents(alice_client, both):
    page = alice_client.get("/documents/").content.decode()
    assert "a.txt" in page and "b.txt" not in page


def test_sources_are_read_only_by_their_owner(alice, bob, both, bob_client):
    alice_chat, _, docs = both
    reply = chat_services.message_send(conversation=alice_chat, text="hi")
    ReplySources.objects.create(reply=reply, conversation=alice_chat, user=alice, items=[{"n": 1, "chunk_id": 1}])
    assert selectors.reply_sources(user=bob, conversation_id=alice_chat.id) == []
    assert bob_client.get(f"/documents/c/{alice_chat.id}/sources").status_code == 404
