"""EngineConfig.bf16_prompts: under "bf16_weight_only", the prompt's tokens
multiply in bf16 (oneDNN, in blocks of a fixed row count), generated tokens in
fp32 as before. Its reference is HF's forward with exactly that rounding; a
prompt gets the same bits whole, in chunks or beside other prompts, which is
what keeps batched equal to alone; "auto" takes it only where it is timed
faster and passes the quality check. Batched equals alone and Stop are in
test_engine_formats with the other formats."""
from __future__ import annotations

import contextlib
import copy
import statistics

import pytest
import torch
import torch.nn.functional as F

from inference import Engine, EngineConfig, SamplingParams, formats, kernels
from inference.llama import bf16_block_linear, block_cover, same_bits_blocks
from inference.packing import ONEDNN_PACKING, pack_weight

from .conftest import KERNEL_DIR, make_prompts, tiny_llama

needs_onednn = pytest.mark.skipif(not ONEDNN_PACKING, reason="no oneDNN linear in this torch")
needs_kernel = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine")
pytestmark = [pytest.mark.timeout(300), needs_onednn]


def _engine(model, **settings) -> Engine:
    config = {"kv_cache_bytes": 4 * 2**20, "max_num_batched_tokens": 512, "quantization": "bf16_weight_only",
              "bf16_prompts": True, "kernel_dir": KERNEL_DIR, **settings}
    return Engine(model, None, EngineConfig(**config))


@contextlib.contextmanager
def rounded_as_the_engine(model: torch.nn.Module, prompt_len: int | None):
    """Every nn.Linear as the format computes it: weights rounded to bf16; for
    positions before prompt_len (None: none) the layers' inputs and outputs
    rounded to bf16 too. The lm_head keeps fp32 inputs (the engine's does)."""
    def hook(module, args, _output):
        x, weight = args[0], module.weight.bfloat16().float()
        y = F.linear(x, weight)
        if prompt_len is not None and module is not model.lm_head:
            y[:, :prompt_len] = F.linear(x[:, :prompt_len].bfloat16().float(), weight).bfloat16().float()
        return y

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def teacher_forced(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_a_row_gets_the_same_bits_in_any_block():
    """What the format rests on: with the row count of a call fixed, a row's
    result does not depend on the other rows, its place or the padding. At
    SmolLM2's shapes oneDNN's bf16 GEMM sums a row in another order when the
    call's row count changes (2 to 129 rows on the AMX Xeon): one call over
    all the rows would give a prompt other bits in chunks than whole."""
    torch.manual_seed(0)
    for n_out, n_in in ((3072, 576), (576, 1536)):  # SmolLM2's gate/up and down
        weight = (torch.randn(n_out, n_in) * 0.05).bfloat16()
        packed = pack_weight(weight, "onednn", rows=64)
        x = torch.randn(300, n_in)
        whole = bf16_block_linear(x, packed, None, [64])
        assert whole.dtype == torch.float32 and whole.shape == (300, n_out)
        cuts = (0, 1, 3, 20, 33, 97, 161, 300)
        pieces = torch.cat([bf16_block_linear(x[a:b], packed, None, [64]) for a, b in zip(cuts, cuts[1:])])
        assert torch.equal(pieces, whole)
        shuffled = torch.randperm(300)
        assert torch.equal(bf16_block_linear(x[shuffled], packed, None, [64]), whole[shuffled])
        bias = torch.randn(n_out)
        assert torch.equal(bf16_block_linear(x, packed, bias, [64]), whole + bias)
        # What it computes: bf16 inputs and weights, fp32 sums, rounded to bf16.
        expected = F.linear(x.bfloat16().float(), weight.float())
        assert (whole - expected).abs().max() <= expected.abs().max() * 2**-7


def test_a_block_cover_pads_less_than_the_smallest_block():
    blocks = [256, 128, 64]
    expected = {1: [64], 64: [64], 65: [128], 130: [128, 64], 200: [256], 250: [256], 300: [256, 64],
                512: [256, 256], 700: [256, 256, 128, 64]}
    for n, sizes in expected.items():
        assert block_cover(n, blocks) == sizes, n
    for n in range(1, 600):
        sizes = block_cover(n, blocks)
        assert set(sizes) <= set(blocks) and n <= sum(sizes) < n + 64
    assert block_cover(130, [64]) == [64, 64, 64]


def _summing_differently_at(rows):
    """A linear that sums in another order (other last bits) at these row counts."""
    def linear(x, w, _bias):
        y = F.linear(x.float(), w.float())
        return (y + 1e-3 if x.size(0) in rows else y).bfloat16()
    return linear


def test_larger_blocks_only_where_a_row_keeps_its_bits():
    """same_bits_blocks keeps a larger row count only where every row's
    result equals the one in calls of the base block: a library that sums in
    another order at some count (simulated) loses that count."""
    weight = torch.randn(32, 16).bfloat16()

    assert same_bits_blocks(weight, 16, 64, 256, linear=_summing_differently_at(())) == [256, 128, 64]
    assert same_bits_blocks(weight, 16, 64, 256, linear=_summing_differently_at((256,))) == [128, 64]
    assert same_bits_blocks(weight, 16, 64, 256, linear=_summing_differently_at((128,))) == [256, 64]
    assert same_bits_blocks(weight, 16, 64, 64, linear=_summing_differently_at(())) == [64]


def test_smaller_blocks_only_where_a_row_keeps_its_bits():
    """Down to `smallest`, a smaller row count is kept as a larger one is:
    only where every row gets the bits of calls of the base block. A count
    that does not divide the base block is never tried (its calls would not
    cover the checked rows evenly)."""
    weight = torch.randn(32, 16).bfloat16()

    same = _summing_differently_at(())
    assert same_bits_blocks(weight, 16, 64, 256, 8, linear=same) == [256, 128, 64, 32, 16, 8]
    assert same_bits_blocks(weight, 16, 64, 256, linear=same) == [256, 128, 64]  # no smallest: none smaller
    assert same_bits_blocks(weight, 16, 64, 256, 8, linear=_summing_differently_at((8, 16, 32))) == [256, 128, 64]
    assert same_bits_blocks(weight, 16, 64, 256, 8, linear=_summing_differently_at((16,))) == [256, 128, 64, 32, 8]
    assert same_bits_blocks(weight, 16, 24, 24, 4, linear=same) == [24, 12, 6]
    assert same_bits_blocks(weight, 16, 24, 24, 1, linear=same) == [24, 12, 6, 3]
    with pytest.raises(ValueError, match="bf16_prompt_min_block"):
        EngineConfig(quantization="bf16_weight_only", bf16_prompt_block=64, bf16_prompt_min_block=128)


def test_the_blocks_found_give_the_base_blocks_bits_at_smollm2s_shapes():
    """On this machine's oneDNN: whatever larger calls the check keeps, a row
    gets the bits of calls of 64 rows, for any row count (with one call over
    all of them, qkv's 512 rows differ on the AMX Xeon)."""
    torch.manual_seed(0)
    for n_out, n_in in ((960, 576), (576, 576), (3072, 576), (576, 1536)):  # SmolLM2's four matmuls
        weight = (torch.randn(n_out, n_in) * 0.05).bfloat16()
        packed = pack_weight(weight, "onednn", rows=64)
        blocks = same_bits_blocks(packed, n_in, 64, 512, 8)
        assert 64 in blocks and min(blocks) >= 8 and blocks == sorted(blocks, reverse=True)
        x = torch.randn(700, n_in)
        for n in (1, 5, 12, 27, 63, 130, 200, 300, 513, 700):
            assert torch.equal(bf16_block_linear(x[:n], packed, None, blocks),
                               bf16_block_linear(x[:n], packed, None, [64])), (n_out, n_in, blocks, n)


@needs_kernel
def test_prompt_rows_follow_the_rounded_reference_and_replies_stay_fp32(reference_model):
    prompts = make_prompts(8, seed=5, min_len=20, max_len=90)
    with _engine(copy.deepcopy(reference_model)) as engine:
        assert engine.stats()["bf16_prompts"] is True and engine.runner.net.half_block == 64
        # Calls of 64 rows, and of other counts only where the CPU's library gives them the same bits.
        assert all(64 in blocks and min(blocks) >= 8 for blocks in engine.stats()["bf16_prompt_blocks"])
        assert engine.stats()["prefill_attention"] == "kernel"  # the bits are not HF generate's anyway
        assert engine.scheduler.prompt_steps_above == 0  # EngineConfig.prompt_steps_above's default
        done = [engine.generate([p], SamplingParams(max_tokens=16, temperature=0.0, logprobs=0))[0]
                for p in prompts]
    reference = copy.deepcopy(reference_model)
    as_run, weights_only = [], []
    for prompt, completion in zip(prompts, done):
        got = torch.tensor([lp.logprob for lp in completion.logprobs])
        with rounded_as_the_engine(reference, len(prompt)):
            as_run.append((got - teacher_forced(reference, prompt, completion.token_ids)).abs().max().item())
        with rounded_as_the_engine(reference, None):
            weights_only.append((got - teacher_forced(reference, prompt, completion.token_ids)).abs().max().item())
    # One bf16 rounding that lands the other way (oneDNN sums in another
    # order) moves a prompt by up to ~2e-3; most match to 1e-6. Without the
    # prompt's rounding (bf16 weights alone) every prompt is off by 2e-3 to 1e-2.
    assert statistics.median(as_run) < statistics.median(weights_only) / 4, (as_run, weights_only)


@needs_kernel
def test_a_prompt_gets_the_same_bits_whole_in_chunks_and_from_the_cache(reference_model):
    shared = make_prompts(1, seed=21, min_len=48, max_len=48)[0]
    # Whole, the long one goes in the larger calls (256 + 64 rows, where the
    # start-up check keeps 256), the others in one of 128; in chunks, 64.
    tails = make_prompts(4, seed=22, min_len=5, max_len=40) + make_prompts(1, seed=23, min_len=260, max_len=260)
    prompts = [shared + tail for tail in tails]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0)

    def run(**settings):
        with _engine(copy.deepcopy(reference_model), **settings) as engine:
            completions = [engine.generate([p], params)[0] for p in prompts]
            hits = engine.stats()["prefix_cache_hit_tokens"]
        return [(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in completions], hits

    whole, _ = run(enable_prefix_caching=False)
    chunked, _ = run(enable_prefix_caching=False, max_num_batched_tokens=16)
    cached, hits = run()
    assert hits >= 4 * 48  # the later prompts found the shared blocks
    assert chunked == whole
    # From the cache too, bit for bit: prefill attention runs in place (the
    # library's kernel sums a row's keys in position order however the prompt
    # was cut), where SDPA over the gathered keys would group them otherwise.
    assert cached == whole


@needs_kernel
def test_steps_mixing_prompts_and_replies_split_their_rows(reference_model):
    prompts = make_prompts(6, seed=31, min_len=10, max_len=70)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    # Prompts join the decodes' steps beside up to 8 of them only where configured so (the default: never).
    with _engine(copy.deepcopy(reference_model), max_num_batched_tokens=40, prompt_steps_above=8) as engine:
        mixed = []
        engine.step_observer = lambda batch, _duration: mixed.append(
            len(set(batch.num_new_tokens)) > 1 and 1 in batch.num_new_tokens)
        batched = [c.token_ids for c in engine.generate(prompts, params)]
        engine.step_observer = None
        alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert any(mixed) and batched == alone


def test_settings_it_cannot_keep_are_refused():
    with pytest.raises(ValueError, match="bf16_prompts needs quantization bf16_weight_only or int8_weight_only"):
        EngineConfig(bf16_prompts=True)
    with pytest.raises(ValueError, match="bf16_prompts needs quantization"):
        EngineConfig(bf16_prompts=True, quantization="int8")
    with pytest.raises(ValueError, match="bf16_prompts is for fp32 activations"):
        EngineConfig(bf16_prompts=True, quantization="int8_weight_only", dtype="bfloat16")
    assert EngineConfig(bf16_prompts=True, quantization="int8_weight_only").bf16_prompts
    with pytest.raises(ValueError, match="bf16_prompt_block"):
        EngineConfig(quantization="bf16_weight_only", bf16_prompt_block=0)
    with pytest.raises(ValueError, match="bf16_prompt_max_block"):
        EngineConfig(quantization="bf16_weight_only", bf16_prompt_block=64, bf16_prompt_max_block=32)
    with pytest.raises(ValueError, match="prompt_steps_above"):
        EngineConfig(prompt_steps_above=-1)
    assert EngineConfig(quantization="bf16_weight_only", bf16_prompts=True, dtype="auto").dtype == "float32"


def _fake_timings(monkeypatch, prompt_us: dict):
    """bf16 weights chosen (one row twice as fast); the prompt timings as given."""
    monkeypatch.setattr(formats, "time_matmuls", lambda shapes, dtypes, **_: {
        name: {1: 50.0 if name == "bf16_weight_only" else 100.0, 32: 100.0 if name != "bfloat16" else 200.0}
        for name in dtypes})
    monkeypatch.setattr(formats, "time_streamed_one_row",
                        lambda shapes: {"float32": 100.0, "bf16_weight_only": 50.0})
    monkeypatch.setattr(formats, "time_prompt_rows", lambda shapes, block, **_: copy.deepcopy(prompt_us))


def test_auto_takes_bf16_prompts_where_they_gain_at_every_length(reference_model, monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMX CPU\nflags\t\t: avx512f avx512_bf16 amx_bf16\n")
    _fake_timings(monkeypatch, {"float32": {64: 80.0, 256: 200.0}, "bf16_prompts": {64: 40.0, 256: 120.0}})
    report = formats.choose_cpu_format(reference_model, cpuinfo=cpuinfo, small_rows=2, prompt_block=64)
    assert report.quantization == "bf16_weight_only" and report.bf16_prompts
    assert report.quality["bf16_prompts"]["passed"]
    assert "prompts in bf16" in report.summary() and "bf16_prompts 0.04/0.12" in report.summary()
    # Slower at one length, not asked for, or no native bf16: not taken.
    _fake_timings(monkeypatch, {"float32": {64: 80.0, 256: 200.0}, "bf16_prompts": {64: 75.0, 256: 100.0}})
    assert not formats.choose_cpu_format(reference_model, cpuinfo=cpuinfo, small_rows=2, prompt_block=64).bf16_prompts
    _fake_timings(monkeypatch, {"float32": {64: 80.0, 256: 200.0}, "bf16_prompts": {64: 40.0, 256: 120.0}})
    report = formats.choose_cpu_format(reference_model, cpuinfo=cpuinfo, small_rows=2, prompt_block=0)
    assert not report.bf16_prompts and not report.prompt_us
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: avx2\n")
    report = formats.choose_cpu_format(reference_model, cpuinfo=cpuinfo, small_rows=2, prompt_block=64)
    assert not report.bf16_prompts and "no native support" in report.skipped["bf16_prompts"]


@needs_kernel
def test_an_auto_engine_runs_the_prompts_the_report_chose(monkeypatch):
    _fake_timings(monkeypatch, {"float32": {64: 80.0, 256: 200.0}, "bf16_prompts": {64: 40.0, 256: 120.0}})
    monkeypatch.setattr(formats, "cpu_info", lambda _path: ("AMX CPU", {"amx_bf16"}))
    settings = {"kv_cache_bytes": 2**20, "max_num_batched_tokens": 128, "dtype": "auto", "kernel_dir": KERNEL_DIR}
    with Engine(tiny_llama(), None, EngineConfig(**settings)) as engine:
        assert engine.format_report.bf16_prompts and engine.stats()["bf16_prompts"] is True
        assert len(engine.runner.net.half_weights) == engine.runner.net.num_layers
    # Turned off in the settings: not even timed.
    with Engine(tiny_llama(), None, EngineConfig(**settings, bf16_prompts=False)) as engine:
        assert engine.stats()["quantization"] == "bf16_weight_only" and engine.stats()["bf16_prompts"] is False
        assert engine.stats()["prefill_attention"] == "sdpa"  # fp32 activations keep HF's sums
        assert engine.scheduler.prompt_steps_above is None  # steps mix: no second pass to keep apart
        assert not engine.format_report.prompt_us
