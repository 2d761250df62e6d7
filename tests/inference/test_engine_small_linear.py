"""fp32 and bf16 matmuls of a few rows in the native library
(EngineConfig.small_linear_rows, inference.kernels' small_linear): the op
computes F.linear's product and rejects what it cannot take, the engine runs
few-row fp32 and bf16 steps through it (keeping the fp32 plain weights beside
packed copies), fp32 keeps HF generate's greedy tokens, and the quantized
formats never use it."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from inference import Engine, EngineConfig, SamplingParams, kernels, packing
from inference.quantization import quantize_weight

from .conftest import hf_greedy, make_prompts, tiny_llama

needs_kernel = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine")
pytestmark = [needs_kernel, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def small_linear():
    # A compiler present and the library not built is a failure, not a skip.
    # From the folder the suite's engines and servers share (tests/env.py).
    assert kernels.load_kernels(os.environ.get("ENGINE_KERNEL_DIR"))
    return torch.ops.chatapp.small_linear


@pytest.mark.parametrize("rows", range(0, kernels.SMALL_LINEAR_MAX_ROWS + 1))
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("out_features,in_features", [(96, 80), (3, 1536), (1000, 7)])
def test_small_linear_computes_the_linear_product(small_linear, rows, with_bias, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * 31 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(rows, in_features, generator=generator)
    got = small_linear(x, weight, bias)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # One fp32 dot product per element, summed in another order.
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=2e-5)


needs_avx512 = pytest.mark.skipif(not kernels._has_avx512(), reason="small_linear packs bf16 weights on AVX-512 only")


@pytest.mark.parametrize("rows", [*range(0, kernels.SMALL_LINEAR_MAX_ROWS + 1), 9, 13, 16, 17, 24, 31, 32, 47, 64])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
# (96, 80), (208, 96): whole tiles of three 16-column blocks and a short last
# tile; (3, 1536) and (1000, 7): shapes only the row-major loop takes.
@pytest.mark.parametrize("out_features,in_features", [(96, 80), (208, 96), (3, 1536), (1000, 7)])
@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=needs_avx512)], ids=["row-major", "packed"])
def test_bf16_weights_are_multiplied_widened_in_fp32(small_linear, rows, with_bias, out_features, in_features,
                                                      packed):
    generator = torch.Generator().manual_seed(rows * 17 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(rows, in_features, generator=generator)
    if packed and not kernels.can_pack_small(weight):
        with pytest.raises(ValueError, match="cannot pack"):
            kernels.pack_small_weight(weight)
        return
    operand = kernels.pack_small_weight(weight) if packed else weight
    if rows > kernels.max_small_rows([operand]):
        with pytest.raises(RuntimeError, match="at most 8 rows"):
            small_linear(x, operand, bias)
        return
    got = small_linear(x, operand, bias)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # The bf16 values exactly, summed in fp32 in another order than F.linear's:
    # both within fp32 rounding of the exact sum, which grows with the row length.
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=2e-5 * max(1.0, (in_features / 96) ** 0.5))


def test_each_row_is_computed_alone(small_linear):
    generator = torch.Generator().manual_seed(3)
    weight, x = torch.randn(200, 300, generator=generator), torch.randn(8, 300, generator=generator)
    together = small_linear(x, weight, None)
    for row in range(8):
        assert torch.equal(small_linear(x[row:row + 1], weight, None)[0], together[row])


@needs_avx512
@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("out_features,in_features", [(208, 96), (160, 300), (3072, 576)])
def test_packed_rows_are_the_same_bits_alone_in_groups_and_on_any_thread_count(small_linear, out_features,
                                                                               in_features, kind):
    """What lets a half-precision step run on one thread or on the team
    (inference.threads) and a stream's tokens not depend on its neighbours;
    over bf16 copies, and over int8 ones with their scales."""
    generator = torch.Generator().manual_seed(5)
    dense = torch.randn(out_features, in_features, generator=generator)
    if kind == "bf16":
        weight = kernels.pack_small_weight(dense.bfloat16())
    else:
        weight = kernels.pack_small_int8(*quantize_weight(dense))
    x = torch.randn(kernels.SMALL_LINEAR_MAX_ROWS_PACKED, in_features, generator=generator)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            alone = torch.cat([small_linear(x[row:row + 1], weight, None) for row in range(len(x))])
            # Every row count (tiles of eight blocks of 16 columns for up to
            # two rows, six for up to four, else three with the rows in groups
            # of up to eight, up to 64) gives each row alone's bits.
            for rows in range(2, len(x) + 1):
                assert torch.equal(small_linear(x[:rows], weight, None), alone[:rows]), rows
            # More rows than one call of its loop takes: calls of 64, the same bits.
            assert torch.equal(small_linear(torch.cat([x, x, x[:7]]), weight, None),
                               torch.cat([alone, alone, alone[:7]]))
            results.append(alone)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_small_linear_rejects_what_it_cannot_take(small_linear):
    weight = torch.randn(16, 32)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        small_linear(torch.randn(9, 32), weight, None)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        small_linear(torch.randn(9, 32), weight.bfloat16(), None)
    if kernels.can_pack_small(weight.bfloat16()):
        packed = kernels.pack_small_weight(weight.bfloat16())
        # Packed, any row count (calls of 64 inside), each row as alone.
        x = torch.randn(65, 32)
        assert torch.equal(small_linear(x, packed, None)[64], small_linear(x[64:], packed, None)[0])
        with pytest.raises(RuntimeError, match="packed bf16 weight"):
            small_linear(torch.randn(2, 30), packed, None)
        with pytest.raises(RuntimeError, match="packed bf16 weight"):
            small_linear(torch.randn(2, 32), packed.view(1, 16, 32).float(), None)
        with pytest.raises(RuntimeError, match="bias"):
            small_linear(torch.randn(2, 32), packed, torch.randn(15))
    with pytest.raises(RuntimeError, match="fp32 x expected"):
        small_linear(torch.randn(2, 32).bfloat16(), weight.bfloat16(), None)
    with pytest.raises(RuntimeError, match="fp32 or bf16 weight expected"):
        small_linear(torch.randn(2, 32), weight.half(), None)
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\]"):
        small_linear(torch.randn(2, 31), weight, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        small_linear(torch.randn(2, 32), torch.randn(32, 16).t(), None)
    with pytest.raises(RuntimeError, match="bias"):
        small_linear(torch.randn(2, 32), weight, torch.randn(15))
    with pytest.raises(RuntimeError, match="bias"):
        small_linear(torch.randn(2, 32), weight.bfloat16(), torch.randn(16).bfloat16())


def _engine(model, **settings) -> Engine:
    return Engine(model, None, EngineConfig(kv_cache_bytes=2**20, max_num_batched_tokens=128, **settings))


@pytest.mark.parametrize("settings", [{"pack_weights": False}] + [
    pytest.param({"pack_backend": name}, id=f"packed-{name}",
                 marks=pytest.mark.skipif(name not in packing.PACKERS, reason=f"no {name} in this torch"))
    for name in ("mkl", "onednn")])
def test_one_stream_in_fp32_keeps_hf_generates_tokens(small_linear, reference_model, settings):
    """One sequence decodes one row a step: every matmul after its prompt runs in small_linear."""
    prompts = make_prompts(4, seed=5, max_len=30)
    expected = [hf_greedy(reference_model, p, 16) for p in prompts]
    loaded = []

    def load():  # an engine-owned model: with small_linear on, packing keeps the plain weights
        loaded.append(tiny_llama())
        return loaded[0]

    with _engine(load, **settings) as engine:
        assert engine.stats()["small_linear_rows"] == 2
        assert engine.released_weight_bytes == 0
        got = [engine.generate([p], SamplingParams(max_tokens=16, temperature=0.0))[0].token_ids for p in prompts]
    assert got == expected


def test_it_is_off_when_set_to_zero_and_in_other_formats(small_linear):
    with _engine(tiny_llama(), small_linear_rows=0) as engine:
        assert engine.stats()["small_linear_rows"] == 0
    for settings in ({"dtype": "bfloat16"}, {"dtype": "float16"}, {"quantization": "int8"},
                     {"quantization": "int4_weight_only"}, {"dtype": "bfloat16", "quantization": "int8_weight_only"}):
        with _engine(tiny_llama(), **settings) as engine:
            assert engine.stats()["small_linear_rows"] == 0, settings


def test_a_mutated_small_linear_changes_the_tokens(small_linear, reference_model, monkeypatch):
    """The engine's one-stream tokens really come from small_linear: a wrong
    product there (checked through the layer stack run eagerly) changes them."""
    prompt = make_prompts(1, seed=9, max_len=20)[0]
    expected = hf_greedy(reference_model, prompt, 12)

    def off_by_a_little(x, weight, bias):
        out = F.linear(x, weight, bias)
        return out + 0.5 * out.abs().max()  # every product shifted: a broken kernel

    monkeypatch.setattr(torch.ops.chatapp, "small_linear", off_by_a_little)
    with _engine(tiny_llama(), pack_weights=False, script_layers=False) as engine:
        got = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].token_ids
    assert got != expected


def test_its_default_row_count_follows_the_weights_and_the_cpu(small_linear, monkeypatch):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "flags\t: fpu avx2 avx512f avx512bw")
    assert (kernels.default_small_rows(False), kernels.default_small_rows(True)) == (2, 64)
    half = torch.zeros(64, 576, dtype=torch.bfloat16)
    assert kernels.can_pack_small(half) and kernels.pack_small_weight(half).shape == (4, 288, 32)
    assert not kernels.can_pack_small(half[:40]) and not kernels.can_pack_small(half.float())
    assert kernels.max_small_rows([kernels.pack_small_weight(half)] * 2) == kernels.SMALL_LINEAR_ALL_ROWS
    # One weight left row-major (no whole 16-column blocks) keeps every matmul at eight rows.
    assert kernels.max_small_rows([kernels.pack_small_weight(half), half[:40]]) == 8
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "flags\t: fpu avx2 fma")
    assert (kernels.default_small_rows(False), kernels.default_small_rows(True)) == (2, 2)
    assert not kernels.can_pack_small(half)
    with pytest.raises(ValueError, match="small_linear_rows must be in"):
        EngineConfig(small_linear_rows=65)
