"""Signals the policy layer sends, for subsystems that listen beside it.

`content_blocked` is sent once for every piece of text a checker blocked
(a prompt, a reply, a cached reply, a retrieved passage). The audit log,
the abuse controls (a review flag after repeated blocks) and the metrics
listen to it; moderation itself knows none of them.

Keyword arguments:
    user_id   the user the text belongs to, or None (anonymous, internal)
    source    where the text came from: "input", "output", "cache",
              "passage" or "moderations_api"
    category  the blocking category (OpenAI moderation taxonomy, or
              "prompt_injection"/"jailbreak"/"blocked_term")
    checker   the dotted path or short name of the checker that blocked it
    text      the blocked text; listeners store it only if a setting says so
"""
from django.dispatch import Signal

content_blocked = Signal()
