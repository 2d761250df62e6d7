"""Scheduler and block manager rules, driven directly (no model)."""
from __future__ import annotations

from inference import EngineConfig, SamplingParams
from inference.block_manager import BlockManager
from inference.scheduler import Scheduler
from inference.sequence import Sequence, SequenceStatus


def setup(num_blocks=8, budget=64, max_seqs=8):
    manager = BlockManager(num_blocks, block_size=4)
    config = EngineConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, block_size=4)
    return manager, Scheduler(config, manager)


def seq(name, tokens, priority=0):
    return Sequence(name, tokens, SamplingParams(max_tokens=8), priority=priority)


def test_lower_priority_value_is_admitted_first():
    _, scheduler = setup(max_seqs=1)
    background, chat = seq("title", [1, 2, 3], priority=10), seq("chat", [4, 5, 6], priority=0)
    scheduler.add(background)
    scheduler.add(chat)
    assert scheduler.schedule().seqs == [chat]


def test_budget_splits_a_long_prompt_into_chunks_after_running_decodes():
    _, scheduler = setup(budget=6)
    first = seq("a", [1, 2, 3])
    scheduler.add(first)
    scheduler.schedule()
    first.num_computed_tokens = 3
    first.token_ids.append(9)  # sampled: now decoding
    scheduler.add(seq("b", list(range(10, 30))))
    batch = scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 5]


def test_out_of_blocks_preempts_the_newest_and_admits_nothing_that_step():
    manager, scheduler = setup(num_blocks=2)
    old, new = seq("old", [1, 2, 3, 4]), seq("new", [5, 6, 7, 8])
    for s in (old, new):
        scheduler.add(s)
    scheduler.schedule()
    for s in (old, new):
        s.num_computed_tokens = 4
        s.token_ids.append(1)  # each now needs a second block; only one of them can have it
    scheduler.add(seq("late", [9]))
    batch = scheduler.schedule()
    assert batch.seqs == [old]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1 and [s.request_id for s in sorted(scheduler.waiting, key=Sequence.sort_key)] == ["new", "late"]


def test_freed_cached_blocks_are_reused_then_evicted_least_recent_first():
    manager = BlockManager(4, block_size=2)
    a = seq("a", [1, 2, 3, 4])
    manager.allocate(a, manager.match_prefix(a), 4)
    a.num_computed_tokens = 4
    manager.register_computed_blocks(a)
    manager.free_sequence(a)
    assert manager.num_free_blocks == 4 and len(manager.cached) == 2
    b = seq("b", [1, 2, 3, 4, 5])
    hits = manager.match_prefix(b)
    assert len(hits) == 2
    manager.allocate(b, hits, 5)
    assert manager.num_free_blocks == 1 and b.block_table[:2] == hits
    manager.free_sequence(b)
    c = seq("c", [7, 7, 7, 7, 7, 7, 7, 7])
    manager.allocate(c, manager.match_prefix(c), 8)  # needs every block: the cache is evicted
    assert manager.num_free_blocks == 0 and not manager.cached


def decoding(scheduler, names: list[str]) -> list[Sequence]:
    """Admit one-token prompts and compute them: each then decodes one token a step."""
    seqs = [seq(name, [1]) for name in names]
    for s in seqs:
        scheduler.add(s)
    scheduler.schedule()
    for s in seqs:
        s.num_computed_tokens = 1
        s.token_ids.append(9)
    return seqs


def computed(batch) -> None:
    """What a step does to the sequences' counts (the engine's runner and sampler)."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(9)


def test_beside_many_decodes_bf16_prompts_take_steps_of_their_own_by_turns():
    manager = BlockManager(64, block_size=4)
    config = EngineConfig(max_num_batched_tokens=64, max_num_seqs=8, block_size=4)
    scheduler = Scheduler(config, manager, prompt_steps_above=2)
    running = decoding(scheduler, ["a", "b", "c"])
    prompt = seq("new", list(range(10, 30)))  # 20 tokens, prefilled in chunks of 8 below
    scheduler.add(prompt)
    scheduler.max_num_batched_tokens = 8
    kinds = []
    for _ in range(6):
        batch = scheduler.schedule()
        has_prompt = any(n > 1 for n in batch.num_new_tokens)
        kinds.append("prompt" if has_prompt else "decode")
        assert not (has_prompt and any(n == 1 for n in batch.num_new_tokens))  # never mixed above the threshold
        computed(batch)
    # By turns while the prompt has tokens left (three chunks), then everyone decodes together.
    assert kinds == ["prompt", "decode", "prompt", "decode", "prompt", "decode"]
    assert prompt.num_computed_tokens == 21 and all(s.num_computed_tokens == 4 for s in running)
    assert [s.request_id for s in scheduler.schedule().seqs] == ["a", "b", "c", "new"]


def test_by_default_a_prompt_beside_one_decoding_sequence_takes_a_step_of_its_own():
    """EngineConfig's default threshold is 0: beside any decoding sequence, the
    prompt's step is the prompt alone, and both decode together in the next."""
    config = EngineConfig(max_num_batched_tokens=64, block_size=4)
    scheduler = Scheduler(config, BlockManager(64, block_size=4), prompt_steps_above=config.prompt_steps_above)
    decoding(scheduler, ["a"])
    scheduler.add(seq("new", list(range(10, 20))))
    first = scheduler.schedule()
    assert [s.request_id for s in first.seqs] == ["new"] and first.num_new_tokens == [10]
    computed(first)
    second = scheduler.schedule()
    assert [s.request_id for s in second.seqs] == ["a", "new"] and second.num_new_tokens == [1, 1]


def test_up_to_the_threshold_and_without_it_steps_mix_as_before():
    for threshold, running_names in ((3, ["a", "b", "c"]), (None, ["a", "b", "c", "d", "e"])):
        manager = BlockManager(64, block_size=4)
        scheduler = Scheduler(EngineConfig(max_num_batched_tokens=64, block_size=4), manager,
                              prompt_steps_above=threshold)
        decoding(scheduler, running_names)
        scheduler.add(seq("new", list(range(10, 20))))
        batch = scheduler.schedule()
        assert batch.num_new_tokens == [1] * len(running_names) + [10]


def test_a_prompt_that_cannot_be_seated_does_not_stall_the_decodes():
    manager = BlockManager(64, block_size=4)
    scheduler = Scheduler(EngineConfig(max_num_batched_tokens=64, max_num_seqs=3, block_size=4), manager,
                          prompt_steps_above=2)
    decoding(scheduler, ["a", "b", "c"])
    scheduler.add(seq("new", list(range(10, 20))))  # every seat taken
    for _ in range(3):
        batch = scheduler.schedule()
        assert batch.num_new_tokens == [1, 1, 1]
        computed(batch)
