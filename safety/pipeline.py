"""The checkers of SAFETY_CHECKERS, run together on a batch of texts.

Each checker runs on the pipeline's threads, all at once, under one deadline
(SAFETY_CHECKER_TIMEOUT_S). A checker that raises or misses the deadline is
logged, and each category it covers falls back to the policy: blocked when
the category is in SAFETY_FAIL_CLOSED, let through otherwise. A thread that
timed out cannot be killed; it finishes in the background and its answer is
dropped.

A base64 payload in a text is checked as text too (`decoded_payloads`).
Verdicts of deterministic checkers are remembered per text (an LRU of
SAFETY_VERDICT_CACHE entries): a chat's history is checked again with every
turn, and only its new message costs anything.

When SAFETY_JUDGE_MODEL is set, a text the fast checkers only flagged (not
sure enough to block) goes to the model judge (`safety.judge`), whose answer
decides; async callers only, since the judge streams through the gateway.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import logging
import threading
import time
from collections import OrderedDict

from django.conf import settings
from django.utils.module_loading import import_string

from chatapp import runtime
from safety import judge
from safety.checkers import Checker
from safety.normalize import decoded_payloads
from safety.taxonomy import BLOCK
from safety.verdicts import Decision, Verdict

log = logging.getLogger(__name__)

# Enough threads for a burst of chats to be checked at once: they mostly wait
# on the embedding thread, which encodes whatever waits in one batch
# (retrieval.services). With 4, a burst of 32 prompts queued here, embedded 4
# at a time, and the queueing counted against SAFETY_CHECKER_TIMEOUT_S.
_executor = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="safety")
_lock = threading.Lock()
_checkers: tuple[tuple[str, ...], list[Checker]] | None = None


class _Unavailable(Checker):
    """A configured checker that could not be built (a missing package or
    model file): every call fails, so its categories follow the policy."""
    cacheable = False

    def __init__(self, path: str, error: Exception):
        self.name, self.error = path.rsplit(".", 1)[-1], error
        try:
            self.categories = tuple(getattr(import_string(path), "categories", ()))
        except ImportError:
            self.categories = ()

    def check(self, texts, source):
        raise RuntimeError(f"the checker could not be built: {self.error!r}")


def _build(path: str) -> Checker:
    try:
        checker = import_string(path)()
        checker.warm()
        return checker
    except Exception as exc:
        log.exception("safety checker %s could not be built", path)
        return _Unavailable(path, exc)


def _built() -> bool:
    return _checkers is not None and _checkers[0] == tuple(settings.SAFETY_CHECKERS)


def checkers() -> list[Checker]:
    """The configured checkers, built once per value of SAFETY_CHECKERS
    (their models load then: seconds, outside any check's deadline)."""
    global _checkers
    paths = tuple(settings.SAFETY_CHECKERS)
    with _lock:
        if _checkers is None or _checkers[0] != paths:
            first = _checkers is None
            _checkers = (paths, [_build(path) for path in paths])
            if first:
                runtime.freeze_long_lived()  # their models stay for the process's life
        return _checkers[1]


def report() -> dict[str, str] | None:
    """Each configured checker's state ("ok", or why it could not be built);
    None before the first check (or `serve`'s start) built them."""
    built = _checkers  # not under _lock, which a build holds for seconds
    if built is None or built[0] != tuple(settings.SAFETY_CHECKERS):
        return None
    return {c.name: f"down: {c.error!r}" if isinstance(c, _Unavailable) else "ok" for c in built[1]}


# ------------------------------------------------------------ verdict cache

_remembered: OrderedDict[tuple, list[Verdict]] = OrderedDict()


def _key(checker: Checker, source: str, text: str) -> tuple:
    return (checker.name, source, hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())


def _recall(checker: Checker, source: str, texts: list[str]) -> dict[int, list[Verdict]]:
    if not checker.cacheable or settings.SAFETY_VERDICT_CACHE <= 0:
        return {}
    found = {}
    with _lock:
        for i, text in enumerate(texts):
            hit = _remembered.get(_key(checker, source, text))
            if hit is not None:
                _remembered.move_to_end(_key(checker, source, text))
                found[i] = hit
    return found


def _remember(checker: Checker, source: str, texts: list[str], results: list[list[Verdict]]) -> None:
    if not checker.cacheable or settings.SAFETY_VERDICT_CACHE <= 0:
        return
    with _lock:
        for text, verdicts in zip(texts, results):
            _remembered[_key(checker, source, text)] = verdicts
        while len(_remembered) > settings.SAFETY_VERDICT_CACHE:
            _remembered.popitem(last=False)


def forget() -> None:
    with _lock:
        _remembered.clear()


# ------------------------------------------------------------ one checker

def _run_checker(checker: Checker, texts: list[str], source: str) -> list[list[Verdict]]:
    known = _recall(checker, source, texts)
    todo = [i for i in range(len(texts)) if i not in known]
    if todo:
        fresh = checker.check([texts[i] for i in todo], source)
        _remember(checker, source, [texts[i] for i in todo], fresh)
        known.update(zip(todo, fresh))
    return [known[i] for i in range(len(texts))]


def _fallback(checker: Checker, count: int, why: str) -> list[list[Verdict]]:
    """What a failed checker leaves: a block for each fail-closed category it covers."""
    try:
        categories = checker.categories
    except Exception:  # the rules checker reads its categories from the rules, which may be what failed
        categories = tuple(settings.SAFETY_FAIL_CLOSED)
    closed = [c for c in categories if c in settings.SAFETY_FAIL_CLOSED]
    verdict = [Verdict(c, 1.0, BLOCK, checker.name, f"The {checker.name} check {why}; the policy is fail-closed.",
                       unchecked=True) for c in closed]
    return [list(verdict) for _ in range(count)]


def _expand(texts: list[str]) -> tuple[list[str], list[int]]:
    """Each text and its base64 payloads; `owners[i]` is the text variant i belongs to."""
    flat, owners = [], []
    for i, text in enumerate(texts):
        for variant in (text, *decoded_payloads(text)):
            flat.append(variant)
            owners.append(i)
    return flat, owners


def _fold(count: int, owners: list[int], per_checker: list[list[list[Verdict]]], complete: bool) -> list[Decision]:
    decisions = [Decision(complete=complete) for _ in range(count)]
    for results in per_checker:
        for owner, verdicts in zip(owners, results):
            decisions[owner].verdicts.extend(verdicts)
    return decisions


def _applicable(source: str) -> list[Checker]:
    return [c for c in checkers() if source in c.sources]


# ------------------------------------------------------------ entry points

def run(texts: list[str], *, source: str, timeout_s: float | None = None) -> list[Decision]:
    """Decisions for `texts`, blocking the calling thread (not the judge);
    the checkers' deadline is SAFETY_CHECKER_TIMEOUT_S unless `timeout_s`."""
    flat, owners = _expand(texts)
    active = _applicable(source)
    # Each checker's thread runs in a copy of the caller's context (one
    # copy each: a context cannot be entered by two threads at once), so a
    # caller's `checkers.embedding` reaches the embedding head.
    futures = [_executor.submit(contextvars.copy_context().run, _run_checker, c, flat, source) for c in active]
    timeout_s = settings.SAFETY_CHECKER_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    results, complete = [], True
    for checker, future in zip(active, futures):
        try:
            results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            continue
        except concurrent.futures.TimeoutError:
            log.warning("safety checker %s timed out after %s s", checker.name, timeout_s)
            results.append(_fallback(checker, len(flat), "timed out"))
        except Exception:
            log.exception("safety checker %s failed", checker.name)
            results.append(_fallback(checker, len(flat), "failed"))
        complete = False
    return _fold(len(texts), owners, results, complete)


async def arun(texts: list[str], *, source: str) -> list[Decision]:
    """`run` for async callers, then the judge on texts only flagged."""
    flat, owners = _expand(texts)
    loop = asyncio.get_running_loop()
    # The first call of a process builds the checkers: off the event loop.
    active = _applicable(source) if _built() else await loop.run_in_executor(_executor, _applicable, source)
    futures = [asyncio.wrap_future(_executor.submit(_run_checker, c, flat, source), loop=loop) for c in active]
    if futures:
        await asyncio.wait(futures, timeout=settings.SAFETY_CHECKER_TIMEOUT_S)
    results, complete = [], True
    for checker, future in zip(active, futures):
        if not future.done():
            future.cancel()
            log.warning("safety checker %s timed out after %s s", checker.name, settings.SAFETY_CHECKER_TIMEOUT_S)
            results.append(_fallback(checker, len(flat), "timed out"))
        elif future.exception() is not None:
            log.error("safety checker %s failed", checker.name, exc_info=future.exception())
            results.append(_fallback(checker, len(flat), "failed"))
        else:
            results.append(future.result())
            continue
        complete = False
    decisions = _fold(len(texts), owners, results, complete)
    if settings.SAFETY_JUDGE_MODEL:
        await _second_stage(texts, decisions, source)
    return decisions


async def _second_stage(texts: list[str], decisions: list[Decision], source: str) -> None:
    """The judge decides the texts the fast checkers flagged but did not block."""
    for text, decision in zip(texts, decisions):
        if decision.flagged and not decision.blocked:
            verdict = await judge.ajudge(text, source=source)
            if verdict is not None:
                decision.verdicts.append(verdict)


runtime.on_reset(forget)
