"""Writes: a user rates a reply they were given."""
from __future__ import annotations

from conversations.models import Message
from conversations.selectors import access_message
from feedback.models import MAX_COMMENT_CHARS, Feedback

RATINGS = {"up": Feedback.Rating.UP, "down": Feedback.Rating.DOWN}


class FeedbackError(ValueError):
    """A rating the product cannot store; the message says what to change."""


def check_feedback(*, rating, category="", comment="") -> tuple[int, str, str]:
    """(rating, category, comment) ready to store, or FeedbackError."""
    if rating not in RATINGS:
        raise FeedbackError("Choose thumbs up or thumbs down.")
    category = (category or "").strip()
    if category and category not in Feedback.Category.values:
        raise FeedbackError(f"Unknown category; choose one of: {', '.join(Feedback.Category.values)}.")
    comment = (comment or "").strip()
    if "\x00" in comment:
        raise FeedbackError("The comment contains a NUL character (\\0); remove it and try again.")
    if len(comment) > MAX_COMMENT_CHARS:
        raise FeedbackError(f"The comment is {len(comment):,} characters long; the limit is {MAX_COMMENT_CHARS:,}.")
    return RATINGS[rating], category, comment


def access_reply(*, user, message_id) -> Message:
    """A finished assistant reply of this user's (404 for anyone else's)."""
    message = access_message(user=user, message_id=message_id)
    if message.role != Message.Role.ASSISTANT:
        raise FeedbackError("Only replies can be rated.")
    if not message.is_terminal:
        raise FeedbackError("Wait for the reply to finish before rating it.")
    return message


def feedback_set(*, user, message: Message, rating, category="", comment="") -> Feedback:
    """Create or change the user's one rating of a reply."""
    value, category, comment = check_feedback(rating=rating, category=category, comment=comment)
    feedback, _ = Feedback.objects.update_or_create(
        user=user, message=message,
        defaults={"rating": value, "category": category, "comment": comment, "model": message.model},
    )
    return feedback


def feedback_clear(*, user, message: Message) -> None:
    Feedback.objects.filter(user=user, message=message).delete()
