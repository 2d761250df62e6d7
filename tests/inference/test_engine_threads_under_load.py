"""Engine steps give way to other processes' CPU load (EngineConfig.follow_cpu_load,
inference.threads.CpuLoad): as many threads as cores are free, at least one,
the whole team again once they are; fp32 never changes its count."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from inference.threads import CpuLoad, StepThreads

from .conftest import make_prompts

pytestmark = pytest.mark.timeout(180)


class FakeMachine:
    """/proc/stat and os.times() as the test says: busy seconds of the machine and of this process."""

    def __init__(self):
        self.now = 0.0
        self.machine = 100.0
        self.own = 10.0

    def run(self, seconds: float, others_cores: float, own_cores: float) -> None:
        self.now += seconds
        self.machine += seconds * (others_cores + own_cores)
        self.own += seconds * own_cores

    def load(self) -> CpuLoad:
        return CpuLoad(interval_s=0.5, read_machine=lambda: self.machine, read_own=lambda: self.own,
                       clock=lambda: self.now)


def test_cpu_load_counts_other_processes_only():
    fake = FakeMachine()
    load = fake.load()
    assert load.sample() is None  # one reading is no interval yet
    fake.run(1.0, others_cores=0.8, own_cores=2.0)  # the engine's own team does not count
    assert load.sample() == pytest.approx(0.8)
    fake.run(0.2, others_cores=2.0, own_cores=0.0)
    assert load.sample() == pytest.approx(0.8)  # re-read at most every interval
    fake.run(0.4, others_cores=2.0, own_cores=0.0)
    assert load.sample() == pytest.approx(2.0 * 0.6 / 0.6)


def test_steps_give_way_while_others_keep_the_cores_busy_and_take_them_back():
    fake = FakeMachine()
    plan = StepThreads(threads=2, one_thread_rows=0, reason="measured", load=fake.load(), cpus=2)
    assert plan.threads_for(32) == 2  # no interval yet: the team
    fake.run(1.0, others_cores=1.0, own_cores=1.5)  # a busy neighbour leaves one core
    assert plan.threads_for(32) == 2  # one reading: it may be a burst that is over already
    fake.run(1.0, others_cores=1.0, own_cores=1.5)  # still there a reading later
    assert plan.threads_for(32) == 1 and plan.yielding == 1
    fake.run(1.0, others_cores=0.4, own_cores=1.0)  # within the hysteresis band: keep giving way
    assert plan.threads_for(1) == 1
    fake.run(1.0, others_cores=0.1, own_cores=1.0)  # the neighbour is gone
    assert plan.threads_for(32) == 2 and not plan.yielding
    fake.run(1.0, others_cores=0.4, own_cores=1.0)  # under half a core busy elsewhere: the team still fits
    assert plan.threads_for(32) == 2
    report = plan.as_dict()
    assert report["follows_cpu_load"] and report["others_busy_cores"] == 0.4 and report["yielded_steps"] == 2


def test_a_burst_of_one_reading_does_not_take_the_team_away():
    """A chat server's burst (32 POSTs, their client, Postgres) is over within a
    reading; giving way for the next one left 32 prompts prefilling on one thread."""
    fake = FakeMachine()
    plan = StepThreads(threads=2, one_thread_rows=0, reason="measured", load=fake.load(), cpus=2)
    plan.threads_for(32)
    for others in (1.5, 0.1, 1.5, 0.1, 1.5):
        fake.run(0.5, others_cores=others, own_cores=1.0)
        assert plan.threads_for(32) == 2
    assert plan.yielded_steps == 0


def test_a_large_team_gives_up_only_the_cores_others_take():
    fake = FakeMachine()
    plan = StepThreads(threads=16, one_thread_rows=0, reason="measured", load=fake.load(), cpus=16)
    plan.threads_for(32)
    fake.run(1.0, others_cores=3.0, own_cores=12.0)
    plan.threads_for(32)
    fake.run(1.0, others_cores=3.0, own_cores=12.0)
    assert plan.threads_for(32) == 13
    fake.run(1.0, others_cores=16.0, own_cores=0.0)
    assert plan.threads_for(32) == 13  # the readings before saw 3 busy: one reading is not enough
    fake.run(1.0, others_cores=16.0, own_cores=0.0)
    assert plan.threads_for(32) == 1  # never none
    fake.run(1.0, others_cores=0.0, own_cores=16.0)
    assert plan.threads_for(32) == 16


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_the_real_reading_sees_a_busy_neighbour():
    load = CpuLoad(interval_s=0.0)
    load.sample()
    ctx = multiprocessing.get_context("spawn")
    neighbour = ctx.Process(target=_spin, args=(1.5,))
    neighbour.start()
    try:
        time.sleep(1.0)  # the interval measured: the neighbour spun for most of it
        others = load.sample()
    finally:
        neighbour.join()
    # Most of one core, whatever else the machine ran, and never this process's own time.
    assert others is not None and 0.5 <= others <= len(os.sched_getaffinity(0)) + 0.1


needs_two_threads = pytest.mark.skipif(torch.get_num_threads() < 2, reason="one CPU thread: nothing to give way")


@needs_two_threads
def test_an_engine_follows_the_load_where_its_bits_allow(make_engine, greedy):
    int4 = make_engine(quantization="int4_weight_only", one_thread_rows=0, follow_cpu_load=True)
    assert int4.step_threads.load is not None
    assert int4.step_threads.as_dict()["follows_cpu_load"] is True
    # A neighbour that takes every core: the engine's steps give way, and the tokens are the same.
    prompts = make_prompts(3, seed=7, min_len=6, max_len=10)
    quiet = [c.token_ids for c in int4.generate(prompts, greedy)]
    fake = FakeMachine()
    int4.step_threads.load = fake.load()
    int4.step_threads.load.sample()
    for _ in range(2):  # two readings in a row: load that lasts
        fake.run(1.0, others_cores=float(int4.step_threads.cpus), own_cores=0.0)
        int4.step_threads.load.sample()
    fake.run(1.0, others_cores=float(int4.step_threads.cpus), own_cores=0.0)
    seen: set[int] = set()
    int4.step_observer = lambda _batch, _duration: seen.add(torch.get_num_threads())
    assert [c.token_ids for c in int4.generate(prompts, greedy)] == quiet
    assert seen == {1}
    # fp32 keeps its count (HF generate's exact tokens); the other formats follow
    # the load by default, and keep their team when told not to.
    assert make_engine(follow_cpu_load=True).step_threads.load is None
    assert make_engine(quantization="int4_weight_only", one_thread_rows=0).step_threads.load is not None
    assert make_engine(quantization="int4_weight_only", one_thread_rows=0,
                       follow_cpu_load=False).step_threads.load is None


class _Busy:
    """A CpuLoad whose readings are given: None (the first), then `others` cores."""

    def __init__(self, others: float):
        self.others, self.readings, self.interval_s, self.others_busy = others, 0, 0.0, None

    def sample(self):
        self.readings += 1
        if self.readings > 1:
            self.others_busy = self.others
        return self.others_busy


@pytest.mark.parametrize("follow", [True, False])
@pytest.mark.parametrize("others, kept", [(0.1, 4), (1.2, 0)])
def test_a_measurement_taken_on_a_busy_machine_is_not_kept(monkeypatch, others, kept, follow):
    """One thread wins the start-up measurement when other processes hold the
    team's cores; fixed, that verdict would outlast the load, so it is not
    kept, whether or not the steps follow the load."""
    from types import SimpleNamespace

    from inference import threads

    monkeypatch.setattr(threads, "CpuLoad", lambda interval_s: _Busy(others))
    monkeypatch.setattr(threads, "thread_invariant", lambda runner: True)
    monkeypatch.setattr(threads, "_choose", lambda runner, rows: StepThreads(
        2, 4, "measured", {1: {"one": 20.0, "team": 30.0}}))
    plan = threads.choose_step_threads(SimpleNamespace(device=torch.device("cpu")), None, follow_cpu_load=follow)
    assert plan.one_thread_rows == kept and (plan.load is not None) == follow
    assert (plan.reason == "measured") if kept else ("cores busy" in plan.reason)


@pytest.mark.parametrize("second, kept", [
    ({1: {"one": 20.0, "team": 30.0}, 2: {"one": 24.0, "team": 20.0}}, 1),  # agrees: one thread keeps 1 row
    ({1: {"one": 20.0, "team": 14.0}}, 0),  # the team wins: the first verdict was a burst of load
])
def test_one_thread_must_win_a_second_measurement(monkeypatch, second, kept):
    """A burst of load during the team's half of the start-up measurement would
    fix one-row steps to one thread for the engine's life: one thread is kept
    only where a second measurement, a moment later, agrees."""
    from types import SimpleNamespace

    from inference import threads

    first = {1: {"one": 20.9, "team": 35.6}, 2: {"one": 25.0, "team": 17.6}}  # the benchmark server's, 20:14
    results = [first, second]
    monkeypatch.setattr(threads, "_measure", lambda runner, count: results.pop(0))
    monkeypatch.setattr(threads, "thread_invariant", lambda runner: True)
    monkeypatch.setattr(threads, "CONFIRM_AFTER_S", 0.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    runner = SimpleNamespace(device=torch.device("cpu"), num_blocks=64, max_model_len=2048, block_size=16)
    plan = threads._choose(runner, None)
    assert not results, "measured twice"
    assert plan.one_thread_rows == kept
    assert plan.reason == ("measured twice" if kept else "measured; a second measurement kept 0 rows of 1 on one thread")


def test_a_team_that_wins_the_first_measurement_is_not_measured_again(monkeypatch):
    from types import SimpleNamespace

    from inference import threads

    results = [{1: {"one": 20.0, "team": 14.0}}]
    monkeypatch.setattr(threads, "_measure", lambda runner, count: results.pop(0))
    monkeypatch.setattr(threads, "thread_invariant", lambda runner: True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    runner = SimpleNamespace(device=torch.device("cpu"), num_blocks=64, max_model_len=2048, block_size=16)
    plan = threads._choose(runner, None)
    assert plan.one_thread_rows == 0 and plan.reason == "measured"


def test_only_the_cores_this_process_may_use_are_read():
    """A container pinned to a few cores of a big host still sees every core
    in /proc/stat: the other cores' load is not this engine's business."""
    from inference.threads import _TICKS_PER_S, _machine_busy_s

    allowed = sorted(os.sched_getaffinity(0))
    outside = max(allowed) + 1
    lines = [b"cpu  999999 0 999999 5 0 0 0 0 0 0"]  # the total: ignored
    lines += [f"cpu{core} 100 0 50 1000 7 3 2 9 0 0".encode() for core in allowed]
    lines += [f"cpu{outside} 800000 0 800000 1 0 0 0 0 0 0".encode(), b"intr 12345", b"ctxt 678"]
    assert _machine_busy_s(b"\n".join(lines)) == pytest.approx(len(allowed) * 155 / _TICKS_PER_S)
    assert _machine_busy_s() > 0  # the real file parses
