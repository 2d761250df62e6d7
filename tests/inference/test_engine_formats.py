"""Reduced precision and int8 weights keep the engine's guarantees, each against
its own reference: greedy output batched equals alone, and a stopped request
frees its slot within one step. fp32 stays token-identical to HF generate
(test_engine_greedy). Also how dtype "auto" picks a format on CPU."""
from __future__ import annotations

import pytest
import torch

from inference import EngineConfig, SamplingParams
from inference import formats
from inference.llama import DecodeGroup, _decode_group
from inference.packing import ONEDNN_PACKING
from inference.quantization import (dequantized_int4_linear, dequantized_linear, int4_linear, int8_linear, pack_int4,
                                    quantize_weight, quantize_weight_int4)
from inference.threads import CANDIDATE_ROWS

from .conftest import MAX_NEW_TOKENS, batched_and_alone, stop_frees_its_slot_within_one_step

pytestmark = pytest.mark.timeout(180)

REDUCED = [
    pytest.param({"dtype": "bfloat16"}, id="bf16"),
    pytest.param({"dtype": "float16"}, id="fp16"),
    pytest.param({"quantization": "int8"}, id="int8"),
    pytest.param({"dtype": "bfloat16", "quantization": "int8"}, id="bf16-int8"),
    pytest.param({"quantization": "int8_weight_only"}, id="int8-weight-only"),
    pytest.param({"dtype": "bfloat16", "quantization": "int8_weight_only"}, id="bf16-int8-weight-only"),
    pytest.param({"quantization": "int4_weight_only"}, id="int4-weight-only"),
    pytest.param({"dtype": "bfloat16", "quantization": "int4_weight_only"}, id="bf16-int4-weight-only"),
    pytest.param({"quantization": "bf16_weight_only"}, id="bf16-weights"),
    pytest.param({"quantization": "bf16_weight_only", "bf16_prompts": True}, id="bf16-weights-bf16-prompts",
                 marks=pytest.mark.skipif(not ONEDNN_PACKING, reason="no oneDNN linear in this torch")),
]


@pytest.mark.parametrize("settings", REDUCED)
def test_greedy_batched_equals_alone(make_engine, prompts, greedy, settings):
    batched, alone = batched_and_alone(make_engine(**settings), prompts, greedy)
    assert batched == alone
    assert all(len(tokens) > 0 for tokens in batched)


# The formats whose steps may run on one thread (inference.threads.thread_invariant).
HALF = [
    pytest.param({"dtype": "bfloat16"}, id="bf16"),
    pytest.param({"dtype": "float16"}, id="fp16"),
    pytest.param({"dtype": "bfloat16", "quantization": "int8"}, id="bf16-int8"),
    pytest.param({"dtype": "bfloat16", "quantization": "int8_weight_only"}, id="bf16-int8-weight-only"),
    pytest.param({"dtype": "bfloat16", "quantization": "int4_weight_only"}, id="bf16-int4-weight-only"),
    # fp32 activations around the weight-only kernels (bf16 inside them).
    pytest.param({"quantization": "int8_weight_only"}, id="int8-weight-only"),
    pytest.param({"quantization": "int4_weight_only"}, id="int4-weight-only"),
]

needs_two_threads = pytest.mark.skipif(torch.get_num_threads() < 2, reason="one CPU thread: nothing to compare")


@needs_two_threads
@pytest.mark.parametrize("settings", HALF)
def test_one_thread_steps_give_the_same_bits_as_the_team(make_engine, prompts, settings):
    """Each prompt alone (one sequence: the same step shapes in every run),
    every step on one thread or every step on the team: the same tokens and
    logprobs to the last bit, so a sequence's output does not depend on which
    its steps got. (Batched runs are not compared bit for bit: which requests
    share a step depends on when they arrive.)"""
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, logprobs=0)
    runs = {}
    for rows in (0, 1024):
        engine = make_engine(one_thread_rows=rows, follow_cpu_load=False, **settings)
        threads: set[int] = set()
        engine.step_observer = lambda _batch, _duration: threads.add(torch.get_num_threads())
        runs[rows] = [(c.token_ids, [lp.logprob for lp in c.logprobs])
                      for c in (engine.generate([p], params)[0] for p in prompts[:6])]
        assert threads == ({1} if rows else {engine.step_threads.threads}), threads
    assert runs[0] == runs[1024]


@needs_two_threads
@pytest.mark.parametrize("settings", HALF)
def test_small_steps_run_on_one_thread_and_batched_still_equals_alone(make_engine, prompts, greedy, settings):
    engine = make_engine(one_thread_rows=1, follow_cpu_load=False, **settings)
    seen: list[tuple[int, int]] = []
    engine.step_observer = lambda batch, _duration: seen.append((batch.num_tokens, torch.get_num_threads()))
    batched, alone = batched_and_alone(engine, prompts, greedy)
    assert batched == alone
    assert {threads for rows, threads in seen if rows == 1} == {1}
    assert {threads for rows, threads in seen if rows > 1} == {engine.step_threads.threads} == {torch.get_num_threads()}
    assert engine.stats()["one_thread_rows"] == 1


@needs_two_threads
def test_step_threads_are_measured_for_half_precision_and_fp32_keeps_its_count(make_engine):
    engine = make_engine(dtype="bfloat16")
    plan = engine.step_threads
    assert plan.reason.startswith("measured") and plan.threads == torch.get_num_threads()
    assert 1 in plan.measured_ms and set(plan.measured_ms) <= set(CANDIDATE_ROWS)
    assert all(m["one"] > 0 and m["team"] > 0 for m in plan.measured_ms.values())
    assert plan.one_thread_rows in (0, *plan.measured_ms)
    # The synthetic steps' blocks are handed back clean.
    assert not engine.runner.k_cache.any() and not engine.runner.v_cache.any()
    fp32 = make_engine(one_thread_rows=8)
    assert fp32.step_threads.one_thread_rows == 0 and "fp32" in fp32.step_threads.reason
    with pytest.raises(ValueError, match="one_thread_rows"):
        EngineConfig(one_thread_rows=-1)


@pytest.mark.parametrize("settings", REDUCED)
def test_stopping_a_request_frees_its_slot_within_one_step(make_engine, settings):
    stop_frees_its_slot_within_one_step(make_engine(max_num_seqs=1, **settings))


def test_int8_kernels_agree_with_the_float_matmul():
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(5, 64)
    q, scale = quantize_weight(weight)
    exact = x @ weight.t()
    outputs = {"int8": int8_linear(x, q, scale, None, False), "weight-only": int8_linear(x, q, scale, None, True),
               "dequantized (off the CPU)": dequantized_linear(x, q, scale)}
    for name, out in outputs.items():
        assert out.shape == exact.shape and out.dtype == x.dtype, name
        assert (out - exact).abs().max() < 0.05 * exact.abs().max(), name
    # Per-token activation scales, and the weight-only kernel's per-row sums:
    # a row's result does not depend on its batch.
    for weight_only in (False, True):
        assert torch.equal(int8_linear(x[:1], q, scale, None, weight_only),
                           int8_linear(x, q, scale, None, weight_only)[:1])


def test_int4_weights_round_to_their_group_and_the_kernels_agree():
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(5, 64)
    weight[3, 40] = 30.0  # an outlier coarsens its own group of 32 only
    codes, scales_offsets = quantize_weight_int4(weight)
    assert codes.shape == weight.shape and scales_offsets.shape == (2, 96, 2)
    assert codes.min() >= 0 and codes.max() <= 15
    scale, offset = scales_offsets[..., 0].t(), scales_offsets[..., 1].t()  # [96, groups]
    rebuilt = ((codes.float() - 8).view(96, 2, 32) * scale[..., None] + offset[..., None]).view(96, 64)
    error = (rebuilt - weight).abs().view(96, 2, 32)
    assert (error <= scale[..., None] / 2 + 1e-5).all()  # each weight within half a step of its group
    assert error[3, 1].max() > 0.5 and error[3, 0].max() < 0.2 and error[4].max() < 0.2
    exact = x @ rebuilt.t()
    cpu = int4_linear(x, *pack_int4(codes, scales_offsets, torch.device("cpu")), None)
    off_cpu = dequantized_int4_linear(x, codes.to(torch.uint8), scales_offsets)
    for name, out in {"CPU kernel (bf16 activations)": cpu, "dequantized (off the CPU)": off_cpu}.items():
        assert out.shape == exact.shape and out.dtype == x.dtype, name
        assert (out - exact).abs().max() < 0.02 * exact.abs().max(), name
    # Each row sums on its own: a row's result does not depend on its batch.
    packed = pack_int4(codes, scales_offsets, torch.device("cpu"))
    assert torch.equal(int4_linear(x[:1], *packed, None), int4_linear(x, *packed, None)[:1])
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_weight_int4(torch.randn(8, 48))


def test_quantization_is_validated():
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")
    assert EngineConfig().quantization == "none"


def test_auto_dtype_on_cpu_is_measured_and_reported(make_engine, prompts, greedy):
    engine = make_engine(dtype="auto")
    report = engine.format_report
    assert report is not None and engine.config.dtype == report.dtype
    assert engine.stats()["dtype"] == report.dtype in ("float32", "bfloat16", "float16")
    assert set(report.matmul_us["float32"]) == set(formats.ROWS)
    assert report.as_dict()["dtype"] == report.dtype and report.dtype in report.summary()
    assert all(c.finish_reason in ("stop", "length") for c in engine.generate(prompts[:2], greedy))


def test_none_dtype_stays_fp32_on_cpu_without_measuring(make_engine):
    engine = make_engine()
    assert engine.format_report is None and engine.config.dtype == "float32"


def test_half_formats_are_not_tried_without_native_support(reference_model, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2 avx2 fma\n")
    report = formats.choose_cpu_format(reference_model, cpuinfo=cpuinfo)
    assert report.dtype == "float32" and report.cpu == "Old CPU"
    assert set(report.skipped) == {"bfloat16", "float16"} and list(report.matmul_us) == ["float32"]
    assert report.flags == ["avx2"]


def test_a_half_format_must_beat_fp32_by_the_margin():
    timings = {"float32": {1: 100.0, 32: 100.0}, "bfloat16": {1: 60.0, 32: 60.0}, "float16": {1: 95.0, 32: 95.0}}
    assert formats.candidate_order(timings) == ["bfloat16"]
    timings["float16"] = {1: 40.0, 32: 50.0}
    assert formats.candidate_order(timings) == ["float16", "bfloat16"]


def test_a_half_format_slower_for_one_chat_is_not_chosen():
    """Faster in total but slower at one row (one chat): fp32 stays. These are
    the 2-core Xeon's fp32 and fp16 timings of one start (us a forward)."""
    timings = {"float32": {1: 11960.0, 32: 54220.0}, "float16": {1: 13480.0, 32: 45300.0}}
    assert sum(timings["float32"].values()) >= formats.MIN_SPEEDUP * sum(timings["float16"].values())
    assert formats.candidate_order(timings) == []
    timings["float16"][1] = 11900.0  # no slower at either row count: chosen
    assert formats.candidate_order(timings) == ["float16"]


def test_a_format_with_broken_logits_fails_the_quality_check():
    reference = [torch.randn(6, 32)]
    assert formats.compare_logits(reference, [reference[0].clone()])["passed"]
    broken = reference[0].clone()
    broken[2, 0] = float("nan")
    assert not formats.compare_logits(reference, [broken])["passed"]
    shuffled = reference[0][:, torch.randperm(32)]
    assert not formats.compare_logits(reference, [shuffled])["passed"]


def test_stats_report_the_quantization(make_engine, prompts, greedy):
    engine = make_engine(quantization="int8")
    assert engine.stats()["quantization"] == "int8"
    assert engine.generate(prompts[0], greedy)[0].usage.completion_tokens > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_attention_matches_fp32_sdpa(dtype):
    """A half-precision decode step takes two matmuls instead of SDPA's CPU
    flash kernel (slow in bf16); its heads map to their KV heads as SDPA's GQA
    does, and padded keys are masked out."""
    torch.manual_seed(0)
    kv_heads, heads, dim, block_size, num_blocks = 2, 6, 16, 4, 12
    k_cache, v_cache = torch.randn(2, kv_heads, num_blocks, block_size, dim).unbind(0)
    tables, lens = [[3, 7, 1], [5, 0, 0]], [10, 3]  # the second row is padded with block 0
    width = 3 * block_size
    mask = (torch.arange(width)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    group = DecodeGroup(0, 2, torch.tensor([b for t in tables for b in t]), mask, torch.tensor(lens))
    q = torch.randn(2, heads, dim)
    exact = _decode_group(q, k_cache, v_cache, group, kv_heads, dim ** -0.5, block_size, False)
    half = _decode_group(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), group, kv_heads, dim ** -0.5, block_size,
                         False)
    assert half.dtype == dtype and half.shape == exact.shape == (2, heads, dim)
    assert (half.float() - exact).abs().max() < 0.05
    # The padded row is the same as that row alone with no padding.
    alone = DecodeGroup(0, 1, torch.tensor([5]), (torch.arange(block_size) < lens[1]).view(1, 1, 1, block_size),
                        torch.tensor(lens[1:]))
    alone_out = _decode_group(q[1:].to(dtype), k_cache.to(dtype), v_cache.to(dtype), alone, kv_heads, dim ** -0.5,
                              block_size, False)
    assert (alone_out.float() - half[1:].float()).abs().max() < 0.02
