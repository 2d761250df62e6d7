"""Checkers for tests, named by dotted path in SAFETY_CHECKERS like real ones.

`Recorder` remembers every (source, text) the pipeline showed it, and
blocks a text that contains the marker set for its source in `MARKERS`:
with it, a test proves that a path reached the pipeline (and which source
it said it was), and that a block there is enforced.
"""
from __future__ import annotations

import threading
import time

from safety.checkers import Checker
from safety.taxonomy import ALLOW, BLOCK, FLAG
from safety.verdicts import Verdict

SEEN: list[tuple[str, str]] = []
MARKERS: dict[str, str] = {}  # source -> text that blocks there
FLAG_MARKERS: dict[str, str] = {}  # source -> text that is flagged (not blocked) there
_lock = threading.Lock()
GATE = threading.Event()  # Gated's input verdicts wait for it


def reset() -> None:
    with _lock:
        SEEN.clear()
    GATE.set()  # a gate left closed would hold the pipeline's threads
    MARKERS.clear()
    FLAG_MARKERS.clear()


def seen(source: str) -> list[str]:
    with _lock:
        return [text for s, text in SEEN if s == source]


class Recorder(Checker):
    name = "recorder"
    categories = ("violence",)
    cacheable = False

    def check(self, texts, source):
        with _lock:
            SEEN.extend((source, t) for t in texts)
        return self._verdicts(texts, source)

    def _verdicts(self, texts, source):
        out = []
        for text in texts:
            block, flag = MARKERS.get(source), FLAG_MARKERS.get(source)
            action = BLOCK if block and block in text else FLAG if flag and flag in text else ALLOW
            out.append([Verdict("violence", 1.0 if action != ALLOW else 0.0, action, self.name, "test marker")])
        return out


class Failing(Checker):
    name = "failing"
    categories = ("violence", "hate")
    cacheable = False

    def check(self, texts, source):
        raise RuntimeError("the model file is missing")


class Slow(Checker):
    name = "slow"
    categories = ("violence",)
    cacheable = False
    delay_s = 2.0

    def check(self, texts, source):
        time.sleep(self.delay_s)
        return [[] for _ in texts]


class Counting(Checker):
    """Counts the texts it had to score (the verdict cache saves the rest)."""
    name = "counting"
    categories = ("harassment",)
    calls: list[str] = []

    def check(self, texts, source):
        Counting.calls.extend(texts)
        return [[Verdict("harassment", 0.1, ALLOW, self.name)] for _ in texts]


class Flagging(Checker):
    """Flags everything, never blocks: the judge's cue."""
    name = "flagging"
    categories = ("violence",)
    cacheable = False

    def check(self, texts, source):
        return [[Verdict("violence", 0.6, FLAG, self.name)] for _ in texts]


class Unbuildable(Checker):
    """Its model file is missing: it fails when the pipeline builds it."""
    name = "unbuildable"
    categories = ("hate",)

    def __init__(self):
        raise FileNotFoundError("head.npz")


class Gated(Recorder):
    """The recorder, whose verdicts on prompts wait until the test opens
    GATE: the gateway's other stages run meanwhile (tests of moderation
    beside them)."""
    name = "gated"

    def check(self, texts, source):
        with _lock:
            SEEN.extend((source, t) for t in texts)  # seen as soon as asked
        if source == "input":
            GATE.wait(timeout=60)
        return self._verdicts(texts, source)


class GatedFailing(Gated):
    """Gated, then failing: a checker that breaks (or would time out) while
    the gateway's other stages run beside it."""
    name = "gated_failing"

    def check(self, texts, source):
        super().check(texts, source)
        raise RuntimeError("the checker's model is still loading")
