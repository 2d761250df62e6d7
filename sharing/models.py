"""Share links: a read-only snapshot of one branch of a chat.

The snapshot copies the messages as they were when shared (SharedMessage),
so later edits, new turns or deleting the chat change nothing a viewer
sees. The token is the only key (secrets.token_urlsafe, 256 bits): anyone
holding it may read the snapshot, nobody can guess it. Revoking deletes the
share and its copies, so the link answers 404.
"""
from __future__ import annotations

import secrets
import uuid

from django.conf import settings
from django.db import models

TOKEN_BYTES = 32


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


class Share(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="shares")
    token = models.CharField(max_length=64, unique=True, default=new_token, editable=False)
    title = models.CharField(max_length=200)
    # The chat it was taken from, for the owner's list; the snapshot does not need it.
    conversation = models.ForeignKey("conversations.Conversation", null=True, blank=True,
                                     on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["user", "-created_at"], name="share_user_recent")]

    def __str__(self) -> str:
        return self.title


class SharedMessage(models.Model):
    share = models.ForeignKey(Share, on_delete=models.CASCADE, related_name="messages")
    position = models.PositiveIntegerField()
    role = models.CharField(max_length=10)
    content = models.TextField()
    model = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["position"]
        constraints = [models.UniqueConstraint(fields=["share", "position"], name="sharedmessage_position")]
