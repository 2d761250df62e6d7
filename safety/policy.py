"""The passage policy's version: a short hash of everything that decides a
retrieved passage's verdict.

Documents store each chunk's verdict with the version it was judged under
and screen it again only when the version moved. So the version covers the
configured checkers (SAFETY_CHECKERS), each one's thresholds and model
(`Checker.policy_key`: the head's file digest, a bundled model's package
version) and the rules' content (admin rules, SAFETY_BLOCKED_TERMS, the
built-in patterns and their switch: `RuleSet.fingerprint`). It is read on
every turn, so it is kept until the rule set is reloaded (SAFETY_RULES_TTL_S,
or at once in the process where an admin edit `invalidate`s the rules).

Not in it: the judge (SAFETY_JUDGE_MODEL), which the sync passage screen
never consults, and SAFETY_FAIL_CLOSED, whose fallback verdicts are never
stored (`Decision.complete`).
"""
from __future__ import annotations

import hashlib
import threading

from django.conf import settings
from django.utils.module_loading import import_string

from chatapp import runtime
from safety import rules

_lock = threading.Lock()
_cached: tuple[tuple[str, ...], rules.RuleSet, str] | None = None  # (checkers, rule set, version)


def _checker_key(path: str) -> str:
    try:
        return import_string(path).policy_key()
    except (ImportError, AttributeError):
        return f"{path}|unavailable"  # never builds: its verdicts are incomplete, never stored


def version() -> str:
    """16 hex digits, the same in every process with the same policy."""
    global _cached
    paths, ruleset = tuple(settings.SAFETY_CHECKERS), rules.current()
    hit = _cached
    if hit is not None and hit[0] == paths and hit[1] is ruleset:
        return hit[2]
    digest = hashlib.blake2b(digest_size=8)
    for part in (*(_checker_key(p) for p in paths), ruleset.fingerprint):
        digest.update(part.encode() + b"\0")
    current = digest.hexdigest()
    with _lock:
        _cached = (paths, ruleset, current)
    return current


def forget() -> None:
    global _cached
    with _lock:
        _cached = None


runtime.on_reset(forget)
