"""quantization "bf16_weight_only": every matmul weight rounded to bf16, fp32
activations and sums. Its reference is HF generate on the same model with
those weights rounded (the format's only loss); one stream's steps read the
bf16 copies in small_linear, the loaded fp32 weights are freed, and settings
that cannot hold are refused. Batched equals alone and Stop are in
test_engine_formats with the other formats."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from inference import Engine, EngineConfig, SamplingParams, formats, kernels, packing

from .conftest import hf_greedy, make_prompts, one_stream_on, tiny_llama

needs_kernel = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine")
pytestmark = pytest.mark.timeout(300)


def rounded(model: torch.nn.Module) -> torch.nn.Module:
    """The model as the format sees it: each nn.Linear weight rounded to bf16 and widened back."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.bfloat16().float())
    return model


def _engine(model, **settings) -> Engine:
    return Engine(model, None, EngineConfig(kv_cache_bytes=2**20, max_num_batched_tokens=128,
                                            quantization="bf16_weight_only", **settings))


@needs_kernel
@pytest.mark.parametrize("settings", [{"pack_weights": False}] + [
    pytest.param({"pack_backend": name}, id=f"packed-{name}",
                 marks=pytest.mark.skipif(name not in packing.PACKERS, reason=f"no {name} in this torch"))
    for name in ("mkl", "onednn")])
def test_one_stream_keeps_hf_generates_tokens_on_the_rounded_weights(reference_model, settings):
    prompts = make_prompts(4, seed=11, max_len=30)
    reference = rounded(reference_model)
    with _engine(tiny_llama, **settings) as engine:
        net = engine.runner.net
        # Up to 32 rows over bf16 copies packed for AVX-512's loop, else 2 row-major.
        assert engine.stats()["small_linear_rows"] == kernels.default_small_rows(True)
        assert engine.stats()["quantization"] == "bf16_weight_only"
        assert {w.dtype for layer in net.small_weights for w in layer} == {torch.bfloat16}
        assert net.lm_head_small.dtype == torch.bfloat16
        dims = {w.dim() for layer in net.small_weights for w in layer} | {net.lm_head_small.dim()}
        assert dims == ({3} if kernels._has_avx512() else {2})
        # The loaded fp32 layer weights go (packed, the rounded fp32 ones never outlived the start).
        layer_bytes = sum(p.numel() * 4 for name, p in reference_model.named_parameters()
                          if "proj" in name)
        assert engine.released_weight_bytes == layer_bytes
        one_stream_on(reference, reference_model, engine, prompts)


@needs_kernel
def test_one_stream_multiplies_the_bf16_copies(reference_model, monkeypatch):
    """Through the stack run eagerly, every one-row matmul reaches small_linear with a bf16 weight."""
    seen = []
    original = torch.ops.chatapp.small_linear

    def spy(x, weight, bias):
        seen.append((x.size(0), weight.dtype))
        return original(x, weight, bias)

    monkeypatch.setattr(torch.ops.chatapp, "small_linear", spy)
    prompt = make_prompts(1, seed=3, max_len=12)[0]
    with _engine(copy.deepcopy(reference_model), script_layers=False) as engine:
        engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))
    layers = reference_model.config.num_hidden_layers
    # 3 decode steps of one row (the 4th token comes from the last), 4 matmuls a layer and the lm_head.
    assert seen.count((1, torch.bfloat16)) >= 3 * (4 * layers + 1)
    assert {dtype for _rows, dtype in seen} == {torch.bfloat16}


def test_a_module_passed_in_stays_whole(reference_model):
    model = copy.deepcopy(reference_model)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with _engine(model) as engine:
        assert engine.released_weight_bytes == 0
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_settings_it_cannot_keep_are_refused():
    with pytest.raises(ValueError, match="fp32 activations: dtype must be float32 or auto"):
        EngineConfig(quantization="bf16_weight_only", dtype="bfloat16")
    with pytest.raises(ValueError, match="for the CPU; on CUDA use dtype bfloat16"):
        EngineConfig(quantization="bf16_weight_only", device="cuda", dtype="float32")
    # "auto" has nothing to measure: the activations are fp32.
    assert EngineConfig(quantization="bf16_weight_only", dtype="auto").dtype == "float32"


def test_without_the_kernel_the_rounded_weights_run_in_torch(reference_model):
    """small_linear off: same format, every step on the rounded fp32 weights."""
    prompts = make_prompts(3, seed=13, max_len=30)
    reference = rounded(reference_model)
    expected = [hf_greedy(reference, p, 12) for p in prompts]
    with _engine(copy.deepcopy(reference_model), small_linear_rows=0) as engine:
        assert engine.stats()["small_linear_rows"] == 0 and engine.runner.net.small_weights == []
        got = [engine.generate([p], SamplingParams(max_tokens=12, temperature=0.0))[0].token_ids for p in prompts]
    assert got == expected


def fake_timings(monkeypatch, streamed=None, **us_at_one_row):
    """time_matmuls answering with the given one-row times (us) and 100 at 32
    rows; time_streamed_one_row with `streamed`, else the same one-row times."""
    def timed(shapes, dtypes, **_kwargs):
        return {name: {1: us_at_one_row.get(name, 100.0), 32: 100.0 if name != "bfloat16" else 200.0}
                for name in dtypes}
    monkeypatch.setattr(formats, "time_matmuls", timed)
    streamed = streamed or {name: us_at_one_row.get(name, 100.0) for name in ("float32", "bf16_weight_only")}
    monkeypatch.setattr(formats, "time_streamed_one_row", lambda shapes: dict(streamed))


def test_auto_takes_bf16_weights_where_one_row_gains_the_margin(reference_model, monkeypatch):
    fake_timings(monkeypatch, float32=100.0, bfloat16=50.0, bf16_weight_only=60.0)
    report = formats.choose_cpu_format(reference_model, small_rows=2)
    assert (report.dtype, report.quantization) == ("float32", "bf16_weight_only")
    assert report.quality["bf16_weight_only"]["passed"] and "with bf16_weight_only" in report.summary()
    # Under the margin, or with no small_linear to read bf16 copies: fp32 as loaded.
    fake_timings(monkeypatch, float32=100.0, bf16_weight_only=100.0 / formats.MIN_SPEEDUP + 1)
    assert formats.choose_cpu_format(reference_model, small_rows=2).quantization == "none"
    fake_timings(monkeypatch, float32=100.0, bf16_weight_only=60.0)
    report = formats.choose_cpu_format(reference_model, small_rows=0)
    assert report.quantization == "none" and "bf16_weight_only" not in report.matmul_us


def test_bf16_weights_are_weighed_on_weights_streamed_from_memory(reference_model, monkeypatch):
    """The per-shape timings reuse one weight per shape, which stays in cache;
    the choice follows the streamed ones, as a decode step reads the model."""
    fake_timings(monkeypatch, float32=100.0, bf16_weight_only=95.0,
                 streamed={"float32": 100.0, "bf16_weight_only": 60.0})
    report = formats.choose_cpu_format(reference_model, small_rows=2)
    assert report.quantization == "bf16_weight_only"
    assert report.streamed_us == {"float32": 100.0, "bf16_weight_only": 60.0}
    assert "one row streamed: float32 0.10, bf16_weight_only 0.06" in report.summary()
    fake_timings(monkeypatch, float32=100.0, bf16_weight_only=50.0,
                 streamed={"float32": 100.0, "bf16_weight_only": 95.0})
    assert formats.choose_cpu_format(reference_model, small_rows=2).quantization == "none"


@needs_kernel
def test_the_streamed_timing_reads_every_layer_or_its_share_of_the_budget():
    kernels.load_kernels()
    shapes = Counter({(64, 96): 12, (96, 64): 3})
    whole = formats.time_streamed_one_row(shapes, rounds=2)
    # int8 weights too where small_linear packs them (AVX-512).
    int8 = {"int8_weight_only"} if kernels._has_avx512() else set()
    assert set(whole) == {"float32", "bf16_weight_only"} | int8 and all(us > 0 for us in whole.values())
    layer = 64 * 96 * 4
    assert formats.stream_plan(shapes, budget_bytes=15 * layer) == {(64, 96): 12, (96, 64): 3}
    assert formats.stream_plan(shapes, budget_bytes=5 * layer) == {(64, 96): 4, (96, 64): 1}
    assert formats.stream_plan(shapes, budget_bytes=layer) == {(64, 96): 1, (96, 64): 1}
    capped = formats.time_streamed_one_row(shapes, rounds=2, budget_bytes=layer)
    assert set(capped) == set(whole) and all(us > 0 for us in capped.values())


def test_a_half_format_that_wins_is_kept_without_bf16_weights(reference_model, monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: New CPU\nflags\t\t: avx512f avx512_bf16\n")

    def timed(shapes, dtypes, **_kwargs):
        return {name: {1: 50.0, 32: 50.0} if name == "bfloat16" else {1: 100.0, 32: 100.0} for name in dtypes}
    monkeypatch.setattr(formats, "time_matmuls", timed)
    report = formats.choose_cpu_format(reference_model, cpuinfo=cpuinfo, small_rows=2)
    assert (report.dtype, report.quantization) == ("bfloat16", "none")


@needs_kernel
def test_an_auto_engine_runs_what_the_report_chose(monkeypatch):
    fake_timings(monkeypatch, float32=100.0, bfloat16=150.0, float16=150.0, bf16_weight_only=50.0)
    with Engine(tiny_llama, None, EngineConfig(kv_cache_bytes=2**20, max_num_batched_tokens=128,
                                                dtype="auto")) as engine:
        assert engine.format_report.quantization == "bf16_weight_only"
        assert engine.stats()["dtype"] == "float32" and engine.stats()["quantization"] == "bf16_weight_only"
        assert engine.runner.net.lm_head_small.dtype == torch.bfloat16
    # A quantization asked for is kept: "auto" then chooses the activations' dtype alone.
    with Engine(tiny_llama, None, EngineConfig(kv_cache_bytes=2**20, max_num_batched_tokens=128,
                                                dtype="auto", quantization="int8_weight_only")) as engine:
        assert engine.stats()["quantization"] == "int8_weight_only"
