"""Ingestion in the Celery worker: a file's text → chunks → vectors and safety verdicts.

The worker embeds with `documents.embedder` (numpy, no torch: the worker
stays free of the chat model's stack; that module says why). A file that has
nothing to index fails at once with the reason; any other fault (the object
store or the database unreachable, the worker killed: acks_late keeps the
message) is retried DOCUMENTS_INGEST_RETRIES times with growing waits, and
then the document says why it failed.
"""
from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings
from django.core.exceptions import ValidationError

from documents import ingestion

log = logging.getLogger(__name__)


@shared_task(bind=True, acks_late=True, max_retries=None, name="documents.ingest_document")
def ingest_document(self, document_id: str) -> None:
    try:
        ingestion.ingest(document_id=document_id)
    except ValidationError as exc:
        ingestion.mark_failed(document_id=document_id, reason=" ".join(exc.messages))
    except Exception as exc:
        attempt = self.request.retries + 1
        reason = f"{type(exc).__name__}: {exc}"[:300]
        if self.request.retries >= settings.DOCUMENTS_INGEST_RETRIES:
            log.exception("ingesting %s failed %d times", document_id, attempt)
            ingestion.mark_failed(document_id=document_id, reason=f"Indexing failed after {attempt} tries: {reason}")
            return
        log.warning("ingesting %s failed (attempt %d); retrying", document_id, attempt, exc_info=True)
        ingestion.mark_retrying(document_id=document_id, reason=reason, attempt=attempt)
        raise self.retry(countdown=settings.DOCUMENTS_RETRY_WAIT_S * 2 ** self.request.retries) from exc
