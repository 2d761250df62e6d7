"""Greedy output of the engine equals HF generate run one prompt at a time,
whatever the batching, chunking, preemption or prefix caching."""
from __future__ import annotations

import asyncio
import random

import pytest

from inference import SamplingParams

from .conftest import MAX_NEW_TOKENS, hf_greedy, make_prompts

pytestmark = pytest.mark.timeout(120)


def token_ids(completions):
    return [c.token_ids for c in completions]


def test_generate_matches_hf_one_at_a_time(make_engine, prompts, expected, greedy):
    engine = make_engine()
    completions = engine.generate(prompts, greedy)
    assert token_ids(completions) == expected
    for prompt, completion in zip(prompts, completions):
        assert completion.finish_reason in ("stop", "length")
        assert completion.usage.prompt_tokens == len(prompt)
        assert completion.usage.completion_tokens == len(completion.token_ids)


async def test_staggered_submits_match_hf(make_engine, prompts, expected, greedy):
    engine = make_engine(max_num_seqs=6)
    rng = random.Random(3)

    async def one(index):
        await asyncio.sleep(rng.random() * 0.05)
        handle = engine.submit(prompts[index], greedy, request_id=f"r{index}")
        tokens = []
        async for event in handle:
            tokens.extend(event.token_ids)
        return tokens

    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    assert results == expected


def test_small_kv_cache_forces_preemption_and_outputs_hold(make_engine, prompts, expected, greedy):
    # 12 blocks of 16 tokens: a single long request fits, 16 concurrent ones cannot.
    engine = make_engine(kv_cache_bytes=12 * 12288, max_num_batched_tokens=512)
    assert engine.block_manager.num_blocks == 12
    completions = engine.generate(prompts, greedy)
    assert token_ids(completions) == expected
    assert engine.stats()["preemptions"] > 0
    assert engine.stats()["kv_blocks_used"] == 0


def test_tiny_token_budget_forces_chunked_prefill(make_engine, prompts, expected, greedy):
    engine = make_engine(max_num_batched_tokens=8)
    chunks = []
    engine.step_observer = lambda batch, _duration: chunks.extend(batch.num_new_tokens)
    completions = engine.generate(prompts, greedy)
    assert token_ids(completions) == expected
    assert max(chunks) <= 8 and max(len(p) for p in prompts) > 8


def test_prefix_cache_hits_leave_outputs_unchanged(make_engine, reference_model):
    system = make_prompts(1, seed=11, min_len=50, max_len=50)[0]
    prompts = [system + tail for tail in make_prompts(8, seed=12, min_len=1, max_len=30)]
    expected = [hf_greedy(reference_model, p) for p in prompts]
    engine = make_engine()
    greedy = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)
    first = engine.generate(prompts[:1], greedy)  # warms the cache with the shared prefix
    rest = engine.generate(prompts[1:], greedy)
    assert token_ids(first + rest) == expected
    assert all(c.usage.cached_tokens == 48 for c in rest)  # 3 full blocks of the 50-token prefix
    again = engine.generate(prompts, greedy)  # every prompt now fully cached up to its last block
    assert token_ids(again) == expected
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["prefix_cache_hit_rate"] > 0.3


def test_fully_cached_prompt_still_computes_its_last_position(make_engine, reference_model):
    prompt = make_prompts(1, seed=21, min_len=64, max_len=64)[0]  # exactly 4 blocks
    engine = make_engine()
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    first, second = engine.generate([prompt], greedy), engine.generate([prompt], greedy)
    assert first[0].token_ids == second[0].token_ids == hf_greedy(reference_model, prompt, 8)
    assert second[0].usage.cached_tokens == 48


def test_cache_salt_isolates_tenants(make_engine):
    prompt = make_prompts(1, seed=31, min_len=40, max_len=40)[0]
    engine = make_engine()
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    engine.submit(prompt, greedy, cache_salt="tenant-a").result(timeout_s=30)
    other = engine.submit(prompt, greedy, cache_salt="tenant-b").result(timeout_s=30)
    same = engine.submit(prompt, greedy, cache_salt="tenant-a").result(timeout_s=30)
    assert other.usage.cached_tokens == 0
    assert same.usage.cached_tokens == 32
    assert other.token_ids == same.token_ids


def test_prefix_caching_off_never_hits(make_engine, prompts, expected, greedy):
    engine = make_engine(enable_prefix_caching=False)
    assert token_ids(engine.generate(prompts + prompts, greedy)) == expected + expected
    assert engine.stats()["prefix_cache_hit_tokens"] == 0


def test_ignore_eos_runs_to_max_tokens(make_engine, prompts):
    engine = make_engine()
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    completions = engine.generate(prompts[:4], params)
    assert all(len(c.token_ids) == 40 and c.finish_reason == "length" for c in completions)


def test_the_layer_stack_runs_as_one_torchscript_call(make_engine):
    """The decoder layers must compile to TorchScript: run op by op from Python,
    the engine thread queues for the GIL around every op whenever the web
    server's threads are busy (a 12-token prefill took 0.75 s instead of 0.05 s
    under a burst of new chats). An edit that makes the stack unscriptable
    would silently fall back to that; this catches it."""
    import torch

    engine = make_engine()
    assert isinstance(engine.runner.net.layer_stack, torch.jit.ScriptFunction)
