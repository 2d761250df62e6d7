"""Streams, cancellation, back-pressure and errors through submit/abort."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from inference import DeltaEvent, EngineSaturated, FinishEvent, PromptTooLong, SamplingParams
from inference.outputs import RequestMetrics, TokenLogprob, Usage
from tests.waiting import eventually

from .conftest import make_prompts

pytestmark = pytest.mark.timeout(120)


async def test_aborting_10_of_40_streams_leaves_the_others_exact(make_engine):
    prompts = make_prompts(40, seed=41, max_len=60)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine = make_engine(max_num_seqs=40)
    expected = [c.token_ids for c in engine.generate(prompts, params)]
    doomed = set(range(0, 40, 4))

    async def stream(index):
        handle = engine.submit(prompts[index], params, request_id=f"s{index}")
        tokens, final = [], None
        async for event in handle:
            if event.finished:
                final = event
                break
            # A reader that falls behind takes the queued tokens as one event:
            # abort once, at the first event that brings it to 3 or more.
            aborting = index in doomed and len(tokens) < 3
            tokens.extend(event.token_ids)
            if aborting and len(tokens) >= 3:
                engine.abort(handle.request_id)
        return tokens, final

    results = await asyncio.gather(*(stream(i) for i in range(40)))
    for index, (tokens, final) in enumerate(results):
        if index in doomed:
            assert final.finish_reason == "abort"
            assert 3 <= len(tokens) < 30
            assert final.usage.completion_tokens == len(tokens)
        else:
            assert final.finish_reason == "length"
            assert tokens == expected[index]
    # The engine thread frees the blocks right after it sends the last event.
    await eventually(lambda: engine.stats()["kv_blocks_used"] == 0)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    # Every finished request let go of its id: each can be submitted again.
    one = SamplingParams(max_tokens=1, temperature=0.0)
    again = [engine.submit(prompts[i], one, request_id=f"s{i}") for i in range(40)]
    assert all([(await handle.aresult()).finish_reason == "length" for handle in again])


def test_full_waiting_queue_raises_engine_saturated(make_engine):
    engine = make_engine(max_num_seqs=1, max_waiting=3)
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    handles = []
    with pytest.raises(EngineSaturated):
        for index in range(10):
            handles.append(engine.submit([5, 6, 7], params, request_id=f"q{index}"))
    assert 3 <= len(handles) <= 4  # three waiting, plus one if the engine admitted it already
    for handle in handles:
        handle.abort()
    for handle in handles:
        assert handle.result(timeout_s=30).finish_reason == "abort"
    assert engine.stats()["kv_blocks_used"] == 0


def test_prompt_longer_than_context_raises_prompt_too_long(make_engine):
    engine = make_engine(kv_cache_bytes=4 * 12288)  # 4 blocks: a 64-token context
    assert engine.max_model_len == 64
    with pytest.raises(PromptTooLong):
        engine.submit(list(range(3, 67)), SamplingParams(max_tokens=1))
    completion = engine.generate([list(range(3, 60))], SamplingParams(max_tokens=50, temperature=0))[0]
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == 64 - 57  # stopped by the context, never hung


@pytest.mark.parametrize("bad", [
    {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": 0}, {"top_k": -1},
    {"repetition_penalty": 0.0}, {"presence_penalty": 3.0}, {"logprobs": 50}, {"stop": [3]},
])
def test_bad_sampling_params_raise_value_error(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_bad_prompts_raise_value_error(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit("text needs a tokenizer", SamplingParams())


def test_sync_callers_iterate_from_a_plain_thread(make_engine, prompts, expected, greedy):
    engine = make_engine()
    results = {}

    def worker(index):
        handle = engine.submit(prompts[index], greedy)
        events = list(handle.iter_sync(timeout_s=30))
        assert isinstance(events[-1], FinishEvent) and all(isinstance(e, DeltaEvent) for e in events[:-1])
        results[index] = [t for e in events[:-1] for t in e.token_ids]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [results[i] for i in range(4)] == expected[:4]


async def test_handle_submitted_from_sync_code_streams_async(make_engine, prompts, expected, greedy):
    engine = make_engine()
    handle = await asyncio.to_thread(engine.submit, prompts[0], greedy)  # no loop in that thread
    completion = await handle.aresult()
    assert completion.token_ids == expected[0]
    assert completion.metrics.ttft_s is not None and completion.metrics.queue_time_s is not None


def test_metrics_per_request_and_engine(make_engine, prompts, greedy):
    engine = make_engine()
    completion = engine.generate(prompts[:1], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    metrics = completion.metrics
    assert len(metrics.inter_token_latencies_s) == 9
    assert metrics.prefill_tokens == len(prompts[0]) and metrics.decode_tokens == 9
    assert 0 <= metrics.queue_time_s <= metrics.ttft_s <= metrics.e2e_latency_s
    stats = engine.stats()
    for key in ("running", "waiting", "kv_blocks_used", "kv_blocks_free", "kv_blocks_total",
                "prefix_cache_hit_rate", "preemptions", "steps_per_s", "model", "device", "dtype"):
        assert key in stats
    assert stats["steps"] >= 10 and stats["requests_finished"] == 1


def test_duplicate_live_request_id_is_rejected(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    handle = engine.submit([4, 5, 6], params, request_id="same")
    with pytest.raises(ValueError, match="already in use"):
        engine.submit([4, 5, 6], params, request_id="same")
    engine.abort("same")
    engine.abort("unknown-id")  # a no-op
    assert handle.result(timeout_s=30).finish_reason == "abort"


def test_shutdown_ends_live_requests_with_abort(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
    handles = [engine.submit([4, 5, 6 + i], params) for i in range(3)]
    engine.shutdown()
    assert all(h.result(timeout_s=30).finish_reason == "abort" for h in handles)
    with pytest.raises(RuntimeError):
        engine.submit([4, 5], params)


@contextlib.contextmanager
def engine_wake_ups():
    """The running loop's wake-ups sent from the engine's thread, as a list
    that fills while the block runs."""
    loop = asyncio.get_running_loop()
    wakes = []
    real = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        if threading.current_thread().name.startswith("engine-"):
            wakes.append(callback)
        return real(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting
    try:
        yield wakes
    finally:
        del loop.call_soon_threadsafe


async def test_streams_decoding_together_wake_their_loop_once_per_step(make_engine):
    """16 sequences in a batch cost the event loop one wake-up per engine step,
    not one per token (each is a self-pipe write and a loop wake-up that
    competes with the engine's threads for the CPU)."""
    prompts = make_prompts(16, seed=7, max_len=20)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = make_engine(max_num_seqs=16)
    with engine_wake_ups() as wakes:
        handles = [engine.submit(p, params) for p in prompts]
        results = await asyncio.gather(*(h.aresult() for h in handles))
    assert all(len(r.token_ids) == 12 for r in results)
    tokens = sum(len(r.token_ids) for r in results)
    steps = engine.stats()["steps"]
    assert tokens == 16 * 12
    assert 0 < len(wakes) <= steps + 1 < tokens


# ------------------------------------------------------------ paced wake-ups

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingLoop:
    """Stands for an event loop: records the wake-ups the engine thread sends it."""

    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, callback, *args):
        self.calls.append(args[0] if args else None)
        callback(*args)


def _handles(wake_list, loop, n):
    from inference.handle import RequestHandle

    return [RequestHandle(f"r{i}", [1], loop, wake_list, abort=lambda _: None) for i in range(n)]


def _delta(handle, text="x"):
    handle.deliver(DeltaEvent(request_id=handle.request_id, token_ids=(7,), text=text))


def test_paced_wake_ups_hold_only_more_text_and_scale_with_the_streams():
    from inference.handle import WakeList

    clock = FakeClock()
    loop = RecordingLoop()
    # 10 ms a stream with news, at most 80 ms.
    wake_list = WakeList(per_stream_s=0.010, max_s=0.080, clock=clock)
    handles = _handles(wake_list, loop, 4)

    for handle in handles:  # every stream's first text: woken at once
        _delta(handle)
    wake_list.wake_all()
    assert len(loop.calls) == 1 and len(loop.calls[0]) == 4

    for handle in handles:  # more text of 4 streams: held for 40 ms
        _delta(handle)
    clock.now += 0.039
    wake_list.wake_all()
    assert len(loop.calls) == 1 and wake_list.pending == 4
    clock.now += 0.002
    wake_list.wake_all()
    assert len(loop.calls) == 2 and wake_list.pending == 0

    for handle in handles:  # held unless the interval is over by the end of the next step
        _delta(handle)
    clock.now += 0.025
    wake_list.wake_all(next_step_s=0.010)
    assert len(loop.calls) == 2
    wake_list.wake_all(next_step_s=0.016)
    assert len(loop.calls) == 3
    loop.calls.pop()

    _delta(handles[0])  # one stream alone: held 10 ms
    clock.now += 0.011
    wake_list.wake_all()
    assert len(loop.calls) == 3

    _delta(handles[1])  # an end is never held, nor what was held beside it
    handles[2].deliver(FinishEvent("r2", "stop", Usage(completion_tokens=3), RequestMetrics()))
    wake_list.wake_all()
    assert len(loop.calls) == 4 and len(loop.calls[-1]) == 2

    more = _handles(wake_list, loop, 12)  # 12 streams: the cap, 80 ms, not 120
    for handle in more:
        _delta(handle, "")  # no text yet: nothing to hold back either
    wake_list.wake_all()
    assert len(loop.calls) == 5
    for handle in more:
        _delta(handle, "y")  # their first text
    wake_list.wake_all()
    assert len(loop.calls) == 6
    for handle in more:
        _delta(handle)
    clock.now += 0.081
    wake_list.wake_all()
    assert len(loop.calls) == 7

    _delta(handles[3])  # held, until the engine has nothing else to do
    wake_list.wake_all()
    assert len(loop.calls) == 7
    wake_list.wake_all(force=True)
    assert len(loop.calls) == 8


def test_unpaced_wake_ups_follow_every_step():
    from inference.handle import WakeList

    loop = RecordingLoop()
    wake_list = WakeList(clock=FakeClock())
    (handle,) = _handles(wake_list, loop, 1)
    for _ in range(3):
        _delta(handle)
        wake_list.wake_all()
    assert len(loop.calls) == 3


async def test_a_reader_takes_the_deltas_queued_behind_each_other_as_one():
    from inference.handle import RequestHandle, WakeList

    wake_list = WakeList()
    handle = RequestHandle("r", [1], asyncio.get_running_loop(), wake_list, abort=lambda _: None)
    lp = [TokenLogprob(token_id=t, logprob=-0.5, top={t: -0.5}) for t in (5, 6, 7)]
    handle.deliver(DeltaEvent(request_id="r", token_ids=(5,), text="a", logprobs=(lp[0],)))
    handle.deliver(DeltaEvent(request_id="r", token_ids=(6,), text="", logprobs=(lp[1],)))
    handle.deliver(DeltaEvent(request_id="r", token_ids=(7,), text="bc", logprobs=(lp[2],)))
    handle.deliver(FinishEvent("r", "length", Usage(prompt_tokens=1, completion_tokens=3), RequestMetrics()))
    events = [event async for event in handle]
    assert [type(e) for e in events] == [DeltaEvent, FinishEvent]
    assert events[0].token_ids == (5, 6, 7) and events[0].text == "abc" and events[0].logprobs == tuple(lp)
    assert events[1].finish_reason == "length"


async def test_paced_streams_match_unpaced_ones_with_fewer_wake_ups(make_engine):
    """With pacing, the readers of 16 streams are woken for their first text,
    for their ends, and otherwise at most once a second here: the same tokens
    and text reach them, in fewer and larger events."""
    prompts = make_prompts(16, seed=9, max_len=20)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def run(**config):
        engine = make_engine(max_num_seqs=16, **config)

        async def read(handle):
            deltas, text, ids = 0, [], []
            async for event in handle:
                if not event.finished:
                    deltas += 1
                    text.append(event.text)
                    ids.extend(event.token_ids)
            return deltas, "".join(text), ids

        with engine_wake_ups() as wakes:
            handles = [engine.submit(p, params) for p in prompts]
            results = await asyncio.gather(*(read(h) for h in handles))
        stats = engine.stats()
        assert stats["stream_wakes"] > 0 and stats["stream_pace_ms"] == config.get("stream_pace_ms", 0.0)
        return results, len(wakes), stats["steps"]

    plain, plain_wakes, _ = await run()
    paced, paced_wakes, steps = await run(stream_pace_ms=1000.0)
    assert [r[1:] for r in paced] == [r[1:] for r in plain]
    assert all(len(ids) == 24 for _, _, ids in paced)
    assert sum(r[0] for r in paced) < sum(r[0] for r in plain)
    assert paced_wakes < plain_wakes and paced_wakes < steps


def test_stream_pace_is_bounded():
    from inference import EngineConfig

    assert EngineConfig(stream_pace_ms=250.0).stream_pace_ms == 250.0
    for bad in (-1.0, 1000.5):
        with pytest.raises(ValueError, match="stream_pace_ms"):
            EngineConfig(stream_pace_ms=bad)
