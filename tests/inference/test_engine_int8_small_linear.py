"""int8 weights in small_linear ("int8_weight_only" in fp32, on AVX-512): the
op multiplies fp32 rows by int8 weights and their column scales packed for
its loop (each row's bits the same alone, among any number of others and on
any thread count: test_engine_small_linear, with the bf16 copies'); the
engine runs every step through it, frees the loaded float weights and
oneDNN's int8 copies, and one stream's output is HF's on the dequantized
weights. Batched equals alone and Stop are
in test_engine_formats with the other formats."""
from __future__ import annotations

import copy
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

from inference import Engine, EngineConfig, SamplingParams, formats, kernels, packing
from inference.quantization import quantize_weight

from .conftest import chosen_logprobs, make_prompts, one_stream_on, tiny_llama

needs_kernel = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine")
needs_avx512 = pytest.mark.skipif(not kernels._has_avx512(), reason="small_linear packs int8 weights on AVX-512 only")
pytestmark = [needs_kernel, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def small_linear():
    # A compiler present and the library not built is a failure, not a skip.
    assert kernels.load_kernels(os.environ.get("ENGINE_KERNEL_DIR"))
    return torch.ops.chatapp.small_linear


def int8_weight(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(out_features, in_features, generator=generator) * 0.05)


@needs_avx512
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32, 47, 64, 65, 200])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
# Whole tiles of eight, six or three 16-column blocks and short last ones; SmolLM2's down_proj.
@pytest.mark.parametrize("out_features,in_features", [(96, 80), (208, 96), (576, 1536)])
def test_int8_weights_are_multiplied_widened_and_scaled_in_fp32(small_linear, rows, with_bias, out_features,
                                                                in_features):
    codes, scale = int8_weight(out_features, in_features, rows * 13 + in_features)
    generator = torch.Generator().manual_seed(rows)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(rows, in_features, generator=generator)
    got = small_linear(x, kernels.pack_small_int8(codes, scale), bias)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # The int8 values times their fp32 scale exactly, summed in fp32: within
    # fp32 rounding of the exact sum, which grows with the row length.
    dequantized = codes.double() * scale.double()[:, None]
    exact = F.linear(x.double(), dequantized, None if bias is None else bias.double())
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=2e-6 * max(1.0, (in_features / 96) ** 0.5))


@needs_avx512
def test_int8_packing_and_the_op_reject_what_they_cannot_take(small_linear):
    codes, scale = int8_weight(32, 64, 1)
    packed = kernels.pack_small_int8(codes, scale)
    # Two blocks of 16 columns, 16 lines of four k and one of scales, 64 bytes each.
    assert packed.shape == (2, 17, 64) and packed.dtype == torch.int8
    assert torch.equal(packed[:, 16].contiguous().view(torch.float32).reshape(-1), scale)
    for bad in (codes[:24], codes[:, :62], codes.float()):
        with pytest.raises(ValueError, match="cannot pack"):
            kernels.pack_small_int8(bad, scale[:bad.size(0)])
    with pytest.raises(ValueError, match="cannot pack"):
        kernels.pack_small_int8(codes, scale[:16])
    with pytest.raises(RuntimeError, match="packed int8 weight"):
        small_linear(torch.randn(2, 60), packed, None)
    with pytest.raises(RuntimeError, match="bias"):
        small_linear(torch.randn(2, 64), packed, torch.randn(31))
    with pytest.raises(RuntimeError, match="fp32 x expected"):
        small_linear(torch.randn(2, 64).bfloat16(), packed, None)


def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """The model as "int8_weight_only" holds it: each matmul weight (lm_head
    included) int8 with a bf16 scale per output row (what oneDNN's kernel takes)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie the embedding
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                codes, scale = quantize_weight(module.weight)
                module.weight.copy_(codes.float() * scale.bfloat16().float()[:, None])
    return model


def _engine(model, **settings) -> Engine:
    config = {"kv_cache_bytes": 2**20, "max_num_batched_tokens": 128, "quantization": "int8_weight_only",
              **settings}
    return Engine(model, None, EngineConfig(**config))


@needs_avx512
def test_one_stream_is_hf_on_the_dequantized_weights(small_linear, reference_model):
    """Prompts of up to 30 tokens and one decoding row: every step is in small_linear."""
    prompts = make_prompts(4, seed=13, max_len=30)
    reference = dequantized(reference_model)
    with _engine(tiny_llama) as engine:
        net = engine.runner.net
        assert engine.stats()["small_linear_rows"] == "all" and engine.stats()["quantization"] == "int8_weight_only"
        assert all(w.dtype == torch.int8 and w.dim() == 3 for layer in net.small_weights for w in layer)
        assert net.lm_head_small.dtype == torch.int8 and net.lm_head_small.dim() == 3
        # The loaded fp32 layer weights go: the stack runs on int8 copies alone.
        layer_bytes = sum(p.numel() * 4 for name, p in reference_model.named_parameters() if "proj" in name)
        assert engine.released_weight_bytes == layer_bytes
        # fp32 activations: the dequantized model's log-probabilities to fp32
        # rounding (oneDNN's kernel, which rounds activations to bf16, would miss).
        one_stream_on(reference, reference_model, engine, prompts)


@needs_avx512
@pytest.mark.parametrize("rows", [None, 4])
def test_every_step_runs_in_it_and_batched_equals_alone(small_linear, reference_model, monkeypatch, rows):
    """oneDNN's int8 kernel rounds the activations to bf16: a step of many rows
    there would give a sequence other tokens batched than alone. So every
    step runs in small_linear, whatever small_linear_rows says (but 0), and
    oneDNN's copies are freed."""
    prompts = make_prompts(6, seed=17, max_len=60)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    with _engine(copy.deepcopy(reference_model), small_linear_rows=rows, script_layers=False) as engine:
        assert engine.stats()["small_linear_rows"] == "all"
        net = engine.runner.net
        assert all(w[slot].untyped_storage().nbytes() <= 1 for w in net.weights for slot in (1, 2, 4, 5))
        seen = []
        real = torch.ops.chatapp.small_linear

        def counted(x, weight, bias):
            seen.append(x.size(0))
            return real(x, weight, bias)

        monkeypatch.setattr(torch.ops.chatapp, "small_linear", counted)
        monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", None)  # never called
        batched = [c.token_ids for c in engine.generate(prompts, greedy)]
        assert max(seen) > kernels.SMALL_LINEAR_MAX_ROWS_PACKED  # prompt steps of more rows than one call takes
        alone = [engine.generate([p], greedy)[0].token_ids for p in prompts]
    assert batched == alone


def test_other_formats_and_cpus_keep_int8_out_of_small_linear(small_linear, monkeypatch):
    with _engine(tiny_llama(), dtype="bfloat16") as engine:
        assert engine.stats()["small_linear_rows"] == 0
    with _engine(tiny_llama(), small_linear_rows=0) as engine:
        assert engine.stats()["small_linear_rows"] == 0 and engine.runner.net.small_weights == []
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "flags\t: fpu avx2 fma")
    assert not kernels.can_pack_small_int8(torch.zeros(16, 16, dtype=torch.int8))
    with _engine(tiny_llama) as engine:  # no AVX-512: oneDNN's kernel at every row count
        assert engine.stats()["small_linear_rows"] == 0 and engine.released_weight_bytes > 0


@needs_avx512
@pytest.mark.skipif(not packing.ONEDNN_PACKING, reason="no oneDNN linear in this torch")
def test_prompts_in_bf16_over_the_dequantized_weights(small_linear, reference_model):
    """EngineConfig.bf16_prompts under int8 weights: prompt rows multiply the
    int8 weights times their scales rounded to bf16, in oneDNN's bf16 blocks;
    generated rows keep fp32 activations over the int8 weights; a step mixing
    both splits its rows, so batched still equals alone."""
    prompts = make_prompts(6, seed=41, min_len=20, max_len=90)
    # Steps that mix prompts and decodes only where configured so (EngineConfig.prompt_steps_above; the default: never).
    with _engine(copy.deepcopy(reference_model), bf16_prompts=True, max_num_batched_tokens=40,
                 prompt_steps_above=8) as engine:
        net = engine.runner.net
        assert engine.stats()["bf16_prompts"] is True and net.half_block == 64
        assert engine.stats()["small_linear_rows"] == "all"
        done = [engine.generate([p], SamplingParams(max_tokens=12, temperature=0.0, logprobs=0))[0] for p in prompts]
        mixed = []
        engine.step_observer = lambda batch, _duration: mixed.append(
            len(set(batch.num_new_tokens)) > 1 and 1 in batch.num_new_tokens)
        batched = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    assert any(mixed) and [c.token_ids for c in batched] == [c.token_ids for c in done]
    # The prompt's rounding shows in the logprobs: closer to a reference that
    # rounds the prompt rows' matmuls to bf16 than to the int8 weights alone.
    reference = dequantized(reference_model)

    def rounding_prompt_rows(prompt_len: int | None):
        def hook(module, args, output):
            if prompt_len is None or module is reference.lm_head:
                return output
            x, weight = args[0], module.weight
            output[:, :prompt_len] = F.linear(x[:, :prompt_len].bfloat16().float(),
                                              weight.bfloat16().float()).bfloat16().float()
            return output
        return [m.register_forward_hook(hook) for m in reference.modules() if isinstance(m, torch.nn.Linear)]

    as_run, weights_only = [], []
    for prompt, completion in zip(prompts, done):
        got = torch.tensor([lp.logprob for lp in completion.logprobs])
        for prompt_len, errors in ((len(prompt), as_run), (None, weights_only)):
            handles = rounding_prompt_rows(prompt_len)
            try:
                errors.append((got - chosen_logprobs(reference, prompt, completion.token_ids)).abs().max().item())
            finally:
                for handle in handles:
                    handle.remove()
    assert statistics.median(as_run) < statistics.median(weights_only) / 4, (as_run, weights_only)


def _fake_timings(monkeypatch, int8_streamed: float, int8_at_32: float, prompt_us: dict | None = None):
    """bf16 weights twice fp32's speed at one row; int8 weights as given (us)."""
    def timed(shapes, dtypes, **_kwargs):
        at_32 = {"bfloat16": 200.0, "int8_weight_only": int8_at_32}
        return {name: {1: 100.0, 32: at_32.get(name, 100.0)} for name in dtypes}
    monkeypatch.setattr(formats, "time_matmuls", timed)
    monkeypatch.setattr(formats, "time_streamed_one_row", lambda shapes: {
        "float32": 100.0, "bf16_weight_only": 50.0, "int8_weight_only": int8_streamed})
    if prompt_us is not None:
        monkeypatch.setattr(formats, "time_prompt_rows", lambda shapes, block, **_: copy.deepcopy(prompt_us))


@needs_avx512
def test_auto_takes_int8_weights_where_one_row_gains_and_batches_keep_up(small_linear, reference_model,
                                                                         monkeypatch):
    _fake_timings(monkeypatch, int8_streamed=25.0, int8_at_32=105.0)
    report = formats.choose_cpu_format(reference_model, small_rows=2)
    assert (report.dtype, report.quantization) == ("float32", "int8_weight_only")
    assert report.quality["int8_weight_only"]["passed"] and "with int8_weight_only" in report.summary()
    # Under the margin over bf16 weights at one row, or a one-row gain (2x) that
    # the loss at 32 rows eats down to under the margin: bf16 weights stay.
    _fake_timings(monkeypatch, int8_streamed=50.0 / formats.MIN_SPEEDUP + 1, int8_at_32=100.0)
    assert formats.choose_cpu_format(reference_model, small_rows=2).quantization == "bf16_weight_only"
    _fake_timings(monkeypatch, int8_streamed=25.0, int8_at_32=200.0 / formats.MIN_SPEEDUP + 1)
    assert formats.choose_cpu_format(reference_model, small_rows=2).quantization == "bf16_weight_only"
    _fake_timings(monkeypatch, int8_streamed=25.0, int8_at_32=200.0 / formats.MIN_SPEEDUP - 1)
    assert formats.choose_cpu_format(reference_model, small_rows=2).quantization == "int8_weight_only"
    # A model whose int8 weights lose too much: not taken.
    _fake_timings(monkeypatch, int8_streamed=25.0, int8_at_32=100.0)
    monkeypatch.setattr(formats, "int8_weight", lambda weight: weight.flip(1))
    report = formats.choose_cpu_format(reference_model, small_rows=2)
    assert report.quantization == "bf16_weight_only" and not report.quality["int8_weight_only"]["passed"]


@needs_avx512
@pytest.mark.skipif(not packing.ONEDNN_PACKING, reason="no oneDNN linear in this torch")
def test_an_auto_engine_runs_int8_weights_and_bf16_prompts_as_chosen(small_linear, monkeypatch):
    _fake_timings(monkeypatch, int8_streamed=25.0, int8_at_32=100.0,
                  prompt_us={"int8_weight_only": {64: 80.0, 256: 200.0}, "bf16_prompts": {64: 40.0, 256: 120.0}})
    monkeypatch.setattr(formats, "cpu_info", lambda _path: ("AMX CPU", {"amx_bf16", "avx512f"}))
    with Engine(tiny_llama, None, EngineConfig(kv_cache_bytes=2**20, max_num_batched_tokens=128,
                                               dtype="auto")) as engine:
        report = engine.format_report
        assert (report.quantization, report.bf16_prompts) == ("int8_weight_only", True)
        assert report.quality["bf16_prompts"]["passed"]
        stats = engine.stats()
        assert (stats["dtype"], stats["quantization"], stats["bf16_prompts"]) == ("float32", "int8_weight_only", True)
        assert stats["small_linear_rows"] == "all" and engine.runner.net.lm_head_small.dtype == torch.int8
        done = engine.generate(make_prompts(3, seed=3), SamplingParams(max_tokens=8, temperature=0.0))
    assert all(len(c.token_ids) > 0 for c in done)


def test_the_int8_prompt_timing_weighs_bf16_blocks_against_int8_in_small_linear(small_linear):
    if not (kernels._has_avx512() and packing.ONEDNN_PACKING):
        pytest.skip("needs AVX-512 and oneDNN")
    from collections import Counter
    times = formats.time_prompt_rows(Counter({(64, 96): 2}), 64, rows=(64,), rounds=2, budget_s=0.01, int8=True)
    assert set(times) == {"int8_weight_only", "bf16_prompts"} and all(us[64] > 0 for us in times.values())
    report = formats.FormatReport("float32", "cpu", [], prompt_us={"int8_weight_only": {64: 90.0},
                                                                    "bf16_prompts": {64: 30.0}})
    assert formats.bf16_prompts_gain(report) == 3.0
