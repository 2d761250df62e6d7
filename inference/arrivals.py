"""Requests on their way to the engine: decode steps let them have the CPU first.

On a CPU box the server's web work for a new chat (its middleware, the turn's
rows and context, the gateway's admission and tokenizer) runs on the same
cores as the engine's decode steps. Measured on the 2-core Zen 5 EPYC with one
chat every 250 ms and about ten replies decoding (docs/BENCHMARKS.md, "Decode
steps give way to a chat on its way"): the decode step in flight when a new
chat reached the engine took 23-30 ms against 8-15 ms for the same batch at
other times (the web work and the engine's two-thread team slowed each other),
so the chat waited 9-13 ms for that step to end after it had waited 30-36 ms
for the web work itself.

So the server marks each request it is admitting (`expect`, from the ASGI
application, before any middleware), and while one is marked the engine does
not start a step that only decodes: it waits, until the request's prompt
arrives (its `Engine.submit`, in the request's context, releases the mark),
the request is answered without one (a POST that does not generate), or the
mark is `hold_s` old. A prompt's step never waits, and neither does a step
while any prompt is queued. Each mark holds the engine for at most `hold_s`
from its creation, in total, so a stream of requests cannot starve the
replies already decoding: they lose at most `hold_s` a request, overlapping
requests' holds overlap, and with nothing to hold for nothing changes.

Process-wide (`ARRIVALS`): the web side need not know which engine a request
will reach; every engine in the process reads the same marks. No Django here.
"""
from __future__ import annotations

import contextvars
import threading
import time

_current: contextvars.ContextVar[Arrival | None] = contextvars.ContextVar("inference_arrival", default=None)


class Arrival:
    """One request being admitted; `release` is idempotent and thread-safe."""

    __slots__ = ("_owner", "created", "released")

    def __init__(self, owner: Arrivals, created: float):
        self._owner, self.created = owner, created
        self.released = False  # by its request (a mark that grew old is dropped, not released)

    def release(self) -> None:
        self.released = True
        self._owner._release(self)

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Arrivals:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._live: set[Arrival] = set()

    def expect(self, *, bind: bool = True) -> Arrival:
        """Mark a request on its way. bind: the calling context's current
        arrival, which that context's next `Engine.submit` releases."""
        arrival = Arrival(self, self._clock())
        with self._lock:
            self._live.add(arrival)
        if bind:
            _current.set(arrival)
        return arrival

    def _release(self, arrival: Arrival) -> None:
        with self._lock:
            self._live.discard(arrival)

    def holding(self, hold_s: float) -> bool:
        """Whether any mark younger than hold_s is live (older ones are dropped)."""
        if not self._live:  # the common case, without the lock
            return False
        oldest = self._clock() - hold_s
        with self._lock:
            stale = [a for a in self._live if a.created <= oldest]
            self._live.difference_update(stale)
            return bool(self._live)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, arrival: Arrival) -> bool:
        return arrival in self._live


ARRIVALS = Arrivals()


def expect() -> Arrival:
    """Mark a request on its way to this process's engines (see the module doc)."""
    return ARRIVALS.expect()


def current() -> Arrival | None:
    """The calling context's mark, if any."""
    return _current.get()


def release_current() -> None:
    """The calling context's request has reached an engine: its mark ends."""
    arrival = _current.get()
    if arrival is not None:
        arrival.release()
