"""What the engine hands back: stream events, completions, usage, errors."""
from __future__ import annotations

from dataclasses import dataclass, field


class EngineSaturated(RuntimeError):
    """The bounded waiting queue is full; retry later or fall back elsewhere."""


class PromptTooLong(ValueError):
    """The prompt cannot fit the model's context (or the whole KV cache)."""


class UnsupportedModel(ValueError):
    """The model's architecture has no paged forward in this engine."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestMetrics:
    """Per-request timings (time.monotonic seconds) and token counts."""

    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    inter_token_latencies_s: list[float] = field(default_factory=list)
    prefill_tokens: int = 0  # prompt (and recomputed) tokens actually run through the model
    decode_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0

    @property
    def queue_time_s(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency_s(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the `logprobs` most likely token ids -> logprob


@dataclass(frozen=True)
class DeltaEvent:
    """New tokens of a stream. `text` is what became printable and safe to show:
    a multi-byte character is never split and text that may begin a stop string
    is held back until it is known not to."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finished: bool = False


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a stream. It carries no tokens or text: everything was
    sent in DeltaEvents before it."""

    request_id: str
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    usage: Usage
    metrics: RequestMetrics
    error: str | None = None  # set when finish_reason is "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    finished: bool = True
    token_ids: tuple[int, ...] = ()
    text: str = ""


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: Usage
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    stop_reason: int | str | None = None
