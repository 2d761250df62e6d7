"""A failure that belongs to one request fails that request alone: the other
streams in the step finish with exact outputs, the KV blocks all come back,
and the engine goes on serving. A value that could break a step never gets
past submit."""
from __future__ import annotations

import copy
import math
import threading

import pytest

from inference import Engine, EngineConfig, SamplingParams
from inference.detokenizer import IncrementalDetokenizer

from .conftest import make_prompts

pytestmark = pytest.mark.timeout(120)

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
POISON_AFTER_TOKENS = 3  # the poisoned request fails mid-stream, not at admission


@pytest.fixture(scope="module")
def batch_prompts():
    return make_prompts(6, seed=61, max_len=40)


def greedy(_index):
    return GREEDY


def seeded(index):
    return SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=100 + index, ignore_eos=True)


def run_with_poisoned(engine, prompts, poisoned_params=GREEDY, params_for=greedy):
    """Submit every prompt at once, the one at index 2 as request "poisoned"."""
    handles = [engine.submit(prompt, poisoned_params, request_id="poisoned") if i == 2
               else engine.submit(prompt, params_for(i), request_id=f"ok{i}")
               for i, prompt in enumerate(prompts)]
    return [h.result(timeout_s=60) for h in handles]


def assert_only_the_poisoned_failed(engine, completions, expected, message, params_for=greedy):
    for index, completion in enumerate(completions):
        if index == 2:
            assert completion.finish_reason == "error"
            assert message in completion.error
        else:
            assert completion.finish_reason == "length", completion.error
            assert completion.token_ids == expected[index]
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    # ...and the engine goes on serving, the poisoned prompt included.
    again = engine.generate([completions[2].prompt_token_ids], params_for(2))[0]
    assert again.finish_reason == "length" and again.token_ids == expected[2]


@pytest.mark.parametrize("bad", [
    {"seed": 2**64}, {"seed": 2**63}, {"seed": -1}, {"seed": 1.5}, {"temperature": math.nan},
    {"temperature": math.inf}, {"repetition_penalty": math.nan}, {"max_tokens": math.inf},
    {"stop": ["x"] * 17}, {"stop": "x" * 257}, {"stop": 5}, {"stop_token_ids": list(range(257))},
])
def test_values_that_could_break_a_step_are_refused_at_submit(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_largest_seed_samples(make_engine, batch_prompts):
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=2**63 - 1)
    completion = make_engine().generate(batch_prompts[:1], params)[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 5


@pytest.mark.parametrize("params_for", [greedy, seeded])
def test_a_seed_the_sampler_cannot_take_fails_its_request_alone(make_engine, batch_prompts, params_for):
    """The incident: a seed of 2**64 made the sampler raise, and the step failed
    every stream in it. Validation now refuses it at submit; here it slips in
    anyway (set after validation) to show the step isolates what it breaks.
    The others keep their exact output, seeded draws included: no row is drawn twice."""
    engine = make_engine()
    expected = [c.token_ids for c in engine.generate(batch_prompts, [params_for(i) for i in range(6)])]
    bad = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    bad.seed = 2**64
    completions = run_with_poisoned(engine, batch_prompts, bad, params_for)
    assert_only_the_poisoned_failed(engine, completions, expected, "Overflow", params_for)


def test_a_failing_sampler_call_fails_only_the_request_it_fails_on(make_engine, batch_prompts, monkeypatch):
    engine = make_engine()
    expected = [c.token_ids for c in engine.generate(batch_prompts, GREEDY)]
    real_sample = engine.sampler.sample

    def sample(seqs, logits):
        if any(s.request_id == "poisoned" and s.num_output_tokens >= POISON_AFTER_TOKENS for s in seqs):
            raise RuntimeError("sampler exploded")
        return real_sample(seqs, logits)

    monkeypatch.setattr(engine.sampler, "sample", sample)
    completions = run_with_poisoned(engine, batch_prompts)
    assert completions[2].usage.completion_tokens == POISON_AFTER_TOKENS
    assert_only_the_poisoned_failed(engine, completions, expected, "sampler exploded")


def test_a_failing_detokenizer_fails_only_its_request(make_engine, batch_prompts, monkeypatch):
    engine = make_engine()
    expected = [c.token_ids for c in engine.generate(batch_prompts, GREEDY)]
    poisoned_tail = batch_prompts[2][-6:]  # what the detokenizer keeps of its prompt
    assert all(p[-6:] != poisoned_tail for i, p in enumerate(batch_prompts) if i != 2)
    real_add = IncrementalDetokenizer.add
    seen = []

    def add(self, token_id):
        if self.ids == poisoned_tail:
            seen.append(token_id)
            if len(seen) == POISON_AFTER_TOKENS:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "detokenizer exploded")
        return real_add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    completions = run_with_poisoned(engine, batch_prompts)
    assert completions[2].token_ids == expected[2][:POISON_AFTER_TOKENS - 1]
    assert_only_the_poisoned_failed(engine, completions, expected, "detokenizer exploded")


def test_a_forward_that_fails_on_one_sequence_fails_only_that_one(make_engine, batch_prompts, monkeypatch):
    """A batched forward fails as a whole; the engine reruns it in smaller
    groups to find the sequence it fails on."""
    engine = make_engine()
    expected = [c.token_ids for c in engine.generate(batch_prompts, GREEDY)]
    real_execute = engine.runner.execute
    batch_sizes = []

    def execute(batch):
        batch_sizes.append(len(batch.seqs))
        if any(s.request_id == "poisoned" and s.num_output_tokens >= POISON_AFTER_TOKENS for s in batch.seqs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_execute(batch)

    monkeypatch.setattr(engine.runner, "execute", execute)
    completions = run_with_poisoned(engine, batch_prompts)
    assert completions[2].usage.completion_tokens == POISON_AFTER_TOKENS
    assert_only_the_poisoned_failed(engine, completions, expected, "illegal memory access")
    assert 1 in batch_sizes and max(batch_sizes) == len(batch_prompts)


def test_a_forward_that_fails_for_everyone_fails_them_all_and_the_engine_serves_on(make_engine, batch_prompts,
                                                                                 monkeypatch):
    engine = make_engine()
    real_execute = engine.runner.execute
    broken = [True]

    def execute(batch):
        if broken[0]:
            raise RuntimeError("device lost")
        return real_execute(batch)

    monkeypatch.setattr(engine.runner, "execute", execute)
    completions = engine.generate(batch_prompts, GREEDY)
    assert all(c.finish_reason == "error" and "device lost" in c.error for c in completions)
    assert engine.stats()["kv_blocks_used"] == 0
    broken[0] = False
    assert engine.generate(batch_prompts[:1], GREEDY)[0].finish_reason == "length"


def test_a_dead_engine_loop_fails_its_requests_and_reports_down(make_engine, monkeypatch):
    engine = make_engine()
    handle = engine.submit([5, 6, 7], SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True))
    next(handle.iter_sync(timeout_s=30))  # running

    def has_work():
        raise RuntimeError("scheduler corrupted")

    monkeypatch.setattr(engine.scheduler, "has_work", has_work)
    completion = handle.result(timeout_s=30)
    assert completion.finish_reason == "error" and "scheduler corrupted" in completion.error
    with pytest.raises(RuntimeError, match="down"):
        engine.stats()
    with pytest.raises(RuntimeError, match="down"):
        engine.submit([5, 6], GREEDY)


class CharTokenizer:
    """A token per character (ids are code points)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def stream(text: str, stop: list[str]) -> tuple[str, str | None]:
    detokenizer = IncrementalDetokenizer(CharTokenizer(), [ord(">")], stop)
    shown = []
    for char in text:
        matched = detokenizer.add(ord(char))
        shown.append(detokenizer.release(final=matched is not None))
        if matched is not None:
            return "".join(shown), matched
    return "".join(shown) + detokenizer.release(final=True), None


def test_stop_strings_are_cut_and_near_misses_released():
    assert stream("hello world, bye", ["world", "o, "]) == ("hello ", "world")
    assert stream("say wo-wor-world now", ["world"]) == ("say wo-wor-", "world")
    assert stream("abab abc", ["abc", "xyz"]) == ("abab ", "abc")
    assert stream("no stop here ab", ["abc"]) == ("no stop here ab", None)


class CountingCharTokenizer(CharTokenizer):
    """Records the most token ids it was asked to decode at once."""

    def __init__(self):
        self.widest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.widest = max(self.widest, len(ids))
        return super().decode(ids, skip_special_tokens)


def test_a_tokens_work_does_not_grow_with_the_output():
    """The output is never rescanned or recopied whole: that made every token
    of a long reply slower than the one before (10x at 400,000 characters).
    Counted, not timed: what one token decodes and keeps stays bounded."""
    tokenizer = CountingCharTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer, [62], ["never"])
    for i in range(400_000):
        detokenizer.add(97 + i % 25)  # "a" to "y": never a stop string
        detokenizer.release()
        assert len(detokenizer.pending) < len("never")
    assert tokenizer.widest <= 2


def test_a_long_stop_string_holds_back_at_most_its_own_length():
    """Near misses of a 256-character stop string are held back, then
    released: the text kept (and searched) per token never exceeds the
    longest stop string."""
    stop = ["z" * 256, "yz" * 128]
    detokenizer = IncrementalDetokenizer(CountingCharTokenizer(), [62], stop)
    shown = []
    text = ("z" * 255 + "a" + "yz" * 127 + "b") * 20
    for char in text:
        assert detokenizer.add(ord(char)) is None
        shown.append(detokenizer.release())
        assert len(detokenizer.pending) <= 256
    assert "".join(shown) + detokenizer.release(final=True) == text


def test_the_engine_is_built_on_the_thread_that_runs_its_steps(reference_model):
    """Loading, quantizing and measuring run on the engine thread, so that its
    OpenMP team is the process's only one (inference.engine)."""
    seen: dict[str, threading.Thread] = {}

    def load():
        seen["load"] = threading.current_thread()
        return copy.deepcopy(reference_model)

    engine = Engine(load, None, EngineConfig(kv_cache_bytes=4 * 2**20, quantization="int8_weight_only"))
    try:
        engine.step_observer = lambda _batch, _duration: seen.setdefault("step", threading.current_thread())
        assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0))[0].token_ids
        assert seen["load"] is seen["step"] is not threading.current_thread()
        assert seen["step"].name == f"engine-{engine.model_name}"
    finally:
        engine.shutdown()


def test_a_failing_build_raises_in_the_caller_and_leaves_no_engine_thread():
    def load():
        raise OSError("weights missing")

    before = set(threading.enumerate())
    with pytest.raises(OSError, match="weights missing"):
        Engine(load, None, EngineConfig(kv_cache_bytes=4 * 2**20))
    assert set(threading.enumerate()) <= before
