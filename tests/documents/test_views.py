"""The library page, a chat's files and "use my library", the sources panel and the passage view."""
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from conversations import services as chat_services
from documents.models import Chunk, Document, ReplySources
from tests.documents.conftest import PRIDE, pdf

pytestmark = pytest.mark.django_db


@pytest.fixture
def post(django_capture_on_commit_callbacks):
    """A POST, and the ingestion its commit queues (eager)."""
    def run(client, url, data, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return client.post(url, data, **kwargs)
    return run


def test_upload_to_the_library_and_see_it_ready(alice_client, alice, post):
    response = post(alice_client, "/documents/upload", {"file": SimpleUploadedFile("novel.pdf", pdf(PRIDE))},
                                 headers={"HX-Request": "true"})
    assert response.status_code == 200
    document = Document.objects.get(user=alice, conversation=None)
    row = alice_client.get(f"/documents/{document.id}/row").content.decode()
    assert "Ready" in row and "every 1s" not in row


def test_a_row_in_progress_polls(alice_client, alice, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = False
    from documents import services

    document = services.document_upload(user=alice, name="a.txt", data=b"text", enqueue=False)
    row = alice_client.get(f"/documents/{document.id}/row").content.decode()
    assert 'hx-trigger="every 1s"' in row and "Indexing" in row


def test_a_refused_upload_answers_422_with_the_reason(alice_client):
    response = alice_client.post("/documents/upload", {"file": SimpleUploadedFile("x.pdf", b"nope")},
                                 headers={"HX-Request": "true"})
    assert response.status_code == 422 and "x.pdf is not a PDF file" in response.content.decode()
    assert response["HX-Retarget"] == "#upload-error"
    assert not Document.objects.exists()


def test_attach_to_a_chat_and_turn_on_the_library(alice_client, alice, post):
    chat = chat_services.conversation_create(user=alice)
    page = alice_client.get(f"/c/{chat.id}/").content.decode()
    assert f"/documents/c/{chat.id}/files" in page and f"/documents/c/{chat.id}/sources" in page
    response = post(alice_client, f"/documents/c/{chat.id}/upload", {"file": SimpleUploadedFile("n.md", b"# A\nhello")})
    assert "n.md" in response.content.decode()
    assert Document.objects.get().conversation_id == chat.id
    alice_client.post(f"/documents/c/{chat.id}/library", {"use_library": "1"})
    assert "checked" in alice_client.get(f"/documents/c/{chat.id}/files").content.decode()


def test_delete_from_the_page(alice_client, alice, post):
    post(alice_client, "/documents/upload", {"file": SimpleUploadedFile("a.txt", b"hello")})
    document = Document.objects.get()
    assert post(alice_client, f"/documents/{document.id}/delete", {}).status_code == 302
    assert not Document.objects.exists() and not Chunk.objects.exists()


def test_the_sources_panel_links_each_citation_to_its_passage(alice_client, alice, post):
    chat = chat_services.conversation_create(user=alice)
    post(alice_client, f"/documents/c/{chat.id}/upload", {"file": SimpleUploadedFile("novel.pdf", pdf(PRIDE, "Mr. Bennet lives at Longbourn."))})
    chunk = Chunk.objects.get(page=2)
    reply = chat_services.message_send(conversation=chat, text="Where?")
    ReplySources.objects.create(reply=reply, conversation=chat, user=alice, flagged=1, items=[
        {"n": 1, "chunk_id": chunk.id, "document": "novel.pdf", "page": 2, "heading": "", "snippet": chunk.text}])
    thread = alice_client.get(f"/c/{chat.id}/").content.decode()
    assert f'id="sources-{reply.id}"' in thread  # the slot the panel is swapped into
    panel = alice_client.get(f"/documents/c/{chat.id}/sources").content.decode()
    assert f'id="sources-{reply.id}" hx-swap-oob="true"' in panel
    assert f'id="src-{reply.id}-1"' in panel and f'href="/documents/passages/{chunk.id}/"' in panel
    assert "novel.pdf, page 2" in panel and "Mr. Bennet lives at Longbourn." in panel
    assert "1 passage from your documents was left out by the content policy." in panel
    passage = alice_client.get(f"/documents/passages/{chunk.id}/").content.decode()
    assert '<mark id="passage">Mr. Bennet lives at Longbourn.</mark>' in passage and "Page 2" in passage


def test_pages_need_a_login(client):
    assert client.get("/documents/").status_code == 302
