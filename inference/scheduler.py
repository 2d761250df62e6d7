"""Which tokens run in the next step.

Every step hands out a token budget: running sequences first (a decode token
each, or the next chunk of an unfinished prefill), then waiting ones in
(priority, arrival) order as prefill chunks. When the KV cache is out of
blocks, the least urgent, newest running sequence is preempted (its blocks
freed, recomputed later), and nothing new is admitted in that step.
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


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # sorted by sort_key before each admission pass
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget, preempted = self._schedule_running(batch, self.max_num_batched_tokens)
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        """Running sequences first, most urgent first, preempting the least urgent
        when blocks run out. Returns the budget left and whether any was preempted."""
        bm = self.block_manager
        preempted = False
        self.running.sort(key=Sequence.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
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
