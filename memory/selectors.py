"""Reads for memory. `access_memory` is the only way a request fetches a
memory it names: another user's id answers 404, like a missing one."""
from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Exists, Subquery
from django.http import Http404
from pgvector.django import CosineDistance

from memory.models import Memory, MemorySettings, MemoryUse


def access_memory(*, user, memory_id) -> Memory:
    if not getattr(user, "is_authenticated", False):
        raise Http404("No such memory")
    try:
        return Memory.objects.get(id=memory_id, user=user)
    except (Memory.DoesNotExist, ValueError, TypeError):
        raise Http404("No such memory") from None


def memory_enabled(*, user_id) -> bool:
    enabled = MemorySettings.objects.filter(user_id=user_id).values_list("enabled", flat=True).first()
    return True if enabled is None else enabled


def memory_list(*, user, status: str) -> list[Memory]:
    return list(Memory.objects.filter(user=user, status=status).order_by("-created_at"))


def turn_state_query(*, user_id) -> tuple[str, tuple]:
    """(memory enabled, any active memory), a turn's two questions, as one
    query's (sql, params), which conversations.context.turn_facts reads with
    the turn's other questions in one round trip; `turn_state_from` reads
    its row (two columns; None or all NULL when the user is gone)."""
    enabled = MemorySettings.objects.filter(user_id=user_id).values("enabled")[:1]
    active = Memory.objects.filter(user_id=user_id, status=Memory.Status.ACTIVE)
    return (get_user_model().objects.filter(pk=user_id)
            .annotate(enabled=Subquery(enabled), any_active=Exists(active))
            .values_list("enabled", "any_active").order_by()[:1].query.sql_with_params())


def turn_state_from(row) -> tuple[bool, bool]:
    if row is None or row[1] is None:  # no such user
        return False, False
    return (True if row[0] is None else row[0]), row[1]


def relevant(*, user_id, vector: list[float], limit: int) -> list[Memory]:
    """The user's active memories nearest to `vector`, nearest first, at
    least MEMORY_MIN_SIMILARITY alike (cosine)."""
    max_distance = 1.0 - settings.MEMORY_MIN_SIMILARITY
    return list(
        Memory.objects.filter(user_id=user_id, status=Memory.Status.ACTIVE, embedding__isnull=False)
        .annotate(distance=CosineDistance("embedding", vector))
        .filter(distance__lte=max_distance)
        .order_by("distance")[:limit]
    )


def known_texts(*, user_id) -> list[str]:
    """Every memory's text, suggestions included (to skip duplicates)."""
    return list(Memory.objects.filter(user_id=user_id).values_list("text", flat=True))


@dataclass
class ReplyMemories:
    used: list[Memory] = field(default_factory=list)
    saved: list[Memory] = field(default_factory=list)


def uses_for_replies(*, reply_ids) -> dict:
    """reply id → ReplyMemories, for a thread's replies, in one query."""
    uses: dict = {}
    rows = MemoryUse.objects.filter(reply_id__in=list(reply_ids)).select_related("memory").order_by("created_at")
    for use in rows:
        entry = uses.setdefault(use.reply_id, ReplyMemories())
        (entry.used if use.kind == MemoryUse.Kind.USED else entry.saved).append(use.memory)
    return uses
