"""What the assistant remembers about a user, across chats.

A memory is one short fact in the user's words. It is *active* (retrieved by
similarity into the context of later turns) or a *suggestion* (extracted
after a reply by the model, waiting on the Memory page for the user to
accept, edit or delete it). Suggestions carry no embedding: they are made by
the Celery worker, which holds no model (chatapp.celery); a memory is
embedded when it becomes active, in the web process.

Memory sits below conversations: it stores message and reply ids, never
foreign keys into the chat's tables, so it imports nothing of them.
"""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from pgvector.django import HnswIndex, VectorField

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2 (retrieval.services)


class Memory(models.Model):
    class Status(models.TextChoices):
        SUGGESTED = "suggested"
        ACTIVE = "active"

    class Source(models.TextChoices):
        EXPLICIT = "explicit", "asked to remember in a chat"
        MESSAGE = "message", "saved from a message"
        AUTO = "auto", "suggested after a reply"
        MANUAL = "manual", "added on the Memory page"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memories")
    text = models.TextField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    source = models.CharField(max_length=10, choices=Source.choices)
    # None for suggestions (see the module's docstring).
    embedding = VectorField(dimensions=EMBEDDING_DIM, null=True, blank=True)
    # The reply of the turn that saved or suggested it (a conversations.Message id).
    source_reply_id = models.UUIDField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "status", "-created_at"], name="memory_user_status"),
            HnswIndex(name="memory_embedding_hnsw", fields=["embedding"], m=16, ef_construction=64,
                      opclasses=["vector_cosine_ops"]),
        ]

    def __str__(self) -> str:
        return self.text[:60]


class MemoryUse(models.Model):
    """A memory a reply was written with (USED) or that its turn saved (SAVED):
    what the reply's "used N memories" disclosure shows."""

    class Kind(models.TextChoices):
        USED = "used"
        SAVED = "saved"

    reply_id = models.UUIDField()  # a conversations.Message id
    memory = models.ForeignKey(Memory, on_delete=models.CASCADE, related_name="uses")
    kind = models.CharField(max_length=5, choices=Kind.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["reply_id"], name="memoryuse_reply")]
        constraints = [
            models.UniqueConstraint(fields=["reply_id", "memory", "kind"], name="memoryuse_once"),
        ]


class MemorySettings(models.Model):
    """Per-user switch; no row means memory is on."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memory_settings")
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)
