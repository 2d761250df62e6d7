"""A request as the scheduler sees it: tokens, progress, blocks, status."""
from __future__ import annotations

import enum
import itertools

from inference.config import SamplingParams
from inference.outputs import RequestMetrics

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 *, priority: int = 0, cache_salt: str | None = None, arrival_time: float = 0.0):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.priority = priority  # lower is more urgent; ties go to the earlier arrival
        self.arrival_order = next(_arrival_counter)
        self.cache_salt = cache_salt
        self.status = SequenceStatus.WAITING
        # Tokens whose KV is in the cache. The model runs tokens
        # [num_computed_tokens, len(token_ids)) - one for a decoding sequence.
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chained hashes of the full blocks of token_ids, extended as tokens
        # arrive; computed once per block and reused across admissions.
        self.block_hashes: list[int] = []
        self.num_registered_blocks = 0  # leading blocks already entered in the prefix cache
        self.cached_prompt_tokens: int | None = None  # first admission's prefix-cache hit
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.generator = None  # torch.Generator for seeded sampling, made by the sampler
        self.detokenizer = None
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.sink = None  # the RequestHandle that receives this sequence's events
        self.log_context = None  # contextvars.Context of the submitter, for its log lines

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_order)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
