"""The "documents" storage (settings.STORAGES): the file system under
DATA_DIR, or an S3-compatible bucket through django-storages."""
from __future__ import annotations

import logging

from django.core.files.storage import storages

log = logging.getLogger(__name__)


def documents():
    return storages["documents"]


def delete_key(key: str) -> None:
    """Remove a stored file; a failure is logged (an orphan file), never raised."""
    try:
        documents().delete(key)
    except Exception:
        log.exception("could not delete the stored file %s", key)
