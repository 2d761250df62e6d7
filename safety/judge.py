"""The model judge: a second opinion from a model, in Llama Guard's format.

Used by the pipeline for texts the fast checkers flagged without blocking,
when SAFETY_JUDGE_MODEL names a pool or a remote backend (e.g. Llama Guard 3
served by vLLM, added in the admin as a backend). Off by default.

Why the gateway connects itself here, instead of this module importing it:
safety sits below the gateway in .importlinter's layers (the gateway calls
moderation on every request), so an import of `gateway.client` from here
would be a cycle between the layers. The gateway's AppConfig.ready() hands
in a function that runs a chat request through `gateway.client.current()`
(so tests' fakes and the gateway's routing, fallbacks and ledger apply) and
marks the request as the judge's own, which the gateway does not moderate
again (it would recurse on the very text being judged).
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from django.conf import settings

from safety.taxonomy import BLOCK, JAILBREAK, PROMPT_INJECTION
from safety.verdicts import Verdict

log = logging.getLogger(__name__)

# Llama Guard 3's hazard codes, mapped to the categories verdicts use.
HAZARDS = {
    "S1": ("violence", "Violent Crimes"),
    "S2": ("illicit", "Non-Violent Crimes"),
    "S3": ("sexual", "Sex-Related Crimes"),
    "S4": ("sexual/minors", "Child Sexual Exploitation"),
    "S5": ("harassment", "Defamation"),
    "S6": ("illicit", "Specialized Advice"),
    "S7": ("illicit", "Privacy"),
    "S8": ("illicit", "Intellectual Property"),
    "S9": ("illicit/violent", "Indiscriminate Weapons"),
    "S10": ("hate", "Hate"),
    "S11": ("self-harm", "Suicide & Self-Harm"),
    "S12": ("sexual", "Sexual Content"),
    "S13": ("illicit", "Elections"),
    "S14": (PROMPT_INJECTION, "Code Interpreter Abuse / Prompt Injection"),
    "S15": (JAILBREAK, "Jailbreak"),
}

PROMPT = """Task: Check if there is unsafe content in '{role}' messages in conversations according to our safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{role}: {text}

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories."""

Complete = Callable[[list[dict], str], Awaitable[str]]
_complete: Complete | None = None


def connect(complete: Complete | None) -> None:
    """Called by the gateway at start-up: `complete(messages, model)` returns the reply text."""
    global _complete
    _complete = complete


def prompt(text: str, *, source: str) -> str:
    role = "Agent" if source == "output" else "User"
    categories = "\n".join(f"{code}: {name}." for code, (_, name) in HAZARDS.items())
    return PROMPT.format(role=role, categories=categories, text=text[: settings.SAFETY_JUDGE_MAX_CHARS])


def parse(reply: str) -> Verdict:
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if not lines or not lines[0].lower().startswith("unsafe"):
        return Verdict("", 0.0, "allow", "judge", "The judge found it safe.")
    codes = [c.strip().upper() for c in (lines[1] if len(lines) > 1 else "").split(",") if c.strip()]
    category = next((HAZARDS[c][0] for c in codes if c in HAZARDS), "illicit")
    return Verdict(category, 1.0, BLOCK, "judge", "A safety model judged it unsafe.")


async def ajudge(text: str, *, source: str) -> Verdict | None:
    """The judge's verdict, or None when there is no judge or it failed (logged)."""
    if _complete is None or not settings.SAFETY_JUDGE_MODEL:
        return None
    try:
        reply = await _complete([{"role": "user", "content": prompt(text, source=source)}],
                                settings.SAFETY_JUDGE_MODEL)
    except Exception:
        log.exception("the safety judge (%s) failed", settings.SAFETY_JUDGE_MODEL)
        return None
    return parse(reply)
