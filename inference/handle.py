"""The caller's end of a request: a thread-safe event stream, async or sync."""
from __future__ import annotations

import asyncio
import queue
import time
from typing import Callable

from inference.outputs import Completion, DeltaEvent, FinishEvent

_WAKE_TIMEOUT_S = 1.0


class WakeList:
    """Handles that got events during one engine loop iteration, woken together
    at its end: one wake-up per event loop per engine step, not one per event.
    32 sequences decoding together would otherwise poke the loop 32 times per
    step (32 self-pipe writes, and as many loop wake-ups competing with the
    engine's own threads for the CPU). Engine thread only.

    Paced (`per_stream_s` > 0): a wake-up that would only carry more text of
    streams already under way waits until `per_stream_s` times the number of
    streams with news has passed since the last one, at most `max_s`. The
    readers then take several steps' tokens as one event (`RequestHandle`
    merges queued deltas), and every layer above the engine (the gateway's
    relay and output window, the reply's log, the SSE write) runs once for
    them instead of once a token: on two cores that web work is taken from
    the engine's own steps. A stream's first text, its end and an abort's
    end are never held back, so the first token and Stop are as prompt as
    before; one stream alone is held for less than a step."""

    def __init__(self, per_stream_s: float = 0.0, max_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self._handles: dict[int, RequestHandle] = {}
        self._urgent = False
        self._per_stream_s = per_stream_s
        self._max_s = max_s
        self._clock = clock
        self._last_wake = 0.0
        self.wakes = 0  # wake-ups sent (each to every loop with news)

    def add(self, handle: RequestHandle, urgent: bool = True) -> None:
        self._handles[id(handle)] = handle
        if urgent:
            self._urgent = True

    @property
    def pending(self) -> int:
        """Handles with events their readers have not been woken for."""
        return len(self._handles)

    def wake_all(self, force: bool = False, next_step_s: float = 0.0) -> None:
        """Wake the readers of every handle with news, unless pacing holds
        them: not `force`, nothing urgent, and the interval would not be
        over by the end of the next step (`next_step_s`: as long as the last
        one, say), so held text waits about the interval, not a step more."""
        if not self._handles:
            return
        now = self._clock()
        if not force and not self._urgent and self._per_stream_s > 0:
            interval = min(self._max_s, self._per_stream_s * len(self._handles))
            if now + next_step_s - self._last_wake < interval:
                return
        handles, self._handles = list(self._handles.values()), {}
        self._urgent = False
        self._last_wake = now
        self.wakes += 1
        by_loop: dict = {}
        for handle in handles:
            if handle._loop is not None and handle._wake is not None:
                by_loop.setdefault(handle._loop, []).append(handle)
        for loop, group in by_loop.items():
            wakes = [handle._wake for handle in group]
            try:
                loop.call_soon_threadsafe(_set_all, wakes)
            except RuntimeError:
                # The consumers' loop is gone: nobody will read the rest.
                for handle in group:
                    if not handle._finished_sent:
                        handle.abort()


def _set_all(events) -> None:
    for event in events:
        event.set()


class RequestHandle:
    """Events arrive from the engine thread through a thread-safe queue.
    `async for event in handle` on the event loop that submitted it (or any
    loop), `handle.iter_sync()` / `handle.result()` from plain threads."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], loop: asyncio.AbstractEventLoop | None,
                 wake_list: WakeList, abort: Callable[[str], None]):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._wake_list = wake_list
        self._abort = abort  # the engine's abort(request_id)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = loop
        self._wake = asyncio.Event() if loop is not None else None
        self._done = False
        self._finished_sent = False
        self._delivered = False  # a delta went out
        self._delivered_text = False  # text went out: later deltas may be paced
        self._held: DeltaEvent | FinishEvent | None = None  # taken from the queue behind a merged delta

    # ------------------------------------------------------ engine thread side
    def deliver(self, event: DeltaEvent | FinishEvent) -> None:
        """Queue an event (the engine thread's call, not the reader's); the
        reader is woken by the wake list at the end of the engine's loop
        iteration, together with every other handle."""
        self._events.put(event)
        # Never held: the end, the first delta, and the first with text (a
        # character split over tokens can leave the first without).
        urgent = event.finished or not self._delivered or (bool(event.text) and not self._delivered_text)
        if event.finished:
            self._finished_sent = True
        else:
            self._delivered = True
            self._delivered_text = self._delivered_text or bool(event.text)
        self._wake_list.add(self, urgent)
    # ------------------------------------------------------------ async side
    def __aiter__(self):
        return self

    async def __anext__(self) -> DeltaEvent | FinishEvent:
        if self._done:
            raise StopAsyncIteration
        running = asyncio.get_running_loop()
        if self._loop is not running:  # submitted from sync code or another loop
            self._wake = asyncio.Event()
            self._loop = running
        while True:
            event = self._take()
            if event is not None:
                break
            self._wake.clear()
            if self._held is not None or not self._events.empty():
                continue
            try:
                # The timeout only guards the moment a handle moves to a new loop,
                # when a wake-up may have been sent to the old one.
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for
                # drops a cancellation (a client gone) that lands as the wake-up does.
                async with asyncio.timeout(_WAKE_TIMEOUT_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
        if event.finished:
            self._done = True
        return event

    def _take(self) -> DeltaEvent | FinishEvent | None:
        """The next event, with the deltas queued behind it merged into one
        (paced wake-ups leave several steps' tokens queued): one event for
        the layers above, the same tokens and text in the same order."""
        event, self._held = self._held, None
        if event is None:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return None
        if event.finished:
            return event
        merged = [event]
        while True:
            try:
                following = self._events.get_nowait()
            except queue.Empty:
                break
            if following.finished:
                self._held = following
                break
            merged.append(following)
        return event if len(merged) == 1 else merge_deltas(merged)

    async def aresult(self) -> Completion:
        return self._collect([event async for event in self])

    # ------------------------------------------------------------- sync side
    def iter_sync(self, timeout_s: float | None = None):
        """Yield events from a plain thread; raises queue.Empty after timeout_s of silence."""
        while not self._done:
            event, self._held = self._held, None
            if event is None:
                event = self._events.get(timeout=timeout_s)
            if event.finished:
                self._done = True
            yield event

    def result(self, timeout_s: float | None = None) -> Completion:
        return self._collect(list(self.iter_sync(timeout_s)))

    def abort(self) -> None:
        self._abort(self.request_id)

    def _collect(self, events: list) -> Completion:
        final = events[-1]
        token_ids: list[int] = []
        text = []
        logprobs = []
        for event in events[:-1]:
            token_ids.extend(event.token_ids)
            text.append(event.text)
            if event.logprobs:
                logprobs.extend(event.logprobs)
        return Completion(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids, token_ids=token_ids,
            text="".join(text), finish_reason=final.finish_reason, usage=final.usage,
            metrics=final.metrics, logprobs=logprobs or None, error=final.error,
            stop_reason=final.stop_reason)


def merge_deltas(deltas: list[DeltaEvent]) -> DeltaEvent:
    """Consecutive deltas of one stream as one: their tokens, text and
    logprobs joined in order."""
    logprobs = None
    if any(delta.logprobs is not None for delta in deltas):
        logprobs = tuple(lp for delta in deltas for lp in (delta.logprobs or ()))
    return DeltaEvent(
        request_id=deltas[0].request_id,
        token_ids=tuple(t for delta in deltas for t in delta.token_ids),
        text="".join(delta.text for delta in deltas),
        logprobs=logprobs,
    )
