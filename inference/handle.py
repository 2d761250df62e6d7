"""The caller's end of a request: a thread-safe event stream, async or sync."""
from __future__ import annotations

import asyncio
import queue
from typing import Callable

from inference.outputs import Completion, DeltaEvent, FinishEvent

_WAKE_TIMEOUT_S = 1.0


class WakeList:
    """Handles that got events during one engine loop iteration, woken together
    at its end: one wake-up per event loop per engine step, not one per event.
    32 sequences decoding together would otherwise poke the loop 32 times per
    step (32 self-pipe writes, and as many loop wake-ups competing with the
    engine's own threads for the CPU). Engine thread only."""

    def __init__(self):
        self._handles: list[RequestHandle] = []

    def add(self, handle: RequestHandle) -> None:
        self._handles.append(handle)

    def wake_all(self) -> None:
        handles, self._handles = self._handles, []
        if not handles:
            return
        by_loop: dict = {}
        for handle in handles:
            if handle._loop is not None and handle._wake is not None:
                by_loop.setdefault(handle._loop, {})[id(handle)] = handle
        for loop, group in by_loop.items():
            wakes = [handle._wake for handle in group.values()]
            try:
                loop.call_soon_threadsafe(_set_all, wakes)
            except RuntimeError:
                # The consumers' loop is gone: nobody will read the rest.
                for handle in group.values():
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

    # ------------------------------------------------------ engine thread side
    def deliver(self, event: DeltaEvent | FinishEvent) -> None:
        """Queue an event (the engine thread's call, not the reader's); the
        reader is woken by the wake list at the end of the engine's loop
        iteration, together with every other handle."""
        self._events.put(event)
        if event.finished:
            self._finished_sent = True
        self._wake_list.add(self)
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
            try:
                event = self._events.get_nowait()
                break
            except queue.Empty:
                pass
            self._wake.clear()
            if not self._events.empty():
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

    async def aresult(self) -> Completion:
        return self._collect([event async for event in self])

    # ------------------------------------------------------------- sync side
    def iter_sync(self, timeout_s: float | None = None):
        """Yield events from a plain thread; raises queue.Empty after timeout_s of silence."""
        while not self._done:
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
