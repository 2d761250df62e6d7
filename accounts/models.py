"""Accounts data the product adds to Django's User: invite codes (sign-up
policy "invite") and review flags (abuse controls)."""
from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone


def new_invite_code() -> str:
    return secrets.token_urlsafe(12)


class InviteCode(models.Model):
    """A code that lets `max_uses` people sign up while SIGNUP_POLICY=invite."""

    code = models.CharField(max_length=64, unique=True, default=new_invite_code)
    note = models.CharField(max_length=200, blank=True, help_text="who it is for")
    max_uses = models.PositiveIntegerField(default=1, help_text="1: single use")
    uses = models.PositiveIntegerField(default=0, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="empty: never")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.code[:6]}… ({self.uses}/{self.max_uses})"

    @property
    def usable(self) -> bool:
        return self.uses < self.max_uses and (self.expires_at is None or self.expires_at > timezone.now())


class ReviewFlag(models.Model):
    """Raised when a user's text was blocked ABUSE_REVIEW_BLOCKS times within
    ABUSE_REVIEW_WINDOW_S; staff look, then ban or resolve."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="review_flags")
    reason = models.CharField(max_length=300)
    blocks = models.PositiveIntegerField(default=0)
    categories = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # One open flag per user: further blocks add to it instead of piling up.
            models.UniqueConstraint(fields=["user"], condition=models.Q(resolved_at__isnull=True),
                                    name="review_one_open_flag_per_user"),
        ]

    def __str__(self):
        return f"{self.user} — {self.reason}"
