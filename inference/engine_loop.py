"""The engine thread: drain the inbox, schedule, run, sample, emit events."""
from __future__ import annotations

import logging
import time

import torch

from inference.handle import wake_readers
from inference.outputs import DeltaEvent, FinishEvent, Usage
from inference.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


def run_loop(engine) -> None:
    with torch.inference_mode():
        while True:
            _drain_inbox(engine)
            wake_readers(engine)  # aborts' final events
            if engine._stopping:
                break
            if not engine.scheduler.has_work():
                engine._wakeup.wait(_IDLE_WAIT_S)
                engine._wakeup.clear()
                continue
            try:
                step(engine)
            except Exception as exc:  # a failed step must not kill the pool: fail its requests instead
                log.exception("engine step failed")
                _fail_all(engine, f"{type(exc).__name__}: {exc}")
            wake_readers(engine)
    _drain_inbox(engine)
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        _finish(engine, seq, "abort", error=None)
    wake_readers(engine)


def _drain_inbox(engine) -> None:
    while engine._inbox:
        kind, payload = engine._inbox.popleft()
        if kind == "add":
            engine.scheduler.add(payload)
        else:
            seq = engine._requests.get(payload)
            if seq is not None and not seq.is_finished:
                _finish(engine, seq, "abort")


def step(engine) -> None:
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
            with engine._lock:
                engine._num_unscheduled -= 1
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
        _append_token(engine, seq, token_id, logprob, now)
    ended = time.monotonic()
    engine.metrics.record_step(started, ended, num_prefill, num_decode)
    if engine.step_observer is not None:
        engine.step_observer(batch, ended - started)


def _append_token(engine, seq: Sequence, token_id: int, logprob, now: float) -> None:
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
    elif not params.ignore_eos and token_id in engine.eos_token_ids:
        reason, stop_reason = "stop", token_id
    else:
        matched = seq.detokenizer.add(token_id)
        if matched is not None:
            reason, stop_reason = "stop", matched
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= engine.max_model_len:
            reason = "length"
    text = seq.detokenizer.release(final=reason is not None)
    seq.sink._deliver(DeltaEvent(seq.request_id, (token_id,), text,
                                 (logprob,) if logprob is not None else None))
    if reason is not None:
        _finish(engine, seq, reason, stop_reason=stop_reason)


def _finish(engine, seq: Sequence, reason: str, stop_reason=None, error: str | None = None) -> None:
    was_unscheduled = seq.metrics.first_scheduled_time is None
    engine.scheduler.finish(seq)
    seq.finish_reason, seq.stop_reason, seq.error = reason, stop_reason, error
    seq.metrics.finished_time = time.monotonic()
    if reason in ("abort", "error"):
        # Whatever text was held back (a possible stop-string start) was real output.
        tail = seq.detokenizer.release(final=True)
        if tail:
            seq.sink._deliver(DeltaEvent(seq.request_id, (), tail))
    with engine._lock:
        engine._requests.pop(seq.request_id, None)
        if was_unscheduled:
            engine._num_unscheduled -= 1
    engine.metrics.record_finish(seq)
    usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                  cached_tokens=seq.cached_prompt_tokens or 0)
    seq.sink._deliver(FinishEvent(seq.request_id, reason, usage, seq.metrics, error=error,
                                  stop_reason=stop_reason))


def _fail_all(engine, message: str) -> None:
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        if seq.status is not SequenceStatus.FINISHED:
            _finish(engine, seq, "error", error=message)
