"""Reads: a thread's ratings, the export with each reply's context, daily ratios."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from django.db.models import Count, Q
from django.db.models.functions import TruncDate

from conversations.selectors import ancestors
from feedback.models import Feedback


def feedback_of_conversation(*, user_id, conversation_id) -> dict:
    """message id -> Feedback, for the replies of one thread (one query)."""
    rows = Feedback.objects.filter(user_id=user_id, message__conversation_id=conversation_id)
    return {f.message_id: f for f in rows}


def feedback_of(*, user, message) -> Feedback | None:
    return Feedback.objects.filter(user=user, message=message).first()


def export_record(feedback: Feedback) -> dict:
    """One JSONL line: the rating, the reply, its model, and the messages before
    it on its branch (the context it answered), oldest first."""
    reply = feedback.message
    path = ancestors(reply)
    return {
        "feedback_id": feedback.id,
        "rating": feedback.rating_name,
        "category": feedback.category,
        "comment": feedback.comment,
        "user_id": feedback.user_id,
        "conversation_id": str(reply.conversation_id),
        "message_id": str(reply.id),
        "model": reply.model,
        "system_prompt": reply.conversation.system_prompt,
        "context": [{"role": m.role, "content": m.content} for m in path[:-1]],
        "reply": {
            "content": reply.content,
            "status": reply.status,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
        },
        "created_at": feedback.created_at.isoformat(),
        "updated_at": feedback.updated_at.isoformat(),
    }


def export_records(queryset: Iterable[Feedback] | None = None) -> Iterator[dict]:
    if queryset is None:
        queryset = Feedback.objects.all()
    rows = queryset.select_related("message__conversation").order_by("updated_at", "id")
    for feedback in rows.iterator(chunk_size=500):
        yield export_record(feedback)


def jsonl_lines(queryset=None) -> Iterator[str]:
    for record in export_records(queryset):
        yield json.dumps(record, ensure_ascii=False) + "\n"


def ratio_by_day(*, since) -> list[dict]:
    """[{day, up, down}] oldest first, by the day a rating was last set."""
    return list(
        Feedback.objects.filter(updated_at__gte=since).order_by()
        .annotate(day=TruncDate("updated_at")).values("day")
        .annotate(up=Count("id", filter=Q(rating=Feedback.Rating.UP)),
                  down=Count("id", filter=Q(rating=Feedback.Rating.DOWN)))
        .order_by("day")
    )
