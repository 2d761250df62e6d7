"""The categories verdicts use: OpenAI's moderation taxonomy (the names and
the order of its API's `categories` object), plus what a chat product needs
beside it."""
from __future__ import annotations

OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
PROMPT_INJECTION = "prompt_injection"  # instructions hidden in data (documents, tool output) or a prompt
JAILBREAK = "jailbreak"  # attempts to talk the model out of its rules (role play, "DAN")
BLOCKED_TERM = "blocked_term"  # a term or pattern the deployment's admins block
EXTRA_CATEGORIES = (PROMPT_INJECTION, JAILBREAK, BLOCKED_TERM)
CATEGORIES = OPENAI_CATEGORIES + EXTRA_CATEGORIES
BENIGN = "benign"

# The labelled set and the trained head use the top-level names.
HEAD_LABELS = (BENIGN, "harassment", "hate", "self-harm", "sexual", "violence", "illicit", PROMPT_INJECTION, JAILBREAK)

ALLOW, FLAG, BLOCK = "allow", "flag", "block"
ACTIONS = (ALLOW, FLAG, BLOCK)
_SEVERITY = {ALLOW: 0, FLAG: 1, BLOCK: 2}


def worse(a: str, b: str) -> str:
    return a if _SEVERITY[a] >= _SEVERITY[b] else b


def top_level(category: str) -> str:
    """"self-harm/intent" → "self-harm"."""
    return category.split("/", 1)[0]
