"""Other model work runs on a CPU engine's thread between its steps
(inference.lending): never inside a step, one job between two steps, the
borrower's exception raised to it, a job no engine takes in time never run,
and the engine's tokens unchanged."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from inference import SamplingParams, lending
from inference.lending import Job, Lenders

from .conftest import hf_greedy, make_prompts

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def lenders(monkeypatch):
    """A registry of this test's own: engines built here join it, not the process's."""
    fresh = Lenders()
    monkeypatch.setattr(lending, "LENDERS", fresh)
    return fresh


def test_no_engine_refuses_at_once_and_runs_nothing():
    calls = []
    started = time.monotonic()
    assert Lenders().run(lambda: calls.append(1), wait_s=5.0) == (False, None)
    assert calls == [] and time.monotonic() - started < 1.0


def test_a_job_no_engine_takes_in_time_is_cancelled_and_never_runs():
    queued: list[Job] = []
    registry = Lenders()
    registry.join(lambda job: queued.append(job) or True)  # an engine stuck in a long step
    calls = []
    assert registry.run(lambda: calls.append(1), wait_s=0.05) == (False, None)
    assert len(queued) == 1 and registry.refused == 1
    assert queued[0].run() is False and calls == []  # the engine reaches it later: nothing runs


def test_a_job_taken_is_waited_for_even_past_wait_s():
    registry = Lenders()

    def lend(job: Job) -> bool:
        threading.Thread(target=job.run).start()
        return True

    registry.join(lend)
    ran, result = registry.run(lambda: time.sleep(0.2) or "done", wait_s=0.01)
    assert (ran, result) == (True, "done") and registry.lent == 1


def test_a_stopped_engine_refuses():
    registry = Lenders()
    registry.join(lambda job: False)
    assert registry.run(lambda: 1, wait_s=1.0) == (False, None)


def test_jobs_run_on_the_engine_thread_between_steps_one_between_two(make_engine, lenders):
    engine = make_engine()
    assert lenders, "a CPU engine lends its thread"
    steps: list[tuple[float, float]] = []

    def observe(batch, duration_s):
        ended = time.perf_counter()
        steps.append((ended - duration_s, ended))

    engine.step_observer = observe
    handle = engine.submit(make_prompts(1, seed=11, min_len=8, max_len=8)[0],
                           SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    jobs: list[tuple[float, float, str]] = []

    def job():
        started = time.perf_counter()
        torch.ones(64, 64) @ torch.ones(64, 64)  # torch work, on the engine's team
        time.sleep(0.002)  # long enough to count in the engine's lent_s
        jobs.append((started, time.perf_counter(), threading.current_thread().name))
        return len(jobs)

    while len(steps) < 2:
        time.sleep(0.001)
    results = [lenders.run(job, wait_s=5.0) for _ in range(20)]
    assert handle.result(timeout_s=60).finish_reason == "length"
    assert results == [(True, i) for i in range(1, 21)]
    assert all(name.startswith("engine-") for _, _, name in jobs)
    ends = [end for _, end in steps]
    for (start, end, _), (next_start, _, _) in zip(jobs, jobs[1:]):
        assert not any(s < end and start < e for s, e in steps)  # never inside a step
        assert any(end <= e <= next_start for e in ends), "a step between two jobs"
    stats = engine.stats()
    assert stats["lent_jobs"] == 20 and stats["lent_s"] >= 0.04


def test_an_idle_engine_takes_a_job_at_once_and_hands_back_its_exception(make_engine, lenders):
    engine = make_engine()

    def broken():
        raise ValueError("the borrower's own bug")

    started = time.monotonic()
    with pytest.raises(ValueError, match="the borrower's own bug"):
        lenders.run(broken, wait_s=5.0)
    assert time.monotonic() - started < 2.0  # woken, not found at the idle wait's end
    # The engine thread goes on serving.
    prompt = make_prompts(1, seed=5)[0]
    assert engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))[0].finish_reason == "length"


def test_tokens_are_hf_generates_with_jobs_between_the_steps(make_engine, lenders, reference_model):
    engine = make_engine()
    prompts = make_prompts(4, seed=23)
    stop = threading.Event()

    def borrow():
        while not stop.is_set():
            lenders.run(lambda: torch.randn(128, 128) @ torch.randn(128, 128), wait_s=0.05)

    borrower = threading.Thread(target=borrow)
    borrower.start()
    try:
        outputs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    finally:
        stop.set()
        borrower.join()
    assert engine.stats()["lent_jobs"] > 0
    assert [o.token_ids for o in outputs] == [hf_greedy(reference_model, p) for p in prompts]


def test_a_shut_down_engine_leaves_and_its_queued_job_never_runs(make_engine, lenders):
    engine = make_engine()
    assert lenders
    engine.shutdown()
    assert not lenders
    calls = []
    assert lenders.run(lambda: calls.append(1), wait_s=0.05) == (False, None) and calls == []


def test_a_job_is_refused_at_once_while_a_prompt_step_runs(make_engine, lenders):
    engine = make_engine()
    in_step, release = threading.Event(), threading.Event()

    def observe(batch, duration_s):
        if any(n > 1 for n in batch.num_new_tokens):  # the prompt's step, not over until this returns
            in_step.set()
            release.wait(30)

    engine.step_observer = observe
    handle = engine.submit(make_prompts(1, seed=13, min_len=40, max_len=40)[0],
                           SamplingParams(max_tokens=2, temperature=0.0))
    assert in_step.wait(30)
    calls = []
    try:
        started = time.monotonic()
        assert lenders.run(lambda: calls.append(1), wait_s=10.0) == (False, None)
        assert time.monotonic() - started < 2.0 and calls == []  # not kept waiting out wait_s
    finally:
        release.set()
    assert handle.result(timeout_s=60).finish_reason == "length"
    assert lenders.run(lambda: "after", wait_s=10.0) == (True, "after")
