"""Moderation hooks the gateway runs on every prompt and every reply.

The default policy is rule based: SAFETY_BLOCKED_TERMS, matched without regard
to case. A model-based classifier can replace `_flagged_term` later without
changing the callers. Replies are moderated while they stream: text is held
back just long enough that a blocked term split across tokens is caught before
any of it reaches the user (never send first and check later).
"""
from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    category: str = ""
    reason: str = ""


ALLOWED = Verdict(flagged=False)


def _flagged_term(text: str) -> str | None:
    lowered = text.lower()
    for term in settings.SAFETY_BLOCKED_TERMS:
        if term in lowered:
            return term
    return None


def moderate_input(text: str) -> Verdict:
    term = _flagged_term(text)
    if term is None:
        return ALLOWED
    return Verdict(flagged=True, category="blocked_term", reason="The message contains a blocked term.")


def moderate_output(text: str) -> Verdict:
    term = _flagged_term(text)
    if term is None:
        return ALLOWED
    return Verdict(flagged=True, category="blocked_term", reason="The reply was stopped by the content policy.")


class OutputWindow:
    """Streams a reply through moderation, releasing only text already checked."""

    def __init__(self):
        terms = settings.SAFETY_BLOCKED_TERMS
        # The tail that could still be the start of a blocked term.
        self.hold_chars = max((len(t) for t in terms), default=1) - 1
        self.active = bool(terms)
        self.text = ""
        self.released = 0
        self.verdict = ALLOWED

    def push(self, piece: str) -> str:
        """Add generated text; return what may be shown now ("" once flagged)."""
        if not self.active:
            return piece
        if self.verdict.flagged:
            return ""
        self.text += piece
        # Only the unreleased part plus the held-back overlap can hold a new match.
        start = max(0, self.released - self.hold_chars)
        self.verdict = moderate_output(self.text[start:])
        if self.verdict.flagged:
            return ""
        end = max(self.released, len(self.text) - self.hold_chars)
        out, self.released = self.text[self.released:end], end
        return out

    def flush(self) -> str:
        """At the end of the reply: release the held-back tail (if not flagged)."""
        if not self.active or self.verdict.flagged:
            return ""
        out, self.released = self.text[self.released:], len(self.text)
        return out
