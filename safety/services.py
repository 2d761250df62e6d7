"""Moderation, as the rest of the product calls it.

Every text a model reads or a user sees passes the pipeline (safety.pipeline)
through one of these:

- `amoderate_messages`   a request's messages, every role (the gateway, beside routing;
                         the first token waits for it)
- `amoderate_cached`     a cached reply, before it is replayed (the gateway's cache stage)
- `OutputWindow`         a reply while it streams, then whole at its end (the gateway's relay)
- `screen_passages`      retrieved document chunks, before they join a prompt
                         (flagged chunks are left out and the user is told)
- `judge_passages`       chunks at ingestion, their verdicts to store with
                         `policy_version()`; `stored_passage_verdicts` turns a
                         stored verdict of the current version into a turn's
                         (docs/ARCHITECTURE.md, "Passage verdicts")
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
from dataclasses import dataclass, replace

from django.conf import settings

from safety import checkers, pipeline, policy, rules
from safety.checkers import WINDOW_CHARS
from safety.signals import content_blocked
from safety.verdicts import ALLOWED, Decision, Verdict

log = logging.getLogger(__name__)

INPUT_BLOCKED = "This message was blocked by the content policy ({category})."
OUTPUT_BLOCKED = "The reply was stopped by the content policy ({category})."
PASSAGE_LEFT_OUT = "A passage of a document was left out: it looks like {category}."
# What each notice says instead when a fail-closed checker failed or timed out
# (Decision.unchecked): the text was held back unjudged, and trying again may
# well pass. Naming the category there ("blocked term") told people their
# message held a term it did not hold.
UNCHECKED = {
    INPUT_BLOCKED: "This message could not be checked against the content policy just now, so it was not sent.",
    OUTPUT_BLOCKED: "The reply was stopped: it could not be checked against the content policy just now.",
    PASSAGE_LEFT_OUT: "A passage of a document was left out: it could not be checked against the content policy "
                      "just now.",
}
# The checkers' deadline for a batch judged in the background (ingestion, a
# re-screen): no one waits on it, and a batch cut short by the turn's
# deadline would store nothing (a fallback is never stored).
JUDGE_TIMEOUT_S = 300.0
# What a classifier rereads before the new text of a reply: enough context
# for a sentence cut at the last check (a quarter of a classifier's window).
OUTPUT_OVERLAP_CHARS = WINDOW_CHARS // 4


def reply_read_start(length: int, classified: int, *, final: bool, every: int | None = None,
                     overlap: int = OUTPUT_OVERLAP_CHARS) -> int | None:
    """Where the classifiers' next read of a streaming reply starts, or None
    when none is due: the reply is `length` characters long and its first
    `classified` were read. Mid-stream a read is due once `every`
    (SAFETY_OUTPUT_CHECK_CHARS) characters are unread; at the `final` check,
    whenever any are. A read runs to the end of the reply and starts
    `overlap` characters before the unread text, so a sentence cut at the
    last read is read whole. (bench.reply_floor replays replies through it.)"""
    unread = length - classified
    every = settings.SAFETY_OUTPUT_CHECK_CHARS if every is None else every
    if unread >= every or (final and unread > 0):
        return max(0, classified - overlap)
    return None


def _notice(template: str, verdict: Verdict) -> Verdict:
    if verdict.unchecked:
        return replace(verdict, reason=UNCHECKED[template])
    return replace(verdict, reason=template.format(category=verdict.category.replace("_", " ")))


def _signal_kwargs(verdict: Verdict, *, user_id, source: str, text: str) -> dict:
    return dict(user_id=user_id, source=source, category=verdict.category, checker=verdict.checker, text=text)


# A stand-in for a failed checker is no block to count (content_blocked
# feeds the blocked-content metric): the pipeline logged the failure.

async def _asignal(verdict: Verdict, *, user_id, source: str, text: str) -> None:
    if verdict.unchecked:
        return
    for receiver, result in await content_blocked.asend_robust(
            sender="safety", **_signal_kwargs(verdict, user_id=user_id, source=source, text=text)):
        if isinstance(result, Exception):
            log.error("content_blocked receiver %r failed", receiver, exc_info=result)


def _signal(verdict: Verdict, *, user_id, source: str, text: str) -> None:
    if verdict.unchecked:
        return
    for receiver, result in content_blocked.send_robust(
            sender="safety", **_signal_kwargs(verdict, user_id=user_id, source=source, text=text)):
        if isinstance(result, Exception):
            log.error("content_blocked receiver %r failed", receiver, exc_info=result)


# ------------------------------------------------------------ loading

def load_checkers() -> dict[str, str]:
    """Build the configured checkers now, as the first check would (their
    models load: seconds); returns `checkers_report()`."""
    pipeline.checkers()
    return checkers_report()


def checkers_report() -> dict[str, str] | None:
    """Each checker: "ok", or why it could not be built (its categories then
    follow SAFETY_FAIL_CLOSED); None while they load on first use."""
    return pipeline.report()


# ------------------------------------------------------------ prompts

async def amoderate_messages(messages: list[dict], *, user_id=None) -> Verdict:
    """The worst verdict over every message of a request, whatever its role
    (system, user, assistant history, tool): a forged assistant turn or a
    tool result can carry an attack as well as a user's message can."""
    texts = list(dict.fromkeys(m["content"] for m in messages if m.get("content")))
    if not texts:
        return ALLOWED
    unchecked = ALLOWED  # a judged block elsewhere in the request outranks it
    for text, decision in zip(texts, await pipeline.arun(texts, source="input")):
        if decision.blocked:
            verdict = _notice(INPUT_BLOCKED, decision.top)
            if verdict.unchecked:
                if not unchecked.blocked:
                    unchecked = verdict
                continue
            await _asignal(verdict, user_id=user_id, source="input", text=text)
            return verdict
    return unchecked


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
        start = reply_read_start(len(self.text), self.classified, final=False)
        if start is not None:
            await self._classify(start)
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
            start = reply_read_start(len(self.text), self.classified, final=True)
            if start is not None:
                await self._classify(start)
            if self.verdict.blocked:
                return ""
        out, self.released = self.text[self.released:], len(self.text)
        return out

    async def _classify(self, start: int) -> None:
        """The classifiers over the text from `start` (`reply_read_start`) to its end."""
        text = self.text[start:]
        self.classified = len(self.text)
        decision = (await pipeline.arun([text], source="output"))[0]
        if decision.blocked:
            await self._block(decision.top)

    async def _block(self, verdict: Verdict) -> None:
        self.verdict = _notice(OUTPUT_BLOCKED, verdict)
        await _asignal(self.verdict, user_id=self.user_id, source="output", text=self.text)


# ------------------------------------------------------------ documents

@dataclass(frozen=True)
class PassageVerdict(Verdict):
    """A passage's verdict and the policy version it may be stored under:
    "" when a checker failed or timed out (a fallback, to act on now and
    never to store)."""
    policy_version: str = ""


def policy_version() -> str:
    """A short hash of what decides a passage's verdict (checkers, their
    thresholds and models, the rules): a stored verdict of another version
    is screened again. Cheap: kept until the rules are reloaded."""
    return policy.version()


def _passage_verdicts(decisions: list[Decision], version: str) -> list[PassageVerdict]:
    out = []
    for decision in decisions:
        stored = version if decision.complete else ""
        # A passage is data: anything flagged is left out, not only what would block a prompt.
        if decision.flagged:
            verdict = _notice(PASSAGE_LEFT_OUT, decision.top)
            out.append(PassageVerdict(verdict.category, verdict.score, "block", verdict.checker, verdict.reason,
                                      verdict.unchecked, stored))
        else:
            out.append(PassageVerdict(policy_version=stored))
    return out


def screen_passages(texts: list[str], user_id=None) -> list[PassageVerdict]:
    """One verdict per retrieved chunk, in order. Leave out of the prompt every
    chunk whose verdict is `.blocked` (any flag counts for a passage: it is
    data, and instructions inside it are an indirect injection), and tell the
    user with the verdict's `.reason`. Sends `content_blocked` (source
    "passage") for each one. Sync; `ascreen_passages` from async code."""
    version = policy_version()  # before the screen: a policy changed meanwhile is not claimed
    verdicts = _passage_verdicts(pipeline.run(list(texts), source="passage"), version)
    for text, verdict in zip(texts, verdicts):
        if verdict.blocked:
            _signal(verdict, user_id=user_id, source="passage", text=text)
    return verdicts


async def ascreen_passages(texts: list[str], user_id=None) -> list[PassageVerdict]:
    # The judge may decide here, and it is not part of the version: nothing to store.
    verdicts = _passage_verdicts(await pipeline.arun(list(texts), source="passage"), "")
    for text, verdict in zip(texts, verdicts):
        if verdict.blocked:
            await _asignal(verdict, user_id=user_id, source="passage", text=text)
    return verdicts


def judge_passages(texts: list[str], *, embed=None) -> list[PassageVerdict]:
    """`screen_passages` for chunks no one has asked about yet (ingestion, a
    re-screen): the verdicts to store, and no signal (no user was shown
    anything). `embed(texts) -> unit vectors` stands in for the torch
    embeddings where torch is not allowed (the Celery worker)."""
    version = policy_version()
    token = checkers.embedding.set(embed) if embed is not None else None
    try:
        return _passage_verdicts(pipeline.run(list(texts), source="passage", timeout_s=JUDGE_TIMEOUT_S), version)
    finally:
        if token is not None:
            checkers.embedding.reset(token)


def stored_passage_verdicts(stored: list[tuple[str, bool, str]], *, user_id=None) -> list[Verdict]:
    """A turn's verdicts from stored ones of the current version, as
    (text, flagged, category): a flagged one is left out and told as
    `screen_passages` would (and sends `content_blocked`), with no screen."""
    out = []
    for text, flagged, category in stored:
        if not flagged:
            out.append(ALLOWED)
            continue
        verdict = _notice(PASSAGE_LEFT_OUT, Verdict(category, 1.0, "block", "stored"))
        _signal(verdict, user_id=user_id, source="passage", text=text)
        out.append(verdict)
    return out


# ------------------------------------------------------------ the API

async def amoderations(texts: list[str], *, user_id=None) -> list[Decision]:
    """The pipeline's decisions on texts a client asks about (POST /v1/moderations),
    scored as prompts. A text that would be blocked sends `content_blocked`."""
    decisions = await pipeline.arun(texts, source="input")
    for text, decision in zip(texts, decisions):
        if decision.blocked:
            await _asignal(decision.top, user_id=user_id, source="moderations_api", text=text)
    return decisions
