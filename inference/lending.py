"""Other model work runs on a CPU engine's thread, between its steps.

A CPU engine's steps run on one OpenMP team as large as the cores it has.
When another thread of the process runs a model of its own beside them (the
embedding thread: moderation's classifier reading replies and prompts,
retrieval's vectors), it takes a core from that team while it runs, and the
team's other thread waits at every barrier for the one that lost its core.
On the 2-core Zen 5 EPYC, 32 chats at once through the chat page
(docs/BENCHMARKS.md, "Moderation's reads on the engine's thread"), the page
kept 70-76% of the engine alone's tok/s with moderation's classifiers and
83-85% with its rules only; the engine's decode steps took 40 ms and more
while the replies' mid-stream reads ran beside them, against 27-31 ms before.

Giving that work a team of its own is worse: libgomp spins a team's idle
workers between parallel regions only while it counts no more OpenMP threads
than cores, and a throwaway probe that ran the embedding thread on two threads
while the engine held its steps made the engine's decode steps 39-45 ms for
the whole burst (its thread switched 38,800 times against about 1,000).

So such work is lent the engine's thread (`Lenders.run`): it goes into the
engine's inbox, and the engine runs it before its next step, on its own team.
The same CPU then costs the replies only its length on the whole team: the
page kept 75% (median of ten rounds, 72-77%) against 73% (71-76%), the web
path's 32-row steps 34.5-42.7 ms against 38.6-46.2, and one chat every 250 ms
had its first token +42.5 ms after the engine alone's against +47.5 ms
(medians of four rounds). A borrower waits at most `wait_s` for the engine to
take its job, and otherwise runs the work on its own thread, as before; an
engine running a step with prompt tokens (hundreds of ms, for a long prompt)
refuses at once rather than keep it waiting. The engine takes the jobs queued when
it looks, so a borrower's next job waits for the next step: a long batch split
into jobs cannot starve the replies.

Only engines on the CPU lend their thread (`Lenders.join`); with none, `run`
refuses at once. Process-wide (`LENDERS`). No Django here.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

_QUEUED, _RUNNING, _DONE, _CANCELLED = range(4)


class Job:
    """One piece of work for an engine thread, claimed by it or cancelled
    by its borrower, whichever comes first."""

    __slots__ = ("fn", "_lock", "_state", "started", "done", "result", "error", "seconds")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self._lock = threading.Lock()
        self._state = _QUEUED
        self.started = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0

    def cancel(self) -> bool:
        """The borrower's: True when the job will never run."""
        with self._lock:
            if self._state == _QUEUED:
                self._state = _CANCELLED
            return self._state == _CANCELLED

    def run(self) -> bool:
        """The engine thread's: run the job unless it was cancelled; True when it ran."""
        with self._lock:
            if self._state != _QUEUED:
                return False
            self._state = _RUNNING
        self.started.set()
        started = time.perf_counter()
        try:
            self.result = self.fn()
        except BaseException as exc:  # the borrower's to handle; the engine thread goes on
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - started
            with self._lock:
                self._state = _DONE
            self.done.set()
        return True


class Lenders:
    def __init__(self):
        self._lock = threading.Lock()
        self._lenders: list[Callable[[Job], bool]] = []
        self.lent = 0  # jobs an engine ran
        self.refused = 0  # jobs no engine took in time, or with no CPU engine at all

    def join(self, lend: Callable[[Job], bool]) -> None:
        """A CPU engine offers its thread: `lend(job)` queues a job for it
        (False when it cannot take any more, being stopped)."""
        with self._lock:
            self._lenders.append(lend)

    def leave(self, lend: Callable[[Job], bool]) -> None:
        """No longer offered; a no-op for one that never joined."""
        with self._lock:
            if lend in self._lenders:
                self._lenders.remove(lend)

    def __bool__(self) -> bool:
        return bool(self._lenders)

    def run(self, fn: Callable[[], Any], *, wait_s: float) -> tuple[bool, Any]:
        """(True, fn()'s result) when an engine thread ran fn, having taken it
        within wait_s; (False, None) when none did, fn not run. fn's exception
        is raised here."""
        with self._lock:
            lend = self._lenders[0] if self._lenders else None
        job = Job(fn)
        if lend is None or not lend(job) or (not job.started.wait(wait_s) and job.cancel()):
            self.refused += 1
            return False, None
        job.done.wait()
        self.lent += 1
        if job.error is not None:
            raise job.error
        return True, job.result


LENDERS = Lenders()
