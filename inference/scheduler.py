"""Which tokens run in the next step.

Every step hands out a token budget: running sequences first (a decode token
each, or the next chunk of an unfinished prefill), then waiting ones in
(priority, arrival) order as prefill chunks. When the KV cache is out of
blocks, the least urgent, newest running sequence is preempted (its blocks
freed, recomputed later), and nothing new is admitted in that step.

With prompts in bf16 (EngineConfig.bf16_prompts) a step that mixes prompt
rows with generated ones multiplies twice per layer, once over the bf16
weights for the prompt rows and once over the fp32 path for the others. Past
`prompt_steps_above` decoding sequences (EngineConfig.prompt_steps_above; by
default any) the scheduler gives prompts steps of their own, alternating with
decode steps while both wait: the same matmul work, but a new chat's prompt
no longer waits for a decode pass over every running sequence before its
first token (a 40-token prompt beside 12 decoding sequences: 27 ms for the
prompt's step against 73-91 ms mixed, on the 2-core AMX Xeon; beside 1 to 8:
15-20 against 25-34 ms on the Zen 5 EPYC), the decodes' next step costs what
their rows added to a mixed one, and 32 prompts sent at once are prefilled in
fewer, cheaper steps (docs/BENCHMARKS.md "small_linear to 32 rows").
"""
from __future__ import annotations

from dataclasses import dataclass, field

from inference.block_manager import BlockManager
from inference.config import EngineConfig
from inference.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # parallel to seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


MIXED, PROMPTS, DECODES = "mixed", "prompts", "decodes"  # what a step may carry


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, prompt_steps_above: int | None = None):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        # More decoding sequences than this: prompts and decodes take steps by turns (None: never).
        self.prompt_steps_above = prompt_steps_above
        self.last_kind = MIXED
        self.waiting: list[Sequence] = []  # sorted by sort_key before each admission pass
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def decode_only(self) -> bool:
        """Whether the next step can only decode: nothing queued, no prompt unfinished."""
        return not self.waiting and all(seq.num_uncomputed_tokens == 1 for seq in self.running)

    def schedule(self) -> ScheduledBatch:
        kind = self._step_kind()
        batch = self._build(kind)
        if not batch and kind == PROMPTS:  # no prompt could run (no seat, no blocks): the decodes go on
            kind, batch = DECODES, self._build(DECODES)
        self.last_kind = kind
        return batch

    def _step_kind(self) -> str:
        if self.prompt_steps_above is None:
            return MIXED
        decoding = sum(1 for seq in self.running if seq.num_uncomputed_tokens == 1)
        if decoding <= self.prompt_steps_above or self.decode_only():
            return MIXED
        return DECODES if self.last_kind == PROMPTS else PROMPTS

    def _build(self, kind: str) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget, preempted = self._schedule_running(batch, self.max_num_batched_tokens, kind)
        if not preempted and kind != DECODES:
            self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int, kind: str = MIXED) -> tuple[int, bool]:
        """Running sequences first, most urgent first, preempting the least urgent
        when blocks run out; a PROMPTS step takes only those with more than one
        token to compute, a DECODES step only the others. Returns the budget
        left and whether any was preempted."""
        bm = self.block_manager
        preempted = False
        self.running.sort(key=Sequence.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if kind != MIXED and (seq.num_uncomputed_tokens > 1) != (kind == PROMPTS):
                i += 1
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_append(seq, num_new):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: everyone after it is gone already
            bm.append_slots(seq, num_new)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        return budget, preempted

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Waiting sequences in (priority, arrival) order while budget, seats and blocks last."""
        bm = self.block_manager
        self.waiting.sort(key=Sequence.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = bm.match_prefix(seq)
            num_cached = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.can_allocate(hits, num_cached + num_new):
                break  # head-of-line waits: admitting smaller requests past it would starve it
            self.waiting.pop(0)
            bm.allocate(seq, hits, num_cached + num_new)
            if seq.cached_prompt_tokens is None:  # first admission: what the prompt got from cache
                seq.cached_prompt_tokens = num_cached
                seq.metrics.cached_tokens = num_cached
                bm.record_lookup(seq.num_prompt_tokens, num_cached)
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.metrics.preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out, freeing its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
