"""The audit log: one append-only row per security-relevant event.

Rows are never changed or removed through the ORM (the queryset and the
model refuse) and the database refuses too (a trigger, migration 0001), except
for one change: deleting a user nulls their foreign keys here, and the names
copied into `actor_name`/`target_name` keep the record readable.
"""
from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class AppendOnlyError(RuntimeError):
    """The audit log is append-only."""


class AuditEventQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise AppendOnlyError("audit events cannot be changed")

    def delete(self):
        raise AppendOnlyError("audit events cannot be deleted")

    def bulk_update(self, objs, fields, batch_size=None):
        raise AppendOnlyError("audit events cannot be changed")


class AuditEvent(models.Model):
    class Kind(models.TextChoices):
        LOGIN = "login", "sign-in"
        LOGIN_FAILED = "login_failed", "failed sign-in"
        LOCKED_OUT = "locked_out", "sign-in locked out"
        SIGNUP = "signup", "sign-up"
        ADMIN_CREATED = "admin_created", "first admin created (setup token)"
        API_KEY_CREATED = "api_key_created", "API key created"
        API_KEY_REVOKED = "api_key_revoked", "API key revoked"
        BAN = "ban", "user banned"
        UNBAN = "unban", "user unbanned"
        REVIEW_FLAG = "review_flag", "review flag raised"
        ADMIN_CHANGE = "admin_change", "admin change"
        MODERATION_BLOCK = "moderation_block", "moderation block"
        CONVERSATION_READ = "conversation_read", "staff read a conversation"

    created_at = models.DateTimeField(default=timezone.now, db_index=True, editable=False)
    kind = models.CharField(max_length=32, choices=Kind.choices, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="who did it (empty: anonymous or the system)",
    )
    actor_name = models.CharField(max_length=150, blank=True)
    target_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="whose account, key, conversation or text it concerns",
    )
    target_name = models.CharField(max_length=150, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    summary = models.CharField(max_length=300)
    data = models.JSONField(default=dict, blank=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["target_user", "-created_at"], name="audit_target_newest")]

    def __str__(self):
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.kind}: {self.summary}"

    def save(self, *args, **kwargs):
        # Why a save() guard: the append-only rule has to hold for every
        # caller, including the admin and a shell, not only for services.
        if not self._state.adding:
            raise AppendOnlyError("audit events cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("audit events cannot be deleted")
