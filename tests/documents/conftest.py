"""Fixtures for the documents tests: small limits, a private storage folder
per test, files of every format, and ingestion run inline after commit."""
from __future__ import annotations

import io
import zipfile

import docx
import pytest
from django.db import connection
from pypdf import PdfReader, PdfWriter

from bench.pdfgen import make_pdf
from conversations import services as chat_services
from documents import selectors, services
from documents.models import Document
from tests.conversations.conftest import fake_gateway, serving_api_in_process  # noqa: F401  (re-exported fixtures)

PRIDE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
         "must be in want of a wife.")


@pytest.fixture(autouse=True)
def documents_settings(settings, tmp_path):
    settings.STORAGES = {**settings.STORAGES, "documents": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path / "store")}}}
    settings.DOCUMENTS_MAX_FILE_MB = 1.0
    settings.DOCUMENTS_MAX_PAGES = 5
    settings.DOCUMENTS_USER_QUOTA_MB = 2.0
    settings.DOCUMENTS_CHUNK_TOKENS = 64
    settings.DOCUMENTS_CHUNK_OVERLAP_TOKENS = 16
    settings.DOCUMENTS_INGEST_RETRIES = 2
    settings.DOCUMENTS_RETRY_WAIT_S = 0
    settings.CELERY_TASK_ALWAYS_EAGER = True
    return settings


@pytest.fixture
def store(documents_settings, tmp_path):
    """The stored files, as a set of paths relative to the storage root."""
    root = tmp_path / "store"

    def files() -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()
    return files


@pytest.fixture
def upload(django_capture_on_commit_callbacks):
    """Upload and run the (eager) ingestion task that commits queue."""
    def run(user, name, data, conversation_id=None) -> Document:
        with django_capture_on_commit_callbacks(execute=True):
            document = services.document_upload(user=user, name=name, data=data, conversation_id=conversation_id)
        document.refresh_from_db()
        return document
    return run


@pytest.fixture
def chat(alice):
    return chat_services.conversation_create(user=alice)


def pdf(*pages: str) -> bytes:
    return make_pdf(list(pages))


def encrypted_pdf() -> bytes:
    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(pdf("secret text"))))
    writer.encrypt("password")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def word(*paragraphs: tuple[str, str]) -> bytes:
    """(style, text) pairs: "Heading 1" or "Normal"."""
    document = docx.Document()
    for style, text in paragraphs:
        document.add_paragraph(text, style=style)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def docx_bomb(unzipped_mb: int = 10) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", b"\0" * (unzipped_mb * 2**20))
    return out.getvalue()


@pytest.fixture
def graph_walk(monkeypatch):
    """Every scope walks the HNSW graph, at ef_search 1: the walk comes back
    short, and the statement must redo it exactly."""
    monkeypatch.setattr(selectors, "HNSW_BASE_ROWS", -10**9)
    monkeypatch.setattr(selectors, "HNSW_ROWS_PER_EF", 0)
    monkeypatch.setattr(selectors, "HNSW_EF_SEARCH", 1)
    monkeypatch.setattr(selectors, "HNSW_HEADROOM", 0)
    with connection.cursor() as cursor:
        # For the test's transaction: on tables this small the planner would
        # rather sort the owner's few rows than walk the graph.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_sort = off")
