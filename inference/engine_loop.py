"""The engine thread: drain the inbox, schedule, run, sample, emit events.

Two hand-offs cross threads, and the loop owns both: the Inbox (callers'
submits and aborts, taken at each step boundary) and the WakeList (handles
that got events this iteration, woken together at its end).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Iterator

import torch

from inference.handle import WakeList
from inference.outputs import DeltaEvent, EngineSaturated, FinishEvent, Usage
from inference.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class Inbox:
    """Requests and aborts from any thread, for the engine thread. Also the
    registry of live requests (for duplicate ids and aborts) and the count of
    those not yet scheduled once (what saturation counts)."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._items: deque = deque()  # ("add", Sequence) or ("abort", request_id)
        self._wakeup = threading.Event()
        self._live: dict[str, Sequence] = {}
        self._num_unscheduled = 0
        self._stopping = False

    # ------------------------------------------------------------ any thread
    def add(self, seq: Sequence, *, enforce_waiting_limit: bool = True) -> None:
        """Queue a new request. enforce_waiting_limit=False is for the blocking
        batch API (Engine.generate), which queues all its prompts at once on
        purpose; raises EngineSaturated otherwise when max_waiting are queued."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if seq.request_id in self._live:
                raise ValueError(f"request id {seq.request_id!r} is already in use")
            if enforce_waiting_limit and self._num_unscheduled >= self.max_waiting:
                raise EngineSaturated(f"{self._num_unscheduled} requests are already waiting")
            self._num_unscheduled += 1
            self._live[seq.request_id] = seq
            self._items.append(("add", seq))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Queue an abort (no-op when the request is unknown or done)."""
        with self._lock:
            if request_id not in self._live:
                return
            self._items.append(("abort", request_id))
        self._wakeup.set()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wakeup.set()

    @property
    def num_unscheduled(self) -> int:
        return self._num_unscheduled

    # ----------------------------------------------------------- engine thread
    @property
    def stopping(self) -> bool:
        return self._stopping

    def wait(self, timeout_s: float) -> None:
        """Sleep until something arrives (or timeout_s passes)."""
        self._wakeup.wait(timeout_s)
        self._wakeup.clear()

    def take(self) -> Iterator[tuple[str, Sequence | str]]:
        while self._items:
            yield self._items.popleft()

    def live(self, request_id: str) -> Sequence | None:
        return self._live.get(request_id)

    def mark_scheduled(self) -> None:
        """A request was scheduled for the first time: it no longer counts as waiting."""
        with self._lock:
            self._num_unscheduled -= 1

    def forget(self, seq: Sequence, was_unscheduled: bool) -> None:
        with self._lock:
            self._live.pop(seq.request_id, None)
            if was_unscheduled:
                self._num_unscheduled -= 1


class EngineLoop:
    """The engine thread. It reads the engine's public parts (scheduler,
    runner, sampler, block manager, metrics) and is the only writer of its
    sequences' state once they are submitted."""

    def __init__(self, engine):
        self.engine = engine
        self.inbox = Inbox(engine.config.max_waiting)
        self.wake_list = WakeList()
        self._thread = threading.Thread(target=self.run, name=f"engine-{engine.model_name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop after the current step; requests still live end with "abort"."""
        self.inbox.stop()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def run(self) -> None:
        scheduler = self.engine.scheduler
        with torch.inference_mode():
            while True:
                self._drain_inbox()
                self.wake_list.wake_all()  # aborts' final events
                if self.inbox.stopping:
                    break
                if not scheduler.has_work():
                    self.inbox.wait(_IDLE_WAIT_S)
                    continue
                try:
                    self.step()
                except Exception as exc:  # a failed step must not kill the pool: fail its requests instead
                    log.exception("engine step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                self.wake_list.wake_all()
        self._drain_inbox()
        for seq in list(scheduler.running) + list(scheduler.waiting):
            self._finish(seq, "abort", error=None)
        self.wake_list.wake_all()

    def _drain_inbox(self) -> None:
        for kind, payload in self.inbox.take():
            if kind == "add":
                self.engine.scheduler.add(payload)
            else:
                seq = self.inbox.live(payload)
                if seq is not None and not seq.is_finished:
                    self._finish(seq, "abort")

    def step(self) -> None:
        engine = self.engine
        started = time.monotonic()
        batch = engine.scheduler.schedule()
        if not batch:
            # Nothing fits this step (cannot persist: an idle cache admits any prompt
            # that passed submit's checks); avoid a hot spin while blocks drain.
            time.sleep(0.001)
            return
        for seq in batch.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = started
                self.inbox.mark_scheduled()
        sampled, logits = engine.runner.execute(batch)
        num_prefill = num_decode = 0
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens >= seq.num_prompt_tokens and num_new == 1:
                num_decode += 1
                seq.metrics.decode_tokens += 1
            else:
                num_prefill += num_new
                seq.metrics.prefill_tokens += num_new
            seq.num_computed_tokens += num_new
            engine.block_manager.register_computed_blocks(seq)
        results = engine.sampler.sample(sampled, logits)
        now = time.monotonic()
        for seq, (token_id, logprob) in zip(sampled, results):
            self._append_token(seq, token_id, logprob, now)
        ended = time.monotonic()
        engine.metrics.record_step(started, ended, num_prefill, num_decode)
        if engine.step_observer is not None:
            engine.step_observer(batch, ended - started)

    def _append_token(self, seq: Sequence, token_id: int, logprob, now: float) -> None:
        seq.token_ids.append(token_id)
        metrics = seq.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        else:
            metrics.inter_token_latencies_s.append(now - metrics.last_token_time)
        metrics.last_token_time = now
        if logprob is not None:
            seq.logprobs.append(logprob)
        params = seq.params
        reason = stop_reason = None
        if token_id in params.stop_token_ids:
            reason, stop_reason = "stop", token_id
        elif not params.ignore_eos and token_id in self.engine.eos_token_ids:
            reason, stop_reason = "stop", token_id
        else:
            matched = seq.detokenizer.add(token_id)
            if matched is not None:
                reason, stop_reason = "stop", matched
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.engine.max_model_len:
                reason = "length"
        text = seq.detokenizer.release(final=reason is not None)
        seq.sink.deliver(DeltaEvent(seq.request_id, (token_id,), text,
                                    (logprob,) if logprob is not None else None))
        if reason is not None:
            self._finish(seq, reason, stop_reason=stop_reason)

    def _finish(self, seq: Sequence, reason: str, stop_reason=None, error: str | None = None) -> None:
        was_unscheduled = seq.metrics.first_scheduled_time is None
        self.engine.scheduler.finish(seq)
        seq.finish_reason, seq.stop_reason, seq.error = reason, stop_reason, error
        seq.metrics.finished_time = time.monotonic()
        if reason in ("abort", "error"):
            # Whatever text was held back (a possible stop-string start) was real output.
            tail = seq.detokenizer.release(final=True)
            if tail:
                seq.sink.deliver(DeltaEvent(seq.request_id, (), tail))
        self.inbox.forget(seq, was_unscheduled)
        self.engine.metrics.record_finish(seq)
        usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                      cached_tokens=seq.cached_prompt_tokens or 0)
        seq.sink.deliver(FinishEvent(seq.request_id, reason, usage, seq.metrics, error=error,
                                     stop_reason=stop_reason))

    def _fail_all(self, message: str) -> None:
        scheduler = self.engine.scheduler
        for seq in list(scheduler.running) + list(scheduler.waiting):
            if seq.status is not SequenceStatus.FINISHED:
                self._finish(seq, "error", error=message)
