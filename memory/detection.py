"""Finding "remember that …" in a user's message, and facts in a model's list.

Explicit requests are imperative: the verb starts a sentence ("Remember
that …", "Please remember: …", "Can you remember my …", "btw, don't forget
that …"). Questions and recollections ("Do you remember that film?", "I
remember that day", "Remember when we …") are not requests, and neither are
reminders ("Remember to call mum"): nothing is saved for them.
"""
from __future__ import annotations

import re

_LEAD = r"(?:(?:hey|ok|okay|so|also|and|oh|btw|by the way)[,!]?\s+)*"
_POLITE = r"(?:(?:please|pls|kindly)\s+)?(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?)?"
_VERB = r"(?:remember|memori[sz]e|don'?t\s+forget|do\s+not\s+forget|keep\s+in\s+mind|note\s+down|save\s+to\s+memory)"
# What may follow the verb: "that", a colon, or a statement starting with a
# first-person word ("remember my birthday is …", "remember I'm vegetarian").
_LINK = r"(?:\s*:\s*|\s+that\s+|,\s*|\s+(?=(?:i|i'm|i've|i'd|i'll|my|we|we're|our|me)\b))"
_REQUEST = re.compile(
    rf"(?:^|(?<=[.!?\n]))\s*{_LEAD}{_POLITE}{_VERB}(?:\s+(?:this|the following))?{_LINK}(?P<fact>.+)",
    re.IGNORECASE | re.DOTALL,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
NO_FACTS = {"none", "none.", "no facts", "nothing", "n/a"}


def explicit_fact(text: str) -> str | None:
    """The fact a message asks to be remembered, or None. Only its first
    sentence: "Remember that I'm vegetarian. What should I cook?" saves the
    first and leaves the question to the reply."""
    match = _REQUEST.search(text or "")
    if match is None:
        return None
    fact = _SENTENCE_END.split(match.group("fact").strip(), maxsplit=1)[0]
    fact = re.sub(r",?\s*(?:please|thanks|thank you)[.!]*$", "", fact.strip(), flags=re.IGNORECASE)
    fact = fact.strip().rstrip(".!?").strip()
    if len(fact.split()) < 2:  # "remember that." or "remember this:" says nothing yet
        return None
    return fact[0].upper() + fact[1:]


def parse_fact_list(text: str, *, limit: int, max_chars: int) -> list[str]:
    """The facts of a model's answer: one per line, bulleted or not; "none"
    and overlong lines dropped, duplicates removed, at most `limit`."""
    facts: list[str] = []
    seen: set[str] = set()
    for line in (text or "").splitlines():
        fact = _BULLET.sub("", line).strip().strip('"').strip()
        key = normalized(fact)
        if not fact or key in NO_FACTS or len(fact) > max_chars or len(fact.split()) < 2 or key in seen:
            continue
        seen.add(key)
        facts.append(fact)
        if len(facts) == limit:
            break
    return facts


def normalized(text: str) -> str:
    """Case, spacing and end punctuation do not make two facts different."""
    return " ".join((text or "").lower().split()).rstrip(".!")
