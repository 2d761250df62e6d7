"""Engine-wide counters. Written by the engine thread only; read from anywhere
(stats() tolerates a value one step old)."""
from __future__ import annotations

import time
from collections import deque

from inference.sequence import Sequence

_RATE_WINDOW_S = 10.0


class EngineMetrics:
    def __init__(self):
        self.started = time.monotonic()
        self.steps = 0
        self.step_times: deque[tuple[float, float]] = deque()  # (end time, duration) within the window
        self.prompt_tokens = 0  # tokens run through prefill (recomputation included)
        self.generation_tokens = 0
        self.requests_finished = 0
        self.finish_reasons: dict[str, int] = {}
        self.ttft_sum_s = 0.0
        self.ttft_count = 0
        self.busy_s = 0.0

    def record_step(self, started: float, ended: float, num_prefill_tokens: int, num_decode_tokens: int) -> None:
        self.steps += 1
        self.busy_s += ended - started
        self.prompt_tokens += num_prefill_tokens
        self.generation_tokens += num_decode_tokens
        self.step_times.append((ended, ended - started))
        while self.step_times and self.step_times[0][0] < ended - _RATE_WINDOW_S:
            self.step_times.popleft()

    def record_finish(self, seq: Sequence) -> None:
        self.requests_finished += 1
        reason = seq.finish_reason or "abort"
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        if seq.metrics.ttft_s is not None:
            self.ttft_sum_s += seq.metrics.ttft_s
            self.ttft_count += 1

    def steps_per_s(self) -> float:
        """Steps over the last 10 s (or the engine's life, when shorter)."""
        now = time.monotonic()
        recent = sum(1 for ended, _ in list(self.step_times) if ended >= now - _RATE_WINDOW_S)
        span = min(_RATE_WINDOW_S, now - self.started)
        return recent / span if span > 0 else 0.0

    def snapshot(self) -> dict:
        return {
            "steps": self.steps,
            "steps_per_s": round(self.steps_per_s(), 3),
            "busy_s": round(self.busy_s, 3),
            "prompt_tokens_total": self.prompt_tokens,
            "generation_tokens_total": self.generation_tokens,
            "requests_finished": self.requests_finished,
            "finish_reasons": dict(self.finish_reasons),
            "mean_ttft_s": round(self.ttft_sum_s / self.ttft_count, 4) if self.ttft_count else None,
        }
