"""Ingestion: a stored file's text → chunks → vectors and safety verdicts, with progress.

Run by the Celery task (`documents.tasks`) and by `manage.py ingest`. The
progress (chunks embedded of all) is written after each batch, outside any
transaction, so the pages polling it see it move. Each batch is screened
too (`safety.services.judge_passages`, with this module's numpy embedder:
no torch in the worker) and each chunk keeps its verdict and the policy
version it was judged under, so a turn that retrieves it need not screen it
(`documents.context`). `rescreen` (`manage.py screen_documents`) judges the
chunks whose verdict is missing or of an older policy.
"""
from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.db import transaction
from django.db.models import F

from documents import chunking, embedder, formats, storage
from documents.models import Chunk, Document, DocumentPage
from documents.storage import delete_key
from safety import services as safety_services

VERDICT_FIELDS = ["verdict_flagged", "verdict_category", "verdict_version"]


def ingest(*, document_id, progress: Callable[[int, int], None] | None = None) -> Document | None:
    """Extract → chunk → embed in batches. Raises ValidationError for a file
    that has nothing to index (permanent), anything else for a fault worth a retry."""
    document = Document.objects.filter(id=document_id).first()
    if document is None:
        return None  # deleted while queued
    Document.objects.filter(id=document.id).update(status=Document.Status.PROCESSING, chunks_done=0, error="")
    with storage.documents().open(document.storage_key, "rb") as handle:
        data = handle.read()
    sections = formats.extract(document.kind, data)
    pieces = chunking.chunk(sections, size=settings.DOCUMENTS_CHUNK_TOKENS,
                            overlap=settings.DOCUMENTS_CHUNK_OVERLAP_TOKENS)
    chunks = _store_chunks(document, sections, pieces)
    _embed_chunks(document, chunks, progress)
    Document.objects.filter(id=document.id).update(status=Document.Status.READY, error="")
    document.refresh_from_db()
    return document


def _store_chunks(document: Document, sections, pieces) -> list[Chunk]:
    with transaction.atomic():
        DocumentPage.objects.filter(document=document).delete()
        Chunk.objects.filter(document=document).delete()
        DocumentPage.objects.bulk_create(
            DocumentPage(document=document, page=page, text=text)
            for page, text in chunking.page_texts(sections).items())
        chunks = Chunk.objects.bulk_create(
            Chunk(document=document, user_id=document.user_id, ordinal=i, page=p.page, heading=p.heading,
                  text=p.text, start=p.start, end=p.end, tokens=p.tokens)
            for i, p in enumerate(pieces))
        Document.objects.filter(id=document.id).update(chunks_total=len(chunks), chunks_done=0)
    return chunks


def _embed_chunks(document: Document, chunks: list[Chunk], progress) -> None:
    batch_size, model = settings.DOCUMENTS_EMBED_BATCH, embedder.model_name()
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        for chunk_, vector in zip(batch, embedder.embed_batch([c.text for c in batch])):
            chunk_.embedding, chunk_.embedding_model = vector, model
        _judge(batch)
        Chunk.objects.bulk_update(batch, ["embedding", "embedding_model", *VERDICT_FIELDS])
        Document.objects.filter(id=document.id).update(chunks_done=F("chunks_done") + len(batch))
        if progress is not None:
            progress(start + len(batch), len(chunks))


def _judge(batch: list[Chunk]) -> None:
    """Each chunk's safety verdict, on its row (not saved here). A verdict
    the screen could not finish (a checker failed or timed out) is not
    stored: the chunk stays unscreened and its first turn screens it."""
    verdicts = safety_services.judge_passages([c.text for c in batch], embed=embedder.embed_batch)
    for chunk_, verdict in zip(batch, verdicts):
        chunk_.verdict_flagged, chunk_.verdict_category = verdict.flagged, verdict.category
        chunk_.verdict_version = verdict.policy_version


def rescreen(*, batch_size: int | None = None, everything: bool = False,
             progress: Callable[[int], None] | None = None) -> int:
    """Judge the chunks whose stored verdict is not of the current policy
    (all with `everything`). Returns how many were judged."""
    batch_size = batch_size or settings.DOCUMENTS_EMBED_BATCH
    stale = Chunk.objects.all() if everything else Chunk.objects.exclude(
        verdict_version=safety_services.policy_version())
    ids = list(stale.order_by("id").values_list("id", flat=True))
    for start in range(0, len(ids), batch_size):
        batch = list(Chunk.objects.filter(id__in=ids[start:start + batch_size]).order_by("id"))
        _judge(batch)
        Chunk.objects.bulk_update(batch, VERDICT_FIELDS)
        if progress is not None:
            progress(len(batch))
    return len(ids)


def mark_retrying(*, document_id, reason: str, attempt: int) -> None:
    Document.objects.filter(id=document_id).update(
        status=Document.Status.PENDING, error=f"Attempt {attempt} failed ({reason}); retrying.")


def mark_failed(*, document_id, reason: str) -> None:
    """A file that cannot be indexed: its chunks, pages and stored file go
    (nothing half-indexed stays searchable); the row stays to say why."""
    document = Document.objects.filter(id=document_id).first()
    if document is None:
        return
    with transaction.atomic():
        Chunk.objects.filter(document=document).delete()
        DocumentPage.objects.filter(document=document).delete()
        Document.objects.filter(id=document.id).update(
            status=Document.Status.FAILED, error=reason[:2000], chunks_done=0, chunks_total=0,
            size_bytes=0, storage_key="")
    if document.storage_key:
        transaction.on_commit(lambda: delete_key(document.storage_key))


def reindex(*, batch_size: int | None = None, everything: bool = False,
            progress: Callable[[int], None] | None = None) -> int:
    """Re-embed the chunks made by another embedding model (all with
    `everything`). Returns how many were re-embedded."""
    batch_size = batch_size or settings.DOCUMENTS_EMBED_BATCH
    model = embedder.model_name()
    stale = Chunk.objects.all() if everything else Chunk.objects.exclude(embedding_model=model)
    ids = list(stale.order_by("id").values_list("id", flat=True))
    for start in range(0, len(ids), batch_size):
        batch = list(Chunk.objects.filter(id__in=ids[start:start + batch_size]).order_by("id"))
        for chunk_, vector in zip(batch, embedder.embed_batch([c.text for c in batch])):
            chunk_.embedding, chunk_.embedding_model = vector, model
        Chunk.objects.bulk_update(batch, ["embedding", "embedding_model"])
        if progress is not None:
            progress(len(batch))
    return len(ids)
