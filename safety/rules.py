"""The rule set: admin rules (safety.models.Rule), SAFETY_BLOCKED_TERMS, and
the built-in prompt-injection and jailbreak patterns, compiled once.

Rules are read on every message, so the compiled set is kept in process for
SAFETY_RULES_TTL_S seconds; an admin edit calls `invalidate()` (this process
sees it at once, the others within the TTL), as the gateway's registry does.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from functools import cached_property

from django.conf import settings

from chatapp import runtime
from safety.models import Rule
from safety.normalize import decoded_payloads, fold, leet_spellings, squash
from safety.taxonomy import BLOCK, BLOCKED_TERM, JAILBREAK, PROMPT_INJECTION

# Phrases of the well-known attacks, matched on folded text (so spacing,
# homoglyphs, zero-width characters and leetspeak do not hide them). Each is
# specific enough that ordinary chat does not trip it: "ignore the typo" and
# "kill a Python process" are not matched; the labelled set checks that.
_TARGET = r"(?:instructions?|rules|prompts?|directives?|directions|guidelines|guidance|guardrails|restrictions|programming|constraints|policies|policy|commands|orders)"
_PREVIOUS = r"(?:all|every|your|previous|prior|above|earlier|preceding|original|system|initial|former)"
BUILTIN_PATTERNS: tuple[tuple[str, str], ...] = (
    (PROMPT_INJECTION, rf"\b(?:ignore|disregard|forget|override|bypass|skip|drop|abandon|discard)\b(?:\W+(?!my\b)\w+){{0,2}}?\W+{_PREVIOUS}\b(?:\W+\w+){{0,3}}?\W+{_TARGET}\b"),
    (PROMPT_INJECTION, r"\b(?:reveal|print|show|repeat|output|display|leak|dump|tell me|give me|write out|recite)\b(?:\W+\w+){0,3}?\W+(?:system|hidden|secret|initial|original|developer)\W+(?:prompt|instructions?|message|rules)\b"),
    (PROMPT_INJECTION, r"\b(?:new|updated|real|actual|revised)\s+(?:instructions?|system prompt|directives?)\s*:"),
    (PROMPT_INJECTION, r"(?:^|\n)\s*[\[<#]*\s*(?:system|admin|developer)\s*(?:message|override|prompt|note)?\s*[\]>:]\s*(?:ignore|disregard|you (?:must|are|will)|from now on|new)"),
    (PROMPT_INJECTION, r"\b(?:assistant|ai|chatbot|model|llm|language model|gpt)s?\b[^.\n]{0,40}\b(?:ignore|disregard|must now|should now|instead (?:send|reply|say|output))\b"),
    (PROMPT_INJECTION, r"\b(?:when|if) (?:you|the (?:assistant|ai|model)) (?:read|reads|summari[sz]es?|process(?:es)?|see|sees)\b[^.\n]{0,60}\b(?:ignore|instead|send|reply|tell|include|append|say)\b"),
    (PROMPT_INJECTION, r"!\[[^\]]*\]\(https?://[^)\s]*\?[^)\s]*(?:\{|%7b|data|q|d|secret|token|chat|conversation)"),
    (PROMPT_INJECTION, r"\b(?:send|forward|exfiltrate|post|upload|email)\b[^.\n]{0,40}\b(?:conversation|chat history|api key|password|credentials|system prompt)\b[^.\n]{0,40}\b(?:to|at)\b\s*(?:https?://|[\w.-]+@)"),
    (PROMPT_INJECTION, r"\b(?:ignore|disregard|forget)\s+(?:everything|all)\s+(?:you were told|you'?ve been told|above|before|previously|so far|that came before)"),
    (PROMPT_INJECTION, r"\b(?:repeat|print|output|show|reveal|dump)\b\W+(?:everything|all(?: the)? text|the text)\W+(?:above|before this|preceding)"),
    (PROMPT_INJECTION, r"\b(?:output|print|reveal|show|repeat|dump|leak|recite)\s+your\s+(?:\w+\s+)?(?:instructions|system message|prompt|rules)\b"),
    (PROMPT_INJECTION, r"\bstop (?:following|obeying)\s+(?:your|the)\s+(?:\w+(?:'s)?\s+)?(?:instructions|rules|prompt|guidelines)"),
    (PROMPT_INJECTION, r"\b(?:hidden|secret|initial|original|system)\s+(?:instructions|prompt)\s+you\s+(?:were|have been)\s+given"),
    (PROMPT_INJECTION, r"\b(?:reset|clear|wipe|erase|cancel)\s+(?:all\s+)?(?:your|previous|prior)\s+(?:\w+\s+)?(?:instructions|rules|programming|prompt)"),
    (PROMPT_INJECTION, r"\b(?:instructions|rules|directives)\s+(?:are|have been|were)\s+(?:cancell?ed|void|revoked|overridden|replaced|lifted)"),
    (PROMPT_INJECTION, r"\bignore (?:the )?user'?s (?:question|request|message|instructions)"),
    (PROMPT_INJECTION, r"\b(?:ai|assistants?|models?|llms?|chatgpt|language models?|chatbots?)\b\W+(?:\w+\W+){0,2}?(?:processing|reading|summari[sz]ing|evaluating|analy[sz]ing|viewing)\b[^.\n]{0,40}\b(?:must|should|need to|are required to)\b"),
    (PROMPT_INJECTION, r"\bif you are (?:an? )?(?:ai|chatgpt|gpt|assistant|language model|llm|bot|chatbot)\b[^.\n]{0,60}\b(?:must|should|ignore|instead)\b"),
    (PROMPT_INJECTION, r"\b(?:assistant|ai|model|chatbot)\s*,\s*(?:from now on|ignore|disregard|you must|always|never)\b"),
    (JAILBREAK, r"\b(?:without|no|free of|free from|not bound by)\s+(?:any\s+)?(?:ethical|moral|content|safety)\s+(?:guidelines|filters|restrictions|rules|limits|polic(?:y|ies)|training)"),
    (JAILBREAK, r"\b(?:does not|doesn'?t|won'?t|will not|never)\s+(?:follow|obey|abide by|respect)\s+(?:the\s+|any\s+|its\s+|your\s+)?(?:content polic(?:y|ies)|safety rules|guidelines)"),
    (JAILBREAK, r"\bjailbr(?:oken|eak) mode\b|\bjailbreak successful\b"),
    (JAILBREAK, r"\b(?:normally|usually|would(?: normally)?) refuse\b[^.\n]{0,60}\b(?:answer|comply|respond)"),
    (JAILBREAK, r"\b(?:do not|don'?t|never)\s+(?:say|tell me)\s+(?:that\s+)?you can'?t\b"),
    (JAILBREAK, r"\b(?:dan|stan|dude|aim|evil ?bot|developer mode|god mode|jailbreak(?:ed)? mode|unfiltered mode)\b[^.\n]{0,80}\b(?:no|without|free of|break|not bound|any) ?(?:restrictions|rules|filters|limits|guidelines|policies|censorship|ethics)"),
    (JAILBREAK, r"\bdo anything now\b"),
    (JAILBREAK, r"\b(?:enable|activate|enter|switch to|turn on)\b\W+(?:\w+\W+)?(?:developer|god|jailbreak|unrestricted|unfiltered|dan) mode\b"),
    (JAILBREAK, r"\b(?:pretend|imagine|act as if|act like|roleplay|role-play|you are now|from now on you are|you will be)\b[^.\n]{0,120}\b(?:no|without|free from|free of|not bound by|unbound by|ignore|break)\b[^.\n]{0,20}\b(?:restrictions|rules|filters|limits|guidelines|policies|censorship|ethics|morals|content polic(?:y|ies)|safety)"),
    (JAILBREAK, r"\b(?:unfiltered|uncensored|unrestricted|amoral|unethical)\b[^.\n]{0,30}\b(?:ai|assistant|chatbot|model|version of yourself|persona|character)\b"),
    (JAILBREAK, r"\bstay in character\b[^.\n]{0,80}\b(?:no matter what|always|even if|never refuse|never break)"),
    (JAILBREAK, r"\b(?:never|don'?t|do not|you can'?t|you cannot|you will not)\s+(?:refuse|decline|say (?:no|you can'?t|sorry))\b[^.\n]{0,60}\b(?:any|anything|whatever|request|question)"),
    (JAILBREAK, r"\b(?:your|the)\s+(?:rules|guidelines|restrictions|content policy|filters|safety training)\s+(?:no longer|don'?t|do not)\s+(?:apply|exist|matter)"),
)

# The same attacks written with every letter spaced out ("i g n o r e a l l
# p r e v i o u s ...") have no word boundaries left: these are matched on
# the text with everything but letters and digits removed.
SQUASHED_PATTERNS: tuple[tuple[str, str], ...] = (
    (PROMPT_INJECTION, r"(?:ignore|disregard|forget|override)(?:all|any|of)*(?:the|your)?(?:previous|prior|above|earlier|preceding|initial|original|system)(?:instructions?|rules|prompts?|directives?|guidelines)"),
    (PROMPT_INJECTION, r"(?:reveal|print|show|repeat|leak|output)(?:me)?(?:your|the)(?:system|hidden|secret|initial)(?:prompt|instructions?)"),
    (JAILBREAK, r"doanythingnow|developermodeenabled|enabledevelopermode|jailbreakmode|godmodeenabled"),
)


@dataclass(frozen=True)
class CompiledRule:
    category: str
    action: str
    regex: re.Pattern
    source: str  # "admin:<id>", "setting" or "builtin"
    output: bool  # applies to replies too
    max_chars: int  # the longest text the pattern can match, 0 when unbounded (a regex)
    squashed: bool = False  # matched on `squash`ed text (letters and digits only)


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[CompiledRule, ...]

    @cached_property
    def fingerprint(self) -> str:
        """The rules' content, hashed (`safety.policy.version`): an admin's
        edit, a changed SAFETY_BLOCKED_TERMS or built-in pattern changes it."""
        digest = hashlib.blake2b(digest_size=8)
        for r in self.rules:
            digest.update(repr((r.category, r.action, r.regex.pattern, r.regex.flags, r.source, r.output,
                                r.squashed)).encode())
        return digest.hexdigest()

    @property
    def output_rules(self) -> tuple[CompiledRule, ...]:
        return tuple(r for r in self.rules if r.output)

    def output_hold_chars(self, regex_hold_chars: int) -> int:
        """How much of a reply to hold back so a rule split across tokens is
        caught before any of it is shown: three times the longest term (room
        for a separator or zero-width character after each letter), or the
        setting's allowance when an output rule is a regex."""
        rules = self.output_rules
        hold = max((r.max_chars * 3 for r in rules), default=0)
        if any(r.max_chars == 0 for r in rules):
            hold = max(hold, regex_hold_chars)
        return hold


def _term_regex(term: str) -> re.Pattern:
    folded = fold(term).strip()
    if not folded:
        raise re.error(f"the term {term!r} is empty once folded")
    # A word, not a substring: "kill" blocks "k1ll" and "k i l l", not "skill".
    return re.compile(rf"(?<!\w){re.escape(folded)}(?!\w)")


def _load() -> RuleSet:
    compiled = []
    for row in Rule.objects.filter(enabled=True):
        try:
            if row.kind == Rule.KIND_TERM:
                regex, max_chars = _term_regex(row.pattern), len(row.pattern)
            else:
                regex, max_chars = re.compile(row.pattern, re.IGNORECASE), 0
        except re.error:
            continue  # saved around the form's validation: skipped, never a failure of every message
        compiled.append(CompiledRule(row.category, row.action, regex, f"admin:{row.pk}", row.applies_to_output,
                                     max_chars))
    for term in settings.SAFETY_BLOCKED_TERMS:
        if fold(term).strip():  # a term of invisible characters only would match everywhere
            compiled.append(CompiledRule(BLOCKED_TERM, BLOCK, _term_regex(term), "setting", True, len(term)))
    if settings.SAFETY_BUILTIN_PATTERNS:
        for category, pattern in BUILTIN_PATTERNS:
            compiled.append(CompiledRule(category, BLOCK, _builtin(pattern), "builtin", False, 0))
        for category, pattern in SQUASHED_PATTERNS:
            compiled.append(CompiledRule(category, BLOCK, _builtin(pattern), "builtin", False, 0, squashed=True))
    return RuleSet(tuple(compiled))


_builtin_cache: dict[str, re.Pattern] = {}


def _builtin(pattern: str) -> re.Pattern:
    if pattern not in _builtin_cache:
        _builtin_cache[pattern] = re.compile(pattern, re.IGNORECASE)
    return _builtin_cache[pattern]


_lock = threading.Lock()
_cached: tuple[float, object, RuleSet] | None = None  # (loaded at, settings key, rules)


def _settings_key():
    return (tuple(settings.SAFETY_BLOCKED_TERMS), settings.SAFETY_BUILTIN_PATTERNS)


def current() -> RuleSet:
    """The rule set, read at most every SAFETY_RULES_TTL_S."""
    hit = _cached
    key = _settings_key()
    if hit is not None and hit[1] == key and time.monotonic() - hit[0] < settings.SAFETY_RULES_TTL_S:
        return hit[2]
    # Always on the gateway's database threads: the ORM refuses to run on an
    # event loop's thread, and the checkers' own threads would each keep a
    # connection open.
    return _keep(key, runtime.run_on_db_thread_sync(_load))


def _keep(key, ruleset: RuleSet) -> RuleSet:
    global _cached
    with _lock:
        _cached = (time.monotonic(), key, ruleset)
    return ruleset


def invalidate() -> None:
    global _cached
    with _lock:
        _cached = None


runtime.on_reset(invalidate)


async def acurrent() -> RuleSet:
    """`current()` for async callers: a reload waits on a database thread, not the event loop."""
    hit = _cached
    if hit is not None and hit[1] == _settings_key() and time.monotonic() - hit[0] < settings.SAFETY_RULES_TTL_S:
        return hit[2]
    key = _settings_key()
    return _keep(key, await runtime.on_db_thread(_load, runtime.LEDGER_DB)())


def matches(ruleset: RuleSet, text: str, *, output: bool) -> list[CompiledRule]:
    """The rules `text` breaks, matched on its folded spellings (and the text
    of any base64 payload in it)."""
    candidates = ruleset.output_rules if output else ruleset.rules
    if not candidates:
        return []
    spellings, squashed = [], []
    for variant in (text, *decoded_payloads(text)):
        folded = fold(variant)
        leet = leet_spellings(folded)
        spellings += [folded, *leet]
        squashed.append(squash(leet[0]))
    return [rule for rule in candidates
            if any(rule.regex.search(s) for s in (squashed if rule.squashed else spellings))]
