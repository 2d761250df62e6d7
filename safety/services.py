"""Moderation, as the rest of the product calls it.

Every text a model reads or a user sees passes the pipeline (safety.pipeline)
through one of these:

- `amoderate_messages`   a request's messages, every role (the gateway, beside routing;
                         the first token waits for it)
- `amoderate_cached`     a cached reply, before it is replayed (the gateway's cache stage)
- `OutputWindow`         a reply while it streams, then whole at its end (the gateway's relay)
- `screen_passages`      retrieved document chunks, before they join a prompt
                         (flagged chunks are left out and the user is told)
- `amoderations`         the /v1/moderations API

Replies are moderated while they stream: the rules (blocked terms, admin
patterns) gate every token, and text is held back just long enough that a
term split across tokens (or spelled out with separators) is caught before
any of it reaches the user. The classifiers read the reply every
SAFETY_OUTPUT_CHECK_CHARS characters and at its end; each time they read
what they have not read yet with OUTPUT_OVERLAP_CHARS before it, so the
whole reply is read and each character once or twice. (They used to reread
the last 500 characters every 400 and then the whole reply at its end:
every character three times on the one embedding thread, which cost a
128-word reply 117 ms of CPU and the chat benchmark a third of the engine's
tok/s at 32 streams.) At the end the rules also run over the whole reply,
for a pattern longer than the held-back tail. When a check blocks, the reply
ends there and the page replaces what was shown with the notice (nothing of
a blocked reply is stored).

Each block sends `safety.signals.content_blocked` once.
"""
from __future__ import annotations

import logging

from django.conf import settings

from safety import pipeline, rules
from safety.checkers import WINDOW_CHARS
from safety.signals import content_blocked
from safety.verdicts import ALLOWED, Decision, Verdict

log = logging.getLogger(__name__)

INPUT_BLOCKED = "This message was blocked by the content policy ({category})."
OUTPUT_BLOCKED = "The reply was stopped by the content policy ({category})."
PASSAGE_LEFT_OUT = "A passage of a document was left out: it looks like {category}."
# What a classifier rereads before the new text of a reply: enough context
# for a sentence cut at the last check (a quarter of a classifier's window).
OUTPUT_OVERLAP_CHARS = WINDOW_CHARS // 4


def _notice(template: str, verdict: Verdict) -> Verdict:
    category = verdict.category.replace("_", " ")
    return Verdict(verdict.category, verdict.score, verdict.action, verdict.checker, template.format(category=category))


def _signal_kwargs(verdict: Verdict, *, user_id, source: str, text: str) -> dict:
    return dict(user_id=user_id, source=source, category=verdict.category, checker=verdict.checker, text=text)


async def _asignal(verdict: Verdict, *, user_id, source: str, text: str) -> None:
    for receiver, result in await content_blocked.asend_robust(
            sender="safety", **_signal_kwargs(verdict, user_id=user_id, source=source, text=text)):
        if isinstance(result, Exception):
            log.error("content_blocked receiver %r failed", receiver, exc_info=result)


def _signal(verdict: Verdict, *, user_id, source: str, text: str) -> None:
    for receiver, result in content_blocked.send_robust(
            sender="safety", **_signal_kwargs(verdict, user_id=user_id, source=source, text=text)):
        if isinstance(result, Exception):
            log.error("content_blocked receiver %r failed", receiver, exc_info=result)


# ------------------------------------------------------------ prompts

async def amoderate_messages(messages: list[dict], *, user_id=None) -> Verdict:
    """The worst verdict over every message of a request, whatever its role
    (system, user, assistant history, tool): a forged assistant turn or a
    tool result can carry an attack as well as a user's message can."""
    texts = list(dict.fromkeys(m["content"] for m in messages if m.get("content")))
    if not texts:
        return ALLOWED
    for text, decision in zip(texts, await pipeline.arun(texts, source="input")):
        if decision.blocked:
            verdict = _notice(INPUT_BLOCKED, decision.top)
            await _asignal(verdict, user_id=user_id, source="input", text=text)
            return verdict
    return ALLOWED


def moderate_input(text: str, *, user_id=None) -> Verdict:
    """One prompt, from sync code (the judge is not consulted)."""
    decision = pipeline.run([text], source="input")[0]
    if not decision.blocked:
        return ALLOWED
    verdict = _notice(INPUT_BLOCKED, decision.top)
    _signal(verdict, user_id=user_id, source="input", text=text)
    return verdict


def moderate_output(text: str, *, user_id=None) -> Verdict:
    """One whole reply, from sync code."""
    decision = pipeline.run([text], source="output")[0]
    if not decision.blocked:
        return ALLOWED
    verdict = _notice(OUTPUT_BLOCKED, decision.top)
    _signal(verdict, user_id=user_id, source="output", text=text)
    return verdict


async def amoderate_cached(text: str, *, user_id=None) -> Verdict:
    """A cached reply, checked as a reply before it is replayed: the rules may
    have changed since it was stored."""
    decision = (await pipeline.arun([text], source="output"))[0]
    if not decision.blocked:
        return ALLOWED
    verdict = _notice(OUTPUT_BLOCKED, decision.top)
    await _asignal(verdict, user_id=user_id, source="cache", text=text)
    return verdict


# ------------------------------------------------------------ replies

class OutputWindow:
    """Streams a reply through moderation, releasing only text already checked."""

    def __init__(self, *, user_id=None):
        self.user_id = user_id
        self.text = ""
        self.released = 0
        self.classified = 0  # how much of the text the classifiers have read
        self.verdict = ALLOWED
        self.hold_chars = 0
        self._ruleset = None

    @property
    def active(self) -> bool:
        """Whether text is held back (what is shown then differs from the tokens)."""
        return self.hold_chars > 0

    async def apush(self, piece: str) -> str:
        """Add generated text; return what may be shown now ("" once blocked)."""
        if self.verdict.blocked:
            return ""
        if self._ruleset is None:
            self._ruleset = await rules.acurrent()
            self.hold_chars = self._ruleset.output_hold_chars(settings.SAFETY_OUTPUT_HOLD_CHARS)
        self.text += piece
        # Only the unreleased part plus the held-back overlap can hold a new match.
        start = max(0, self.released - self.hold_chars)
        hits = rules.matches(self._ruleset, self.text[start:], output=True)
        blocking = [r for r in hits if r.action == "block"]
        if blocking:
            await self._block(Verdict(blocking[0].category, 1.0, "block", f"rules:{blocking[0].source}"))
            return ""
        if len(self.text) - self.classified >= settings.SAFETY_OUTPUT_CHECK_CHARS:
            await self._classify()
            if self.verdict.blocked:
                return ""
        end = max(self.released, len(self.text) - self.hold_chars)
        out, self.released = self.text[self.released:end], end
        return out

    async def aflush(self) -> str:
        """At the end of the reply: the whole-message check (the rules over all
        of it, the classifiers over what they have not read), then the
        held-back tail ("" when blocked)."""
        if self.verdict.blocked:
            return ""
        if self.text:
            if self._ruleset is not None:
                hits = [r for r in rules.matches(self._ruleset, self.text, output=True) if r.action == "block"]
                if hits:
                    await self._block(Verdict(hits[0].category, 1.0, "block", f"rules:{hits[0].source}"))
                    return ""
            if len(self.text) > self.classified:
                await self._classify()
            if self.verdict.blocked:
                return ""
        out, self.released = self.text[self.released:], len(self.text)
        return out

    async def _classify(self) -> None:
        """The classifiers over the text not read yet, with the overlap before it."""
        text = self.text[max(0, self.classified - OUTPUT_OVERLAP_CHARS):]
        self.classified = len(self.text)
        decision = (await pipeline.arun([text], source="output"))[0]
        if decision.blocked:
            await self._block(decision.top)

    async def _block(self, verdict: Verdict) -> None:
        self.verdict = _notice(OUTPUT_BLOCKED, verdict)
        await _asignal(self.verdict, user_id=self.user_id, source="output", text=self.text)


# ------------------------------------------------------------ documents

def _passage_verdicts(texts: list[str], decisions: list[Decision], user_id) -> list[tuple[Verdict, str | None]]:
    out = []
    for text, decision in zip(texts, decisions):
        # A passage is data: anything flagged is left out, not only what would block a prompt.
        if decision.flagged:
            verdict = decision.top
            out.append((Verdict(verdict.category, verdict.score, "block", verdict.checker,
                                PASSAGE_LEFT_OUT.format(category=verdict.category.replace("_", " "))), text))
        else:
            out.append((ALLOWED, None))
    return out


def screen_passages(texts: list[str], user_id=None) -> list[Verdict]:
    """One verdict per retrieved chunk, in order. Leave out of the prompt every
    chunk whose verdict is `.blocked` (any flag counts for a passage: it is
    data, and instructions inside it are an indirect injection), and tell the
    user with the verdict's `.reason`. Sends `content_blocked` (source
    "passage") for each one. Sync; `ascreen_passages` from async code."""
    decisions = pipeline.run(list(texts), source="passage")
    results = _passage_verdicts(list(texts), decisions, user_id)
    for verdict, text in results:
        if text is not None:
            _signal(verdict, user_id=user_id, source="passage", text=text)
    return [verdict for verdict, _ in results]


async def ascreen_passages(texts: list[str], user_id=None) -> list[Verdict]:
    decisions = await pipeline.arun(list(texts), source="passage")
    results = _passage_verdicts(list(texts), decisions, user_id)
    for verdict, text in results:
        if text is not None:
            await _asignal(verdict, user_id=user_id, source="passage", text=text)
    return [verdict for verdict, _ in results]


# ------------------------------------------------------------ the API

async def amoderations(texts: list[str], *, user_id=None) -> list[Decision]:
    """The pipeline's decisions on texts a client asks about (POST /v1/moderations),
    scored as prompts. A text that would be blocked sends `content_blocked`."""
    decisions = await pipeline.arun(texts, source="input")
    for text, decision in zip(texts, decisions):
        if decision.blocked:
            await _asignal(decision.top, user_id=user_id, source="moderations_api", text=text)
    return decisions
