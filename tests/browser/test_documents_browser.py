"""Documents in a real Chromium: attach a PDF to a chat, watch it being
indexed, ask about it, and follow the reply's citation to the passage."""
import re
import threading

import pytest

from bench.pdfgen import make_pdf
from tests.browser.conftest import signup

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PAGES = ["It is a truth universally acknowledged, that a single man in possession of a good fortune.",
         "Mr. Bennet lives at Longbourn with his wife and five daughters.",
         "Mr. Bingley has taken Netherfield Park."]


@pytest.fixture
def gated_ingestion(settings, tmp_path, monkeypatch):
    """Ingestion on a thread of the server's process, as a worker would run
    it, held after its first batch until the test has seen the progress."""
    from django.db import connections

    from documents import embedder, tasks

    settings.STORAGES = {**settings.STORAGES, "documents": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path / "store")}}}
    settings.DOCUMENTS_EMBED_BATCH = 1
    release, batches = threading.Event(), []
    real = embedder.embed_batch

    def gated(texts):
        if batches:
            release.wait(30)
        batches.append(texts)
        return real(texts)

    def worker(document_id):
        try:
            tasks.ingest_document.apply(args=(document_id,))
        finally:
            connections.close_all()

    # The serving process's question embedder loads on first use (torch and
    # sentence-transformers imports: tens of seconds on a busy box).
    from retrieval.services import embed

    embed(["warm up"])
    monkeypatch.setattr(embedder, "embed_batch", gated)
    monkeypatch.setattr(tasks.ingest_document, "delay", lambda document_id: threading.Thread(
        target=worker, args=(document_id,), daemon=True).start())
    yield release
    release.set()


def a_chat_with_one_reply(page, live, fake_gateway):
    """A new user's chat page, its first reply complete: files can be attached."""
    fake_gateway.script = ["Hello."]
    signup(page, live)
    page.fill("#composer-text", "Hi")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/c/[0-9a-f-]+/$"))
    page.wait_for_selector("article.msg.assistant.status-complete")


def test_upload_a_pdf_watch_it_index_ask_and_open_the_citation(page, live, fake_gateway, gated_ingestion):
    a_chat_with_one_reply(page, live, fake_gateway)

    page.set_input_files("#chat-files input[type=file]", files=[
        {"name": "novel.pdf", "mimeType": "application/pdf", "buffer": make_pdf(PAGES)}])
    row = page.locator("#chat-files li.doc")
    page.wait_for_function("() => (document.querySelector('#chat-files .doc-status')?.textContent || '').includes('33%')")
    assert "Indexing" in row.inner_text() and row.locator("progress").count() == 1
    gated_ingestion.set()
    page.wait_for_function("() => (document.querySelector('#chat-files .doc-status')?.textContent || '').includes('Ready')")
    assert "3 passages" in row.inner_text()

    fake_gateway.script = ["Mr. Bennet lives at ", "Longbourn [1]."]
    page.fill("#composer-text", "Where does Mr. Bennet live?")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('article.msg.assistant.status-complete').length == 2")
    turn = next(r for r in fake_gateway.requests if r.messages[-1]["content"] == "Where does Mr. Bennet live?")
    assert "[1] novel.pdf, page 2\nMr. Bennet lives at Longbourn" in turn.messages[0]["content"]
    reply = page.locator("article.msg.assistant").last
    cite = reply.locator(".body a.cite")
    cite.wait_for()
    assert cite.inner_text() == "[1]"
    source = reply.locator(".sources li").first
    assert "novel.pdf, page 2" in source.inner_text() and "Longbourn" in source.inner_text()
    cite.click()
    assert page.url.endswith(cite.get_attribute("href"))
    source.locator("a.source-link").click()
    page.wait_for_url(re.compile(r"/documents/passages/\d+/$"))
    assert "Mr. Bennet lives at Longbourn" in page.locator("mark#passage").inner_text()
    assert page.locator("h1").inner_text() == "novel.pdf"


def test_a_file_chosen_before_htmx_binds_the_form_still_uploads_through_htmx(page, live, fake_gateway,
                                                                          gated_ingestion):
    """#chat-files arrives by a swap and htmx binds its form only when the swap
    settles; a file chosen in between went out as a plain POST without the
    CSRF header (a 403 page, seen in CI on a busy box)."""
    gated_ingestion.set()
    a_chat_with_one_reply(page, live, fake_gateway)
    page.wait_for_selector("#chat-files input[type=file]")
    chat_url = page.url
    # The same markup, not yet bound by htmx: the moment before the swap settles.
    page.evaluate("() => { const files = document.getElementById('chat-files'); files.outerHTML = files.outerHTML; }")
    page.set_input_files("#chat-files input[type=file]", files=[
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"Mr. Bingley has taken Netherfield Park."}])
    page.wait_for_selector("#chat-files li.doc")
    assert page.url == chat_url
