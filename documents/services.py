"""Writes: uploads, deletes, the ingestion pipeline, a chat's sources.

An upload is checked by content (`formats.inspect`) and against the size and
quota limits before anything is stored; then its file is saved in the
"documents" storage and its row in one transaction, the file removed again if
the row fails, so a refused or failed upload leaves nothing behind and
touches no other file. Ingestion (`document_ingest`, run by the Celery task
or by `manage.py ingest`) extracts, chunks and embeds in batches, updating
the progress the pages poll. A verdict a turn had to screen is written back
to its chunk (`chunk_verdicts_store_soon`), off the turn's path.
"""
from __future__ import annotations

import logging
import uuid

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import Sum
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django.utils.text import get_valid_filename

from chatapp import runtime
from documents import formats, storage, tasks
from documents.models import ChatSources, Chunk, Document, ReplySources
from documents.storage import delete_key
from safety.services import PassageVerdict

log = logging.getLogger(__name__)
MB = 2**20


# ------------------------------------------------------------ upload

def document_upload(*, user, name: str, data: bytes, conversation_id=None, enqueue: bool = True) -> Document:
    """Check, store and (after commit) queue a file for ingestion.
    ValidationError says what is wrong; nothing is stored then."""
    name = (name or "upload").rsplit("/", 1)[-1].rsplit("\\", 1)[-1][:200] or "upload"
    check_size(name=name, size=len(data))
    inspected = formats.inspect(name, data)
    doc_id = uuid.uuid4()
    key = f"{user.id}/{doc_id}/{get_valid_filename(name)[:100] or 'file'}"
    with transaction.atomic():
        # The user's row is the lock that keeps two uploads from both fitting the quota.
        get_user_model().objects.select_for_update().filter(id=user.id).first()
        _check_quota(user, len(data))
        stored = storage.documents().save(key, ContentFile(data))
        try:
            document = Document.objects.create(
                id=doc_id, user=user, conversation_id=conversation_id, name=name, kind=inspected.kind,
                storage_key=stored, size_bytes=len(data), pages=inspected.pages,
            )
        except Exception:
            storage.documents().delete(stored)
            raise
        if enqueue:
            transaction.on_commit(lambda: _enqueue(document.id))
    return document


def check_size(*, name: str, size: int) -> None:
    """The per-file limit (views check it before reading an upload into memory)."""
    if size > settings.DOCUMENTS_MAX_FILE_MB * MB:
        raise ValidationError(
            f"{name} is {size / MB:.1f} MB; the limit is {settings.DOCUMENTS_MAX_FILE_MB:g} MB per file.")


def _check_quota(user, size: int) -> None:
    used = Document.objects.filter(user=user).aggregate(total=Sum("size_bytes"))["total"] or 0
    quota = settings.DOCUMENTS_USER_QUOTA_MB * MB
    if used + size > quota:
        raise ValidationError(
            f"This file ({size / MB:.1f} MB) would take your documents to {(used + size) / MB:.1f} MB; "
            f"your quota is {settings.DOCUMENTS_USER_QUOTA_MB:g} MB. Delete some documents first.")


def _enqueue(document_id) -> None:
    tasks.ingest_document.delay(str(document_id))


# ------------------------------------------------------------ delete

def document_delete(*, document: Document) -> None:
    """The row, its pages, chunks and vectors (cascade), then its file."""
    document.delete()


@receiver(post_delete, sender=Document)
def _delete_file(sender, instance: Document, **kwargs) -> None:
    # A receiver, not document_delete: a chat or an account deleted elsewhere
    # cascades to its documents without calling this app, and their files
    # must go too. After commit, so a rolled-back delete keeps its file.
    key = instance.storage_key
    if key:
        transaction.on_commit(lambda: delete_key(key))


# ------------------------------------------------------------ a chat's sources

def chat_use_library(*, conversation_id, on: bool) -> None:
    ChatSources.objects.update_or_create(conversation_id=conversation_id, defaults={"use_library": on})


def record_sources(*, reply, conversation, passages) -> None:
    """What a reply was given, for its sources panel (nothing when no passage was searched)."""
    if passages.items or passages.flagged:
        ReplySources.objects.update_or_create(reply_id=reply.id, defaults={
            "conversation_id": conversation.id, "user_id": conversation.user_id,
            "items": passages.items, "flagged": passages.flagged})


# ------------------------------------------------------------ verdicts

def chunk_verdicts_store(*, verdicts: list[tuple[int, PassageVerdict]]) -> None:
    """(chunk id, verdict) pairs onto their chunks; a verdict
    with no policy version (the screen could not finish) is not stored."""
    groups: dict[tuple, list[int]] = {}
    for chunk_id, verdict in verdicts:
        if verdict.policy_version:
            groups.setdefault((verdict.flagged, verdict.category, verdict.policy_version), []).append(chunk_id)
    for (flagged, category, version), ids in groups.items():
        Chunk.objects.filter(id__in=ids).update(verdict_flagged=flagged, verdict_category=category,
                                                verdict_version=version)


def chunk_verdicts_store_soon(*, verdicts: list[tuple[int, PassageVerdict]]):
    """`chunk_verdicts_store` on a ledger database thread (commits unsynced:
    a verdict lost in a crash is only screened again), so the turn that
    screened them does not wait. Returns the future."""
    future = runtime.db_threads(runtime.LEDGER_DB).submit(chunk_verdicts_store, verdicts=verdicts)
    future.add_done_callback(_log_failure)
    return future


def _log_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("storing passage verdicts failed", exc_info=future.exception())
