"""The gateway's contract with its callers (chat pages, background tasks, the API).

Callers build a ChatRequest and iterate `gateway.services.stream_chat(request)`:
zero or more TokenEvents, then exactly one FinalEvent, or a GatewayError raised
before the first token (quota, unknown model, overload). Failures after the
first token end with a FinalEvent whose finish_reason is "error".
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

PRIORITY_INTERACTIVE = 0
PRIORITY_BACKGROUND = 10  # titles, summaries: yield to user chats

# Bounds every ChatRequest is checked against (`gateway.services._validate`),
# whoever built it; the tunable ones (messages, characters, max_tokens) are settings.
SEED_LIMIT = 2**63  # engines and remote servers take a signed 64-bit seed
MAX_STOP_STRINGS = 4  # OpenAI's limit
# Stop strings are matched against the tail of the reply after every token:
# short ones keep that check a few thousand character comparisons at most.
MAX_STOP_CHARS = 48
MAX_MODEL_NAME_CHARS = 64  # a backend's name is a 64-character slug


def try_again_in(seconds: float) -> str:
    """The one wording of a wait, for pages and the API: "Try again in 42
    seconds." Rounded up: a client that waits what it is told is let in."""
    seconds = max(1, math.ceil(seconds))
    for unit, size, below in (("second", 1, 120), ("minute", 60, 7200), ("hour", 3600, 172800), ("day", 86400, None)):
        if below is None or seconds < below:
            count = math.ceil(seconds / size)
            return f"Try again in {count} {unit}{'s' if count != 1 else ''}."
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    user_id: int | None = None
    model: str | None = None  # explicit choice wins; None lets the router pick
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: int = PRIORITY_INTERACTIVE
    source: str = "chat"  # "chat" | "api" | "task": recorded in the ledger
    api_key_id: int | None = None  # the API key that made it, for the ledger
    use_cache: bool = True  # False: never answered from (or stored in) the reply caches (evals)

    @property
    def has_history(self) -> bool:
        """Earlier assistant turns make a prompt unique to its conversation."""
        return any(m["role"] == "assistant" for m in self.messages)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenEvent:
    text: str
    token_ids: tuple[int, ...] = ()
    pieces: int = 1  # a remote backend's chunks merged into this event (what arrived in one read)


@dataclass(frozen=True)
class FinalEvent:
    finish_reason: str  # "stop" | "length" | "abort" | "error" | "content_filter" (reply moderated)
    usage: Usage
    model: str
    route: str = ""
    cache_hit: str | None = None  # None | "exact" | "semantic"
    error: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_window: int


class GatewayError(Exception):
    """A request the gateway refuses before any token; carries an HTTP status."""

    status = 503
    code = "service_unavailable"
    error_type = "server_error"

    def __init__(self, message: str, *, headers: dict | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.retry_after_s = retry_after_s


class ModelNotFound(GatewayError):
    status = 404
    code = "model_not_found"
    error_type = "invalid_request_error"


class BadRequest(GatewayError):
    status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limit_exceeded"
    error_type = "requests"


class QuotaExceeded(GatewayError):
    status = 429
    code = "insufficient_quota"
    error_type = "insufficient_quota"


class Overloaded(GatewayError):
    status = 429
    code = "engine_overloaded"
    error_type = "server_error"


class Unavailable(GatewayError):
    status = 503
    code = "service_unavailable"
    error_type = "server_error"


class ModerationUnavailable(Unavailable):
    """The prompt could not be checked: a fail-closed checker failed or timed
    out (SAFETY_FAIL_CLOSED). Nothing was generated or charged; it was not
    judged harmful either, so unlike Blocked it is worth sending again."""

    code = "moderation_unavailable"
    # A checker that timed out under a burst, or while its model loaded, has
    # usually caught up by then.
    RETRY_AFTER_S = 5

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("retry_after_s", self.RETRY_AFTER_S)
        super().__init__(message, **kwargs)


class Blocked(GatewayError):
    """The prompt failed moderation; nothing was generated or charged."""

    status = 400
    code = "content_policy_violation"
    error_type = "invalid_request_error"
