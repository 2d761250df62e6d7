"""Writes for memory, and the memory block of a turn's context.

`turn_memory` is the one entry point of the chat's turn (called by the
context builder, conversations.context, in the "build context" stage): it
saves what the user's message asks to be remembered, retrieves the active
memories nearest to the message by similarity within memory's own token
budget, records which ones the reply was written with, and returns the text
for the system message.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q

from memory import detection, selectors
from memory.models import Memory, MemorySettings, MemoryUse
from retrieval.services import embed

log = logging.getLogger(__name__)

MEMORY_HEADER = (
    "Facts the user asked you to remember about them, in their words (use them when they help; "
    "do not list them unless asked):"
)
SAVED_NOTE = 'The user just asked you to remember: "{fact}". It is now saved to their memory; confirm it briefly.'
# MiniLM reads about 256 tokens; a longer query only costs time.
QUERY_MAX_CHARS = 2000


# ------------------------------------------------------------ checks

def check_text(text) -> str:
    text = " ".join((text or "").split())
    if not text:
        raise ValidationError("A memory cannot be empty.")
    if "\x00" in text:
        raise ValidationError("The text contains a NUL character (\\0), which cannot be stored; remove it and try again.")
    limit = settings.MEMORY_MAX_CHARS
    if len(text) > limit:
        raise ValidationError(f"A memory is at most {limit:,} characters; this one is {len(text):,}. Shorten it.")
    return text


def check_enabled(*, user_id) -> None:
    if not selectors.memory_enabled(user_id=user_id):
        raise ValidationError("Memory is switched off. Switch it on under Custom instructions to save memories.")


def _check_room(user_id) -> None:
    if Memory.objects.filter(user_id=user_id).count() >= settings.MEMORY_MAX_PER_USER:
        raise ValidationError(
            f"You have {settings.MEMORY_MAX_PER_USER:,} memories, the most one account may keep. Delete some first."
        )


def _vector(text: str) -> list[float]:
    return embed([text])[0]


# ------------------------------------------------------------ memories

def memory_create(*, user_id, text, source: str, reply_id=None) -> Memory:
    """An active memory (embedded now). Saving a fact that is already there,
    even as a suggestion, returns that memory, made active, instead of a copy."""
    text = check_text(text)
    existing = _same_text(user_id, text)
    if existing is not None:
        return memory_accept(memory=existing) if existing.status != Memory.Status.ACTIVE else existing
    _check_room(user_id)
    memory = Memory(user_id=user_id, text=text, source=source, status=Memory.Status.ACTIVE,
                    embedding=_vector(text), source_reply_id=reply_id)
    memory.save()
    return memory


def _same_text(user_id, text: str) -> Memory | None:
    """The user's memory with this text, up to case and end punctuation
    (check_text has already folded the spacing)."""
    stem = text.rstrip(".!")
    same = Q(text__iexact=stem) | Q(text__iexact=stem + ".") | Q(text__iexact=stem + "!")
    return Memory.objects.filter(same, user_id=user_id).order_by("status").first()


def memory_accept(*, memory: Memory, text=None) -> Memory:
    """A suggestion becomes active, with the user's edits when given."""
    if text is not None:
        memory.text = check_text(text)
    memory.status = Memory.Status.ACTIVE
    memory.embedding = _vector(memory.text)
    memory.save(update_fields=["text", "status", "embedding", "updated_at"])
    return memory


def memory_update(*, memory: Memory, text) -> Memory:
    memory.text = check_text(text)
    fields = ["text", "updated_at"]
    if memory.status == Memory.Status.ACTIVE:
        memory.embedding = _vector(memory.text)
        fields.append("embedding")
    memory.save(update_fields=fields)
    return memory


def memory_delete(*, memory: Memory) -> None:
    memory.delete()


def memory_save_message(*, user_id, text, message_id) -> Memory:
    """*Save to memory* on a chat message."""
    check_enabled(user_id=user_id)
    return memory_create(user_id=user_id, text=text, source=Memory.Source.MESSAGE, reply_id=message_id)


def settings_update(*, user, enabled: bool) -> MemorySettings:
    prefs, _ = MemorySettings.objects.update_or_create(user=user, defaults={"enabled": enabled})
    return prefs


@transaction.atomic
def suggestions_create(*, user_id, reply_id, facts: list[str]) -> list[Memory]:
    """Facts the model found after a reply, as suggestions; ones the user
    already has (any status), empty or overlong ones are skipped."""
    if not selectors.memory_enabled(user_id=user_id):  # switched off since the reply
        return []
    known = {detection.normalized(t) for t in selectors.known_texts(user_id=user_id)}
    room = settings.MEMORY_MAX_PER_USER - len(known)
    created = []
    for fact in facts:
        try:
            text = check_text(fact)
        except ValidationError:
            continue
        if detection.normalized(text) in known or len(created) >= room:
            continue
        known.add(detection.normalized(text))
        created.append(Memory.objects.create(user_id=user_id, text=text, status=Memory.Status.SUGGESTED,
                                             source=Memory.Source.AUTO, source_reply_id=reply_id))
    return created


# ------------------------------------------------------------ a turn's memory

@dataclass
class TurnMemory:
    text: str = ""  # for the system message; "" when nothing applies
    used: list[Memory] = field(default_factory=list)
    saved: Memory | None = None


def budget_tokens(window_tokens: int) -> int:
    """Memory's share of the context window: MEMORY_CONTEXT_TOKENS, and never
    more than MEMORY_CONTEXT_SHARE of the window (small models keep room for
    the conversation itself)."""
    return max(0, min(settings.MEMORY_CONTEXT_TOKENS, int(window_tokens * settings.MEMORY_CONTEXT_SHARE)))


def turn_memory(*, user_id, reply_id, message: str, budget: int, count_tokens: Callable[[str], int],
                state: tuple[bool, bool]) -> TurnMemory:
    """Save an explicit "remember that …" of `message`, then pick the active
    memories nearest to it that fit `budget` tokens (`count_tokens` counts
    a system text with the model's tokenizer), and record both on the reply.
    `state`: (memory enabled, any active memory), as the turn read them
    (`selectors.turn_state_query`)."""
    enabled, any_active = state
    if not enabled:
        return TurnMemory()
    turn = TurnMemory(saved=_remember_explicit(user_id, message, reply_id))
    notes = [SAVED_NOTE.format(fact=turn.saved.text)] if turn.saved else []
    if notes and count_tokens(notes[0]) > budget:
        notes = []  # the reply's "saved to memory" line still confirms it
    lines: list[str] = []
    # None active before this turn: no embedding to compute (most turns); a
    # memory saved just now is left out of the nearest anyway.
    for memory in (_nearest(user_id, message, exclude=turn.saved) if any_active else []):
        text = _block(notes, lines + [f"- {memory.text}"])
        if count_tokens(text) > budget:
            break  # nearest first: the rest matter less
        lines.append(f"- {memory.text}")
        turn.used.append(memory)
    turn.text = _block(notes, lines)
    _record_uses(reply_id, turn)
    return turn


def _block(notes: list[str], lines: list[str]) -> str:
    parts = list(notes)
    if lines:
        parts.append(MEMORY_HEADER + "\n" + "\n".join(lines))
    return "\n\n".join(parts)


def _remember_explicit(user_id, message: str, reply_id) -> Memory | None:
    fact = detection.explicit_fact(message)
    if fact is None:
        return None
    try:
        return memory_create(user_id=user_id, text=fact, source=Memory.Source.EXPLICIT, reply_id=reply_id)
    except ValidationError as exc:  # too long, or no room: the reply goes on without it
        log.info("not remembering %r for user %s: %s", fact[:80], user_id, " ".join(exc.messages))
        return None


def _nearest(user_id, message: str, *, exclude: Memory | None) -> list[Memory]:
    vector = _vector(message[:QUERY_MAX_CHARS])
    nearest = selectors.relevant(user_id=user_id, vector=vector, limit=settings.MEMORY_MAX_RESULTS + 1)
    return [m for m in nearest if exclude is None or m.id != exclude.id][: settings.MEMORY_MAX_RESULTS]


def _record_uses(reply_id, turn: TurnMemory) -> None:
    rows = [MemoryUse(reply_id=reply_id, memory=m, kind=MemoryUse.Kind.USED) for m in turn.used]
    if turn.saved is not None:
        rows.append(MemoryUse(reply_id=reply_id, memory=turn.saved, kind=MemoryUse.Kind.SAVED))
    try:
        MemoryUse.objects.bulk_create(rows, ignore_conflicts=True)
    except IntegrityError:  # a memory deleted meanwhile: the disclosure is not worth the turn
        log.info("memory uses of %s not recorded", reply_id)
