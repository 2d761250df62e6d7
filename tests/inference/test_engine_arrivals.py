"""Decode steps wait while the server admits a request (inference.arrivals):
until its prompt arrives, or its mark is released or old; prompts never wait."""
from __future__ import annotations

import asyncio
import contextvars
import time

import pytest

from inference import SamplingParams, arrivals
from inference.arrivals import Arrivals

from .conftest import make_prompts

pytestmark = pytest.mark.timeout(120)


def test_a_mark_holds_until_it_is_released_or_old():
    now = [100.0]
    marks = Arrivals(clock=lambda: now[0])
    first = marks.expect(bind=False)
    assert marks.holding(0.04) and first in marks
    now[0] += 0.039
    assert marks.holding(0.04)
    now[0] += 0.001
    assert not marks.holding(0.04) and first not in marks and len(marks) == 0  # dropped once old
    second = marks.expect(bind=False)
    second.release()
    second.release()  # idempotent
    assert not marks.holding(0.04)


def test_a_submit_releases_the_mark_of_its_own_context_and_no_other(make_engine):
    engine = make_engine()
    ours, theirs = contextvars.copy_context(), contextvars.copy_context()
    mine, other = ours.run(arrivals.expect), theirs.run(arrivals.expect)
    try:
        assert mine in arrivals.ARRIVALS and other in arrivals.ARRIVALS
        handle = ours.run(engine.submit, make_prompts(1, seed=3)[0], SamplingParams(max_tokens=2, temperature=0.0))
        assert mine not in arrivals.ARRIVALS and other in arrivals.ARRIVALS
        assert handle.result().finish_reason == "length"
    finally:
        mine.release()
        other.release()


class Steps:
    """The engine's steps, counted by its step observer."""

    def __init__(self, engine):
        self.count = 0
        engine.step_observer = self.observe

    def observe(self, batch, duration_s) -> None:
        self.count += 1

    async def during(self, seconds: float) -> int:
        before = self.count
        await asyncio.sleep(seconds)
        return self.count - before


async def first_token(handle):
    async for event in handle:
        if event.token_ids or event.finished:
            return event


async def test_decode_steps_wait_for_a_request_on_its_way_and_prompts_do_not(make_engine):
    engine = make_engine(arrival_hold_ms=8000)
    steps = Steps(engine)
    decoding = make_prompts(1, seed=11)[0]
    params = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
    running = engine.submit(decoding, params, request_id="running")
    await first_token(running)
    mark = arrivals.ARRIVALS.expect(bind=False)
    try:
        # At most the step in flight when the mark was made.
        assert await steps.during(0.3) <= 1
        # Another request's prompt is not held back, though the mark still is.
        fresh = engine.submit(make_prompts(1, seed=12)[0], SamplingParams(max_tokens=4, temperature=0.0),
                              request_id="fresh")
        event = await asyncio.wait_for(first_token(fresh), 5)
        assert event.token_ids and mark in arrivals.ARRIVALS
        # Its prompt done, it decodes too, and both wait again.
        assert await steps.during(0.3) <= 1
    finally:
        mark.release()
    final = await asyncio.wait_for(running.aresult(), 30)
    assert final.finish_reason == "length" and final.usage.completion_tokens == 600
    stats = engine.stats()
    assert stats["arrival_holds"] >= 2 and stats["arrival_held_s"] >= 0.5


async def test_a_mark_nobody_releases_holds_decodes_for_arrival_hold_ms_only(make_engine):
    engine = make_engine(arrival_hold_ms=150)
    running = engine.submit(make_prompts(1, seed=13)[0], SamplingParams(max_tokens=200, temperature=0.0,
                                                                        ignore_eos=True))
    await first_token(running)
    arrivals.ARRIVALS.expect(bind=False)  # never released: a request that hangs before it submits
    started = time.monotonic()
    final = await asyncio.wait_for(running.aresult(), 30)
    assert final.finish_reason == "length" and final.usage.completion_tokens == 200
    held = engine.stats()["arrival_held_s"]
    assert 0.1 <= held <= time.monotonic() - started


async def test_with_arrival_hold_ms_0_decodes_never_wait(make_engine):
    engine = make_engine(arrival_hold_ms=0)
    steps = Steps(engine)
    running = engine.submit(make_prompts(1, seed=14)[0], SamplingParams(max_tokens=400, temperature=0.0,
                                                                        ignore_eos=True))
    await first_token(running)
    with arrivals.ARRIVALS.expect(bind=False):
        assert await steps.during(0.3) > 5
    await asyncio.wait_for(running.aresult(), 30)
    assert engine.stats()["arrival_holds"] == 0


def test_arrival_hold_ms_is_bounded():
    from inference import EngineConfig

    assert EngineConfig().arrival_hold_ms == 40.0
    for wrong in (-1.0, 10_001.0):
        with pytest.raises(ValueError, match="arrival_hold_ms must be between 0 and 10000"):
            EngineConfig(arrival_hold_ms=wrong)


async def test_stop_is_not_held_back_by_a_request_on_its_way(make_engine):
    """Stop frees a slot at the next step boundary, held or not: an abort wakes the hold."""
    engine = make_engine(arrival_hold_ms=8000)
    params = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
    doomed = engine.submit(make_prompts(1, seed=15)[0], params, request_id="doomed")
    await first_token(doomed)
    with arrivals.ARRIVALS.expect(bind=False):
        await asyncio.sleep(0.1)  # held by now
        started = time.monotonic()
        engine.abort("doomed")
        final = await asyncio.wait_for(doomed.aresult(), 5)
        assert final.finish_reason == "abort" and time.monotonic() - started < 5
        assert engine.stats()["running"] == 0


def test_shutdown_is_not_held_back_by_a_request_on_its_way(make_engine):
    engine = make_engine(arrival_hold_ms=8000)
    handle = engine.submit(make_prompts(1, seed=16)[0], SamplingParams(max_tokens=600, temperature=0.0,
                                                                       ignore_eos=True))
    next(iter(handle.iter_sync(5)))  # its first token: decoding now
    with arrivals.ARRIVALS.expect(bind=False):
        time.sleep(0.1)
        started = time.monotonic()
        engine.shutdown(timeout_s=5)
        assert time.monotonic() - started < 5
    assert handle.result().finish_reason == "abort"
