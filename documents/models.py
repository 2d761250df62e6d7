"""Documents: uploaded files, their pages and chunks, and what a reply cited.

A document belongs to one user, and either to one chat (an attachment) or,
with no chat, to the user's library. Its file lives in the "documents"
storage (the file system under DATA_DIR, or an S3-compatible bucket); its
text lives here, a page per row, and its chunks carry the vector (pgvector,
HNSW) and the full-text vector (a generated tsvector column with a GIN
index, created by migration 0001 in SQL: the ORM never writes it), and the
safety screen's stored verdict. Every chunk repeats its owner so each
search filters on one indexed column.
"""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from pgvector.django import HnswIndex, VectorField

from documents.embedder import DIMENSIONS


class Document(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        PROCESSING = "processing"
        READY = "ready"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="documents")
    # None: the user's library; else an attachment of that chat.
    conversation = models.ForeignKey(
        "conversations.Conversation", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    name = models.CharField(max_length=255)
    kind = models.CharField(max_length=8)
    storage_key = models.CharField(max_length=300)
    size_bytes = models.BigIntegerField()
    pages = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    chunks_done = models.PositiveIntegerField(default=0)
    chunks_total = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["user", "conversation", "status"], name="doc_user_scope")]

    def __str__(self) -> str:
        return self.name

    @property
    def progress_percent(self) -> int:
        if self.status == self.Status.READY:
            return 100
        return int(100 * self.chunks_done / self.chunks_total) if self.chunks_total else 0

    @property
    def in_progress(self) -> bool:
        return self.status in (self.Status.PENDING, self.Status.PROCESSING)


class DocumentPage(models.Model):
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="page_texts")
    page = models.PositiveIntegerField()
    text = models.TextField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["document", "page"], name="docpage_unique")]


class Chunk(models.Model):
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    ordinal = models.PositiveIntegerField()
    page = models.PositiveIntegerField()
    heading = models.CharField(max_length=200, blank=True)
    text = models.TextField()
    start = models.PositiveIntegerField()  # offsets in the page's text
    end = models.PositiveIntegerField()
    tokens = models.PositiveIntegerField()
    embedding = VectorField(dimensions=DIMENSIONS, null=True)
    embedding_model = models.CharField(max_length=300, blank=True)
    # The safety screen's verdict, judged at ingestion (or written back by the
    # turn that screened it) under `verdict_version`, safety's policy version:
    # a turn trusts it only while that is still the current one ("" : never screened).
    # (Defaults in the database too: chunks loaded by COPY, as bench.retrieval does, start unscreened.)
    verdict_flagged = models.BooleanField(default=False, db_default=False)
    verdict_category = models.CharField(max_length=32, blank=True, default="", db_default="")
    verdict_version = models.CharField(max_length=32, blank=True, default="", db_default="")

    class Meta:
        ordering = ["document", "ordinal"]
        indexes = [
            models.Index(fields=["user", "document"], name="chunk_user_doc"),
            HnswIndex(name="chunk_embedding_hnsw", fields=["embedding"], m=16, ef_construction=64,
                      opclasses=["vector_cosine_ops"]),
        ]


class ChatSources(models.Model):
    """A chat's "use my library" switch (its attachments are always searched)."""
    conversation = models.OneToOneField(
        "conversations.Conversation", primary_key=True, on_delete=models.CASCADE, related_name="+"
    )
    use_library = models.BooleanField(default=False)


class ReplySources(models.Model):
    """The passages a reply was given, numbered as the model saw them ([1]...),
    and how many the content policy left out."""
    reply = models.OneToOneField("conversations.Message", primary_key=True, on_delete=models.CASCADE, related_name="+")
    conversation = models.ForeignKey("conversations.Conversation", on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    items = models.JSONField(default=list)  # [{n, chunk_id, document, page, heading, snippet}]
    flagged = models.PositiveIntegerField(default=0)
