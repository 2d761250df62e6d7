"""Every format is stored, extracted and chunked with its page and heading;
every bad file is refused by its content with a clear error, and leaves
nothing stored and every other file as it was."""
import pytest
from django.core.exceptions import ValidationError

from documents import services
from documents.models import Chunk, Document, DocumentPage
from tests.documents.conftest import PRIDE, docx_bomb, encrypted_pdf, pdf, word

pytestmark = pytest.mark.django_db


def _chunks(document):
    return list(Chunk.objects.filter(document=document).order_by("ordinal"))


def test_a_pdf_is_indexed_page_by_page(alice, upload, store):
    document = upload(alice, "novel.pdf", pdf(PRIDE, "Mr. Bennet lives at Longbourn with five daughters."))
    assert (document.kind, document.pages, document.status) == ("pdf", 2, "ready")
    chunks = _chunks(document)
    assert [c.page for c in chunks] == [1, 2]
    assert "universally acknowledged" in chunks[0].text and "Longbourn" in chunks[1].text
    assert all(c.embedding is not None and len(c.embedding) == 384 for c in chunks)
    assert document.chunks_done == document.chunks_total == 2
    assert store() == {document.storage_key}


def test_markdown_keeps_headings(alice, upload):
    text = "# Netherfield\nMr. Bingley has taken Netherfield Park.\n\n## Meryton\nThe assembly was crowded.\n"
    chunks = _chunks(upload(alice, "notes.md", text.encode()))
    assert [(c.heading, c.text.strip()) for c in chunks] == [
        ("Netherfield", "Mr. Bingley has taken Netherfield Park."), ("Meryton", "The assembly was crowded.")]


def test_html_is_text_only(alice, upload):
    html = (b"<html><head><title>x</title><script>alert('pwned')</script></head><body><h1>Longbourn</h1>"
            b"<p onclick='steal()'>The Bennets <b>live</b> here.</p><style>p{}</style></body></html>")
    chunks = _chunks(upload(alice, "page.html", html))
    assert [(c.heading, " ".join(c.text.split())) for c in chunks] == [("Longbourn", "The Bennets live here.")]
    assert not any("alert" in c.text or "onclick" in c.text or "<" in c.text for c in chunks)


def test_docx_keeps_headings(alice, upload):
    chunks = _chunks(upload(alice, "letter.docx", word(("Heading 1", "Pemberley"), ("Normal", "Mr. Darcy owns Pemberley in Derbyshire."))))
    assert [(c.heading, c.text.strip()) for c in chunks] == [("Pemberley", "Mr. Darcy owns Pemberley in Derbyshire.")]


def test_csv_rows_keep_their_header(alice, upload):
    chunks = _chunks(upload(alice, "people.csv", b"name,home\nElizabeth,Longbourn\nDarcy,Pemberley\n"))
    assert chunks[0].heading == "name, home"
    assert "name: Darcy; home: Pemberley" in chunks[0].text


def test_long_text_is_cut_into_overlapping_token_windows(alice, upload, settings):
    words = " ".join(f"word{i}" for i in range(300))
    chunks = _chunks(upload(alice, "long.txt", words.encode()))
    assert len(chunks) > 2
    assert all(c.tokens <= settings.DOCUMENTS_CHUNK_TOKENS for c in chunks)
    # Neighbours share their overlap, and each text is its exact span of the page.
    assert chunks[0].text[-20:] in chunks[1].text
    page = DocumentPage.objects.get(document=chunks[0].document).text
    assert all(page[c.start:c.end] == c.text for c in chunks)


BAD_FILES = [
    ("fake.pdf", b"this is not a pdf", "is not a PDF"),
    ("fake.docx", b"plain text", "is not a DOCX"),
    ("secret.pdf", None, "encrypted"),
    ("empty.txt", b"", "empty"),
    ("binary.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary data"),
    ("latin.txt", "café".encode("latin-1"), "not UTF-8"),
    ("bomb.docx", None, "decompression bomb"),
    ("tool.exe", b"MZ\x90\x00", "unsupported format"),
    ("zip.docx", b"PK\x03\x04garbage", "damaged"),
    ("long.pdf", None, "limit is 5"),
    ("big.txt", b"a" * (2**20 + 1), "limit is 1 MB"),
]


@pytest.mark.parametrize("name,data,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_refused_and_touches_nothing(alice, upload, store, name, data, message):
    kept = upload(alice, "kept.txt", b"Mr. Collins is a clergyman.")
    before = (store(), Chunk.objects.count(), Document.objects.count())
    data = {"secret.pdf": encrypted_pdf, "bomb.docx": docx_bomb,
            "long.pdf": lambda: pdf(*["page"] * 6)}.get(name, lambda: data)()
    with pytest.raises(ValidationError) as refused:
        services.document_upload(user=alice, name=name, data=data)
    assert message in " ".join(refused.value.messages)
    assert (store(), Chunk.objects.count(), Document.objects.count()) == before
    kept.refresh_from_db()
    assert kept.status == "ready"


def test_a_docx_that_unpacks_past_the_limit_is_refused(alice, settings):
    settings.DOCUMENTS_MAX_UNZIPPED_MB = 1
    settings.DOCUMENTS_MAX_ZIP_RATIO = 10**6
    with pytest.raises(ValidationError, match="decompression bomb"):
        services.document_upload(user=alice, name="x.docx", data=docx_bomb(2))


def test_a_pdf_without_text_fails_with_the_reason_and_keeps_nothing(alice, upload, store):
    document = upload(alice, "scan.pdf", pdf(""))
    assert document.status == "failed" and "no text layer" in document.error
    assert store() == set() and not Chunk.objects.filter(document=document).exists()


def test_a_pdf_with_no_pages_is_refused(alice):
    from pypdf import PdfWriter
    import io

    out = io.BytesIO()
    PdfWriter().write(out)
    with pytest.raises(ValidationError, match="no pages"):
        services.document_upload(user=alice, name="none.pdf", data=out.getvalue())


def test_the_quota_counts_every_document_of_the_user(alice, bob, chat, store):
    services.document_upload(user=alice, name="a.txt", data=b"a" * 1_000_000, enqueue=False)
    services.document_upload(user=alice, name="b.txt", data=b"b" * 1_000_000, enqueue=False, conversation_id=chat.id)
    with pytest.raises(ValidationError, match="quota is 2 MB"):
        services.document_upload(user=alice, name="c.txt", data=b"c" * 200_000, enqueue=False)
    assert len(store()) == 2
    services.document_upload(user=bob, name="c.txt", data=b"c" * 200_000, enqueue=False)  # bob's quota is his own


def test_delete_removes_the_file_its_pages_chunks_and_vectors(alice, upload, store, django_capture_on_commit_callbacks):
    document = upload(alice, "novel.pdf", pdf(PRIDE))
    other = upload(alice, "other.txt", b"Kitty coughs.")
    with django_capture_on_commit_callbacks(execute=True):
        services.document_delete(document=document)
    assert store() == {other.storage_key}
    assert not Chunk.objects.filter(document_id=document.id).exists()
    assert not DocumentPage.objects.filter(document_id=document.id).exists()
    assert Chunk.objects.filter(document=other).count() == 1


def test_deleting_a_chat_deletes_its_attachments_files(alice, chat, upload, store, django_capture_on_commit_callbacks):
    upload(alice, "a.txt", b"Attached to the chat.", conversation_id=chat.id)
    with django_capture_on_commit_callbacks(execute=True):
        chat.delete()
    assert store() == set() and not Document.objects.exists()
