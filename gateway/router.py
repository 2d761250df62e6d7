"""Which model serves a request, and what to try when it cannot.

The rule, in order:
1. A model the caller names (a conversation's choice, the API's `model`) wins;
   "auto" or no model lets the router pick.
2. Without a `large` model, or for a plan of the standard tier, the default pool.
3. Otherwise `large` when the prompt is long (GATEWAY_ROUTE_LONG_PROMPT_TOKENS)
   or looks like code or maths; the default pool for everything else.
The chosen model's fallback chain (Backend.fallbacks or GATEWAY_FALLBACKS_JSON)
follows it, e.g. large → small → remote.
"""
from __future__ import annotations

import re

from django.conf import settings

from gateway.models import Plan
from gateway.registry import LARGE, BackendSpec, Limits
from gateway.types import ChatRequest, ModelNotFound

AUTO = "auto"

CODE_MARKERS = re.compile(
    r"```|\bdef \w+\(|\bclass \w+[:(]|#include|\bfunction\s*\w*\(|=>|\bSELECT\b.+\bFROM\b|Traceback \(most recent"
    r"|\bimport \w+|;\s*$",
    re.MULTILINE,
)
MATH_MARKERS = re.compile(
    r"\\(frac|int|sum|sqrt)|\b(integral|derivative|prove|equation|theorem|solve for)\b|\d\s*[-+*/^=]\s*\d",
    re.IGNORECASE,
)


def _last_user_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        if message["role"] == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def default_name(specs: dict[str, BackendSpec]) -> str | None:
    """The model a request that names none is served by: DEFAULT_POOL when the
    registry serves it, else the first listed model (then any); None when
    nothing is configured. One rule for the API, the chat pages and the
    background tasks, so a relay node without local pools never sends chats
    to a pool it does not have."""
    if settings.DEFAULT_POOL in specs:
        return settings.DEFAULT_POOL
    listed = (name for name, spec in specs.items() if spec.listed)
    return next(listed, next(iter(specs), None))


def choose(request: ChatRequest, specs: dict[str, BackendSpec], limits: Limits, prompt_tokens: int) -> tuple[str, str]:
    """(model name, reason) for this request; ModelNotFound for a model that
    does not exist or that the user's plan does not include."""
    if request.model and request.model != AUTO:
        if request.model not in specs or not limits.allows(request.model):
            raise ModelNotFound(f"The model '{request.model}' does not exist or you do not have access to it.")
        return request.model, "explicit"
    default = default_name(specs)
    if default is None:
        raise ModelNotFound("No model is configured.")
    if LARGE not in specs or not limits.allows(LARGE) or limits.tier != Plan.TIER_PRO:
        return default, "default"
    if prompt_tokens > settings.GATEWAY_ROUTE_LONG_PROMPT_TOKENS:
        return LARGE, "long-prompt"
    text = _last_user_text(request)
    if CODE_MARKERS.search(text):
        return LARGE, "code"
    if MATH_MARKERS.search(text):
        return LARGE, "maths"
    return default, "default"


def chain(first: str, specs: dict[str, BackendSpec], limits: Limits) -> list[str]:
    """The chosen model then its fallbacks (transitively), each once, only ones the plan allows."""
    order, queue = [], [first]
    while queue:
        name = queue.pop(0)
        if name in order or name not in specs or (order and not limits.allows(name)):
            continue
        order.append(name)
        queue.extend(specs[name].fallbacks)
    return order
