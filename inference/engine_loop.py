"""The engine thread: drain the inbox, schedule, run, sample, emit events.

Two hand-offs cross threads, and the loop owns both: the Inbox (callers'
submits and aborts, taken at each step boundary) and the WakeList (handles
that got events this iteration, woken together at its end).

A failure that belongs to one sequence fails that sequence alone, never the
step: its sampling, detokenizing and events run isolated (_isolated), and a
failed batched forward is rerun in halves to find the sequences it fails on
(_execute). If the loop itself dies, every live request gets an error event,
submits are refused, and stats() raises (health shows the pool down).

On the CPU, a step that would only decode waits while the server is
admitting a request (inference.arrivals), so that request's web work and
then its prompt's step have the cores (_hold_for_arrivals).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Iterator

import torch

from inference import arrivals as arrivals_module
from inference import lending
from inference.handle import WakeList
from inference.outputs import DeltaEvent, EngineSaturated, FinishEvent, Usage
from inference.scheduler import ScheduledBatch
from inference.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5
# While holding for an arrival, how often its mark is looked at again (a
# prompt or an abort in the inbox wakes the loop at once).
_ARRIVAL_POLL_S = 0.001


def _log_for(seq: Sequence, level: int, message: str, *, exc_info=None) -> None:
    """A log line about one request, inside its submitter's context (request
    id, reply id, ... when the caller's logging binds them), so the engine
    thread's lines correlate with the web request's and the turn's."""
    context = seq.log_context
    if context is None:
        log.log(level, message, seq.request_id, exc_info=exc_info)
    else:
        context.run(log.log, level, message, seq.request_id, exc_info=exc_info)


class Inbox:
    """Requests and aborts from any thread, for the engine thread. Also the
    registry of live requests (for duplicate ids and aborts) and the count of
    those not yet scheduled once (what saturation counts)."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._items: deque = deque()  # ("add", Sequence), ("abort", request_id) or ("job", lending.Job)
        self._wakeup = threading.Event()
        self._live: dict[str, Sequence] = {}
        self._num_unscheduled = 0
        self._stopping = False
        self.down_reason: str | None = None  # why the engine thread died, when it did
        # Set by the engine thread while a step with prompt tokens runs: those
        # can take hundreds of ms, so lent work is refused rather than kept waiting.
        self.in_prompt_step = False

    # ------------------------------------------------------------ any thread
    def add(self, seq: Sequence, *, enforce_waiting_limit: bool = True) -> None:
        """Queue a new request. enforce_waiting_limit=False is for the blocking
        batch API (Engine.generate), which queues all its prompts at once on
        purpose; raises EngineSaturated otherwise when max_waiting are queued."""
        with self._lock:
            if self.down_reason is not None:
                raise RuntimeError(f"the engine is down: {self.down_reason}")
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

    def lend(self, job: lending.Job) -> bool:
        """Queue other model work for the engine thread (inference.lending);
        False once the engine is stopped or down, or while it runs a prompt's step."""
        with self._lock:
            if self._stopping or self.in_prompt_step:
                return False
            self._items.append(("job", job))
        self._wakeup.set()
        return True

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wakeup.set()

    def close_down(self, reason: str) -> list[Sequence]:
        """The engine thread died: refuse every later submit, and hand back every
        live request (queued or scheduled) so that each can get its error event."""
        with self._lock:
            self.down_reason = reason
            self._stopping = True
            self._items.clear()
            return list(self._live.values())

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

    @property
    def has_items(self) -> bool:
        return bool(self._items)

    def take(self) -> Iterator[tuple[str, Sequence | str | lending.Job]]:
        """What was queued when the call began: a borrower's next job, queued
        once its last is done, waits for the next step (inference.lending)."""
        for _ in range(len(self._items)):
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

    def __init__(self, engine, arrivals=None, lenders=None):
        self.engine = engine
        self.inbox = Inbox(engine.config.max_waiting)
        self.arrivals = arrivals or arrivals_module.ARRIVALS  # the process's marks (inference.arrivals)
        self.lenders = lenders or lending.LENDERS  # other model work run between steps (inference.lending)
        self.lends = False  # set once the runner's device is known (Engine): CPU engines only
        self.lent = 0  # jobs run between steps, and their seconds
        self.lent_s = 0.0
        self.hold_s = 0.0  # set once the runner's device is known (Engine); 0: never hold
        self.holds = 0  # decode steps that waited for an arrival
        self.held_s = 0.0
        config = engine.config
        self.wake_list = WakeList(per_stream_s=config.stream_pace_ms / 1000 / config.max_num_seqs,
                                  max_s=config.stream_pace_ms / 1000)
        self._thread = threading.Thread(target=self.run, name=f"engine-{engine.config.model_name or 'model'}",
                                        daemon=True)
        self._build = None
        self._built = threading.Event()
        self._build_error: BaseException | None = None

    def start(self, build) -> None:
        """Run build() on the engine thread, then serve; returns once build is
        done and re-raises what it raised (the thread then ends)."""
        self._build = build
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    @property
    def down_reason(self) -> str | None:
        """Why the engine thread is gone, or None while it serves (or was shut down)."""
        if self.inbox.down_reason is None and not self._thread.is_alive() and not self.inbox.stopping:
            return "the engine thread exited"
        return self.inbox.down_reason

    def stop(self, timeout_s: float) -> None:
        """Stop after the current step; requests still live end with "abort"."""
        self.inbox.stop()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def run(self) -> None:
        try:
            self._build()
        except BaseException as exc:  # handed to the constructing thread
            self._build_error = exc
            return
        finally:
            self._build = None  # the model it may hold is the engine's now, or garbage
            self._built.set()
        try:
            if self.lends:  # offer this thread to other model work between steps (inference.lending)
                self.lenders.join(self.inbox.lend)
            with torch.inference_mode():
                self._serve()
        except BaseException as exc:  # the loop itself broke, outside any step: never die silently
            log.exception("engine loop died")
            self._close_down(f"{type(exc).__name__}: {exc}")
        finally:
            self.lenders.leave(self.inbox.lend)  # a no-op for an engine that never joined

    def _serve(self) -> None:
        scheduler = self.engine.scheduler
        while True:
            self._drain_inbox()
            self.wake_list.wake_all()  # aborts' final events
            if self.inbox.stopping:
                break
            if not scheduler.has_work():
                self.wake_list.wake_all(force=True)  # nothing paced may wait out an idle engine
                self.inbox.wait(_IDLE_WAIT_S)
                continue
            if self._hold_for_arrivals():
                continue  # a prompt or an abort came in meanwhile: take it first
            if not scheduler.decode_only():
                # A step with prompt tokens can be long: held text goes out before it.
                self.wake_list.wake_all(force=True)
                self.inbox.in_prompt_step = True
            started = time.monotonic()
            try:
                self.step()
            except Exception as exc:  # no sequence to blame (the scheduler, say): fail its requests
                log.exception("engine step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")
            finally:
                self.inbox.in_prompt_step = False
            self.wake_list.wake_all(next_step_s=time.monotonic() - started)
        self._drain_inbox()
        for seq in list(scheduler.running) + list(scheduler.waiting):
            self._finish(seq, "abort", error=None)
        self.wake_list.wake_all(force=True)

    def _hold_for_arrivals(self) -> bool:
        """Before a step that would only decode, wait while the server admits
        a request (inference.arrivals), each request's mark holding at most
        hold_s from its arrival. True when the wait ended with something in
        the inbox, which the loop must take before it steps."""
        if not self.hold_s or not self.arrivals.holding(self.hold_s) or not self.engine.scheduler.decode_only():
            return False
        started = time.monotonic()
        self.wake_list.wake_all(force=True)
        while not self.inbox.has_items and not self.inbox.stopping and self.arrivals.holding(self.hold_s):
            self.inbox.wait(_ARRIVAL_POLL_S)
        self.holds += 1
        self.held_s += time.monotonic() - started
        return self.inbox.has_items

    def _close_down(self, reason: str) -> None:
        """Fail every live request and refuse new ones; stats() then reports the engine down."""
        message = f"the engine stopped: {reason}"
        for seq in self.inbox.close_down(reason):
            try:
                self._finish(seq, "error", error=message)
            except Exception:  # the engine's state is suspect now: the event matters, not the books
                log.exception("finishing %s after the engine died", seq.request_id)
                usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens)
                seq.sink.deliver(FinishEvent(seq.request_id, "error", usage, seq.metrics, error=message))
        self.wake_list.wake_all(force=True)

    def _drain_inbox(self) -> None:
        for kind, payload in self.inbox.take():
            if kind == "add":
                self.engine.scheduler.add(payload)
            elif kind == "job":
                self._run_job(payload)
            else:
                seq = self.inbox.live(payload)
                if seq is not None and not seq.is_finished:
                    self._finish(seq, "abort")

    def _run_job(self, job: lending.Job) -> None:
        """A borrower's work, on this thread's whole team. Paced text is not
        forced out first: a burst's replies each lend one or two moderation
        reads, and forcing 32 streams' wake-ups each time costs more than the
        job's wait adds to a held delta."""
        team = self.engine.step_threads.threads - self.engine.step_threads.yielding
        if team != torch.get_num_threads():
            torch.set_num_threads(team)
        if job.run():
            self.lent += 1
            self.lent_s += job.seconds

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
        sampled, logits = self._execute(batch)
        num_prefill = num_decode = 0
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:
                continue  # failed in the forward
            if seq.num_computed_tokens >= seq.num_prompt_tokens and num_new == 1:
                num_decode += 1
                seq.metrics.decode_tokens += 1
            else:
                num_prefill += num_new
                seq.metrics.prefill_tokens += num_new
            seq.num_computed_tokens += num_new
            self._isolated(seq, engine.block_manager.register_computed_blocks, seq)
        self._sample_and_append(sampled, logits)
        ended = time.monotonic()
        engine.metrics.record_step(started, ended, num_prefill, num_decode)
        if engine.step_observer is not None:
            try:
                engine.step_observer(batch, ended - started)
            except Exception:  # an observer (the benchmark's) must not fail the requests it watches
                log.exception("step observer failed")

    def _execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None]:
        """The batch's forward. When it raises, run each half on its own, down to
        single sequences: only the sequences that fail alone fail, the others
        still get this step's token (a sequence the forward fails on, such as an
        out-of-range token id, breaks every batch it is in). A failure nobody
        escapes (a broken device) fails every sequence, one at a time, and the
        loop goes on serving. A failed forward may have written KV for its
        batch's new positions only: the reruns overwrite them, failures free them."""
        try:
            return self.engine.runner.execute(batch)
        except Exception as exc:
            if len(batch.seqs) == 1:
                _log_for(batch.seqs[0], logging.ERROR, "the forward failed for request %s", exc_info=True)
                self._fail(batch.seqs[0], exc)
                return [], None
            log.warning("a forward of %d sequences failed (%s: %s); rerunning it in halves",
                        len(batch.seqs), type(exc).__name__, exc)
        half = len(batch.seqs) // 2
        parts = [self._execute(ScheduledBatch(batch.seqs[:half], batch.num_new_tokens[:half])),
                 self._execute(ScheduledBatch(batch.seqs[half:], batch.num_new_tokens[half:]))]
        sampled = [seq for part_sampled, _ in parts for seq in part_sampled]
        logits = [part_logits for part_sampled, part_logits in parts if part_sampled]
        return sampled, (torch.cat(logits) if logits else None)

    def _sample_and_append(self, sampled: list[Sequence], logits: torch.Tensor | None) -> None:
        """A token for each sequence that samples this step; a failure in one
        sequence's sampling, detokenizing, stop matching or events fails that
        sequence alone."""
        keep = [i for i, seq in enumerate(sampled) if not seq.is_finished]
        if not keep:
            return
        if len(keep) < len(sampled):
            sampled, logits = [sampled[i] for i in keep], logits[keep]
        try:
            results = self.engine.sampler.sample(sampled, logits)
        except Exception:
            # The sampler isolates its rows itself; this is for a failure outside
            # them (the batched argmax), which happens before any row drew noise.
            log.exception("batched sampling failed; sampling one sequence at a time")
            results = [self._sample_one(seq, logits[i:i + 1]) for i, seq in enumerate(sampled)]
        now = time.monotonic()
        for seq, result in zip(sampled, results):
            if isinstance(result, Exception):
                _log_for(seq, logging.ERROR, "sampling failed for request %s", exc_info=result)
                self._fail(seq, result)
            else:
                self._isolated(seq, self._append_token, seq, result[0], result[1], now)

    def _sample_one(self, seq: Sequence, logits: torch.Tensor):
        try:
            return self.engine.sampler.sample([seq], logits)[0]
        except Exception as exc:  # handed back: it fails this sequence alone
            return exc

    def _isolated(self, seq: Sequence, work, *args) -> None:
        """Run one sequence's share of the step; an exception fails that sequence only."""
        try:
            work(*args)
        except Exception as exc:
            _log_for(seq, logging.ERROR, "request %s failed in the engine step", exc_info=True)
            self._fail(seq, exc)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        if not seq.is_finished:
            self._finish(seq, "error", error=f"the model failed on this request: {type(exc).__name__}: {exc}")

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
            self._release_tail(seq)
        self.inbox.forget(seq, was_unscheduled)
        self.engine.metrics.record_finish(seq)
        usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                      cached_tokens=seq.cached_prompt_tokens or 0)
        event = FinishEvent(seq.request_id, reason, usage, seq.metrics, error=error, stop_reason=stop_reason)
        seq.sink.deliver(event)
        observer = self.engine.finish_observer
        if observer is not None:
            try:
                observer(event)
            except Exception:  # metrics must never fail a request
                log.exception("finish observer failed")

    @staticmethod
    def _release_tail(seq: Sequence) -> None:
        """Whatever text was held back (a possible stop-string start) was real
        output. Best effort: the detokenizer may be what failed this sequence."""
        try:
            tail = seq.detokenizer.release(final=True)
        except Exception:
            log.exception("releasing the held-back text of %s", seq.request_id)
            return
        if tail:
            seq.sink.deliver(DeltaEvent(seq.request_id, (), tail))

    def _fail_all(self, message: str) -> None:
        scheduler = self.engine.scheduler
        for seq in list(scheduler.running) + list(scheduler.waiting):
            if seq.status is not SequenceStatus.FINISHED:
                self._finish(seq, "error", error=message)
