"""Users' ratings of the replies they were given (issue 15)."""
from __future__ import annotations

from django.conf import settings
from django.db import models

MAX_COMMENT_CHARS = 4000


class Feedback(models.Model):
    """One rating per user per reply; a later rating replaces the earlier one."""

    class Rating(models.IntegerChoices):
        UP = 1, "thumbs up"
        DOWN = -1, "thumbs down"

    class Category(models.TextChoices):
        INACCURATE = "inaccurate", "inaccurate"
        UNHELPFUL = "unhelpful", "unhelpful"
        HARMFUL = "harmful", "harmful or unsafe"
        TOO_LONG = "too_long", "too long"
        OTHER = "other", "other"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="feedback")
    message = models.ForeignKey("conversations.Message", on_delete=models.CASCADE, related_name="feedback")
    rating = models.SmallIntegerField(choices=Rating.choices)
    category = models.CharField(max_length=16, choices=Category.choices, blank=True)
    comment = models.TextField(blank=True, max_length=MAX_COMMENT_CHARS)
    # The model that wrote the reply, copied so the admin filters without a join.
    model = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        constraints = [models.UniqueConstraint(fields=["user", "message"], name="feedback_one_per_user_reply")]
        indexes = [models.Index(fields=["-updated_at"], name="feedback_newest")]
        verbose_name_plural = "feedback"

    def __str__(self) -> str:
        return f"{self.get_rating_display()} on {self.message_id}"

    @property
    def rating_name(self) -> str:
        return "up" if self.rating == self.Rating.UP else "down"
