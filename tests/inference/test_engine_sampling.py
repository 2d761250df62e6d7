"""Sampling: seeds, filters, penalties, stop tokens, logprobs."""
from __future__ import annotations

import pytest

from inference import SamplingParams

from .conftest import make_prompts

pytestmark = pytest.mark.timeout(120)


def sampled(seed, **extra):
    return SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=40, seed=seed, ignore_eos=True, **extra)


def test_same_seed_same_output_at_batch_1_and_batch_8(make_engine):
    prompts = make_prompts(8, seed=51)
    engine = make_engine()
    alone = engine.generate([prompts[0]], sampled(42))[0].token_ids
    batch = engine.generate(prompts, [sampled(42)] + [sampled(100 + i) for i in range(7)])
    assert batch[0].token_ids == alone
    other_seed = engine.generate([prompts[0]], sampled(43))[0].token_ids
    assert other_seed != alone


def test_top_k_1_is_greedy(make_engine, prompts, expected):
    engine = make_engine()
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=1, seed=1)
    assert [c.token_ids for c in engine.generate(prompts[:4], params)] == expected[:4]


def test_stop_token_ids_end_the_output(make_engine, prompts, expected):
    engine = make_engine()
    stop_at = expected[0][4]
    position = expected[0].index(stop_at)
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_at])
    completion = engine.generate([prompts[0]], params)[0]
    assert completion.token_ids == expected[0][:position + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_at


def test_logprobs_report_the_chosen_token_and_the_top_n(make_engine, prompts, expected):
    engine = make_engine()
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=3)
    completion = engine.generate([prompts[1]], params)[0]
    assert completion.token_ids == expected[1]
    assert len(completion.logprobs) == len(completion.token_ids)
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert entry.token_id == token and entry.logprob <= 0
        assert len(entry.top) == 3 and max(entry.top, key=entry.top.get) == token


def test_penalties_discourage_repeats(make_engine):
    engine = make_engine()
    prompt = [7] * 30
    plain = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    penalized = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                         repetition_penalty=2.0, presence_penalty=2.0))[0]
    assert len(set(penalized.token_ids)) >= len(set(plain.token_ids))
    assert 7 not in penalized.token_ids or penalized.token_ids.count(7) <= plain.token_ids.count(7)


def test_greedy_rows_beside_sampled_ones_keep_hf_greedy_tokens(make_engine, prompts, expected):
    # A step whose rows mix greedy and sampled requests picks the greedy rows'
    # tokens in one argmax over just those rows: each must get its own.
    engine = make_engine()
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    params = [greedy if i % 2 else sampled(200 + i) for i in range(6)]
    batch = engine.generate(prompts[:6], params)
    assert [batch[i].token_ids for i in (1, 3, 5)] == [expected[i] for i in (1, 3, 5)]
    assert batch[0].token_ids == engine.generate([prompts[0]], sampled(200))[0].token_ids
