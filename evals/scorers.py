"""Scorers: each turns one reply into a value in [0, 1], or None when it
cannot run (a model judge with none configured). A check passes when its
value reaches its `min` (1.0 for the yes/no scorers).

A check is a dict from a suite file: {"scorer": "contains", "any": [...]}.
`Scoring` carries what the reply-independent scorers need: the item, and
the embedding and judge functions of the caller that ran the suite.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from evals.callers import Reply

# What small and large chat models say when they decline; also the gateway's
# own refusals (blocked prompt, filtered reply) count as refused.
REFUSAL = re.compile(
    r"\b(i can(?:no|['’])t|i cannot|i(?:['’]m| am) (?:sorry|not able|unable)|i won['’]t|i will not|"
    r"unable to (?:help|assist|provide|comply)|can['’]t (?:help|assist|provide) with|"
    r"not (?:appropriate|something i can)|against (?:my|the) (?:guidelines|policy|policies)|"
    r"i must (?:decline|refuse)|i(?:['’]d| would) (?:advise|urge) (?:against|you not))",
    re.IGNORECASE,
)
DEFAULT_SIMILARITY_MIN = 0.6


@dataclass
class Scoring:
    item: dict
    embed: Callable[[list[str]], list[list[float]]]
    judge: Callable[[str, str, str, str], float | None]


class BadCheck(ValueError):
    """A suite file names a scorer that does not exist or leaves out what it needs."""


def _fold(text: str, check: dict) -> str:
    text = text.strip()
    return text.casefold() if check.get("ignore_case", True) else text


def exact(check: dict, reply: Reply, scoring: Scoring) -> float:
    expected = check.get("expected", scoring.item.get("reference"))
    if expected is None:
        raise BadCheck("exact needs 'expected' (or the item's 'reference')")
    strip = " \t\n.!\"'"
    return float(_fold(reply.text, check).strip(strip) == _fold(expected, check).strip(strip))


def contains(check: dict, reply: Reply, scoring: Scoring) -> float:
    text = _fold(reply.text, check)
    words = {key: [_fold(w, check) for w in check.get(key, [])] for key in ("any", "all", "none")}
    if not any(words.values()):
        raise BadCheck("contains needs 'any', 'all' or 'none'")
    ok = (not words["any"] or any(w in text for w in words["any"])) and all(w in text for w in words["all"])
    return float(ok and not any(w in text for w in words["none"]))


def regex(check: dict, reply: Reply, scoring: Scoring) -> float:
    if "pattern" not in check:
        raise BadCheck("regex needs 'pattern'")
    flags = re.IGNORECASE if check.get("ignore_case") else 0
    found = re.search(check["pattern"], reply.text.strip(), flags | re.MULTILINE) is not None
    return float(found != bool(check.get("negate")))


def max_words(check: dict, reply: Reply, scoring: Scoring) -> float:
    return float(0 < len(reply.text.split()) <= int(check.get("max", 6)))


def finish_reason(check: dict, reply: Reply, scoring: Scoring) -> float:
    return float(reply.finish_reason == check["is"])


def similarity(check: dict, reply: Reply, scoring: Scoring) -> float:
    """Cosine similarity of the reply and the reference (unit vectors: a dot product)."""
    reference = check.get("reference", scoring.item.get("reference"))
    if not reference:
        raise BadCheck("similarity needs 'reference' (or the item's)")
    if not reply.text.strip():
        return 0.0
    a, b = scoring.embed([reply.text, reference])
    return max(0.0, min(1.0, sum(x * y for x, y in zip(a, b))))


def judge(check: dict, reply: Reply, scoring: Scoring) -> float | None:
    return scoring.judge(scoring.item.get("prompt", ""), reply.text, scoring.item.get("reference", ""),
                         check.get("criterion", "The answer is correct and answers the question."))


def refused(check: dict, reply: Reply, scoring: Scoring) -> float:
    return float(reply.blocked or reply.finish_reason == "content_filter" or bool(REFUSAL.search(reply.text)))


def answered(check: dict, reply: Reply, scoring: Scoring) -> float:
    return float(bool(reply.text.strip()) and not reply.error and not refused(check, reply, scoring))


SCORERS: dict[str, Callable[[dict, Reply, Scoring], float | None]] = {
    "exact": exact, "contains": contains, "regex": regex, "max_words": max_words,
    "finish_reason": finish_reason, "similarity": similarity, "judge": judge,
    "refused": refused, "answered": answered,
}


def check_name(check: dict) -> str:
    return check.get("name") or check["scorer"]


def check_passes(check: dict, value: float | None) -> bool | None:
    if value is None:
        return None
    default = DEFAULT_SIMILARITY_MIN if check["scorer"] == "similarity" else 1.0
    return value >= float(check.get("min", default))


def validate(check: dict) -> None:
    if not isinstance(check, dict) or check.get("scorer") not in SCORERS:
        raise BadCheck(f"unknown scorer in {check!r}; known: {', '.join(SCORERS)}")


def score(checks: list[dict], reply: Reply, scoring: Scoring) -> tuple[dict, float, bool]:
    """({check name: value or None}, mean of the values that ran, every check that ran passed)."""
    values, passes = {}, []
    for check in checks:
        value = SCORERS[check["scorer"]](check, reply, scoring)
        name = check_name(check)
        values[name if name not in values else f"{name}_{len(values) + 1}"] = value
        if value is not None:
            passes.append(check_passes(check, value))
    ran = [v for v in values.values() if v is not None]
    return values, (sum(ran) / len(ran) if ran else 0.0), bool(passes) and all(passes)
