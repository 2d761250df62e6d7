"""A layer's element-wise ops fused (EngineConfig.fused_ops, inference.kernels'
csrc/fused_ops.cpp): RMSNorm, the rotary embedding and SiLU(gate) * up compute
what the torch path computes in each dtype, each row alone whatever the batch,
they refuse what they cannot compute, and the engine uses them on the CPU by
default and keeps HF generate's greedy tokens with them; half precision rounds
as torch does, bit for bit. The same source's argmax picks what torch.argmax
picks, and the greedy sampler uses it. SmolLM2 against HF generate with them
on: test_engine_packing's batched SmolLM2 test."""
from __future__ import annotations

import os

import pytest
import torch

from inference import kernels
from inference.layer_ops import rms_norm, rotate, silu_mul
from .conftest import half_precision_batched_and_alone

has_compiler = kernels._compiler() is not None
pytestmark = pytest.mark.skipif(not has_compiler, reason="no C++ compiler on this machine")

# Relative to 1 + |value|: fp32 differs in the last bits (the order of a row's
# sum of squares, glibc's exp against Sleef's), half precision by a rounding.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "bf16", "fp16"])
# One row (one chat's decode), a decode step's 32, and a prefill chunk's 512,
# which is split between threads.
ROWS = pytest.mark.parametrize("rows", [1, 32, 512])


@pytest.fixture(scope="module")
def ops():
    # A compiler present and the library not built is a failure, not a skip.
    # From the folder the suite's engines and servers share (tests/env.py).
    assert kernels.load_kernels(os.environ.get("ENGINE_KERNEL_DIR"))
    return torch.ops.chatapp


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    error = ((got.float() - want.float()).abs() / (1 + want.float().abs())).max().item()
    assert error <= TOLERANCE[dtype], error


def _randn(generator, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


@DTYPES
@ROWS
def test_rms_norm_is_the_torch_paths(ops, dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    x, weight = _randn(generator, rows, 576, dtype=dtype, scale=4), _randn(generator, 576, dtype=dtype)
    _close(ops.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), dtype)


@DTYPES
@ROWS
def test_silu_mul_is_the_torch_paths(ops, dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    gate_up = _randn(generator, rows, 2 * 1536, dtype=dtype, scale=6)  # far into both tails of the exp
    _close(ops.silu_mul(gate_up), silu_mul(gate_up), dtype)


@DTYPES
@ROWS
def test_rotary_is_the_torch_paths_on_a_slice_of_the_fused_qkv(ops, dtype, rows):
    # As the layer calls it: Q and K heads, a view of the QKV matmul's output
    # whose rows also hold V (strided rows).
    generator = torch.Generator().manual_seed(rows)
    qkv = _randn(generator, rows, 15, 64, dtype=dtype)
    qk = qkv[:, :12]
    cos, sin = _randn(generator, rows, 1, 64, dtype=dtype), _randn(generator, rows, 1, 64, dtype=dtype)
    assert rows == 1 or not qk.is_contiguous()
    _close(ops.rotary(qk, cos, sin), rotate(qk, cos, sin), dtype)


@pytest.mark.parametrize("rows", [3, 700])  # on the calling thread, and split between threads
def test_each_row_is_computed_alone_whatever_the_batch(ops, rows):
    # Bit for bit: a sequence's activations do not depend on who shares its step.
    generator = torch.Generator().manual_seed(11)
    x, weight = _randn(generator, rows, 200, dtype=torch.float32, scale=3), _randn(generator, 200, dtype=torch.float32)
    qk = _randn(generator, rows, 5, 16, dtype=torch.float32)
    cos, sin = _randn(generator, rows, 1, 16, dtype=torch.float32), _randn(generator, rows, 1, 16, dtype=torch.float32)
    normed, activated, rotated = ops.rms_norm(x, weight, 1e-6), ops.silu_mul(x), ops.rotary(qk, cos, sin)
    for row in (0, 1, rows - 1):
        one = slice(row, row + 1)
        assert torch.equal(ops.rms_norm(x[one], weight, 1e-6), normed[one])
        assert torch.equal(ops.silu_mul(x[one]), activated[one])
        assert torch.equal(ops.rotary(qk[one], cos[one], sin[one]), rotated[one])


@pytest.mark.parametrize("bad", ["double", "weight of another width", "weight of another dtype", "odd gate_up",
                                 "odd head size", "cos of another length"])
def test_the_ops_refuse_what_they_cannot_compute(ops, bad):
    x, weight = torch.randn(4, 8), torch.randn(8)
    qk, cos, sin = torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    calls = {
        "double": lambda: ops.rms_norm(x.double(), weight.double(), 1e-5),
        "weight of another width": lambda: ops.rms_norm(x, torch.randn(7), 1e-5),
        "weight of another dtype": lambda: ops.rms_norm(x, weight.bfloat16(), 1e-5),
        "odd gate_up": lambda: ops.silu_mul(torch.randn(4, 7)),
        "odd head size": lambda: ops.rotary(torch.randn(4, 2, 7), torch.randn(4, 1, 7), torch.randn(4, 1, 7)),
        "cos of another length": lambda: ops.rotary(qk, cos[:3], sin),
    }
    with pytest.raises(RuntimeError):
        calls[bad]()


def test_the_engine_fuses_the_ops_by_default(make_engine, ops):
    assert make_engine().stats()["fused_ops"] is True
    assert make_engine(fused_ops=False).stats()["fused_ops"] is False


@pytest.mark.parametrize("settings", [
    pytest.param({}, id="fp32"),
    pytest.param({"pack_weights": False, "attention_kernel": False}, id="fp32-torch-matmuls-and-attention"),
    pytest.param({"enable_prefix_caching": True, "kv_cache_bytes": 2**20}, id="small-cache-preempts"),
])
def test_with_the_fused_ops_the_engine_keeps_hf_greedy_tokens(make_engine, prompts, expected, greedy, settings, ops):
    # All prompts at once: decode batches of every size beside prefill chunks;
    # the small cache makes the scheduler preempt and recompute.
    engine = make_engine(max_num_batched_tokens=128, **settings)
    assert engine.stats()["fused_ops"] is True
    assert [c.token_ids for c in engine.generate(prompts, greedy)] == expected


def test_half_precision_with_the_fused_ops_is_the_same_batched_or_alone(make_engine, prompts, ops):
    batched, alone = half_precision_batched_and_alone(make_engine, prompts[:8], "fused_ops")
    assert batched == alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_rounds_as_torch_does_to_the_last_bit(ops, dtype):
    # The library converts bf16 and fp16 itself (bit operations the compiler
    # vectorises, not c10's scalar conversions), so its rounding is checked
    # exactly: with sin = 0 the rotary is x * cos rounded to the dtype, as
    # torch rounds it, ties to even included; NaN stays NaN, an overflow
    # becomes inf, as in torch. (The sums' other differences: the tests above.)
    generator = torch.Generator().manual_seed(5)
    qk = _randn(generator, 64, 4, 64, dtype=dtype, scale=3)
    cos = _randn(generator, 64, 1, 64, dtype=dtype)
    sin = torch.zeros(64, 1, 64, dtype=dtype)
    largest = torch.finfo(dtype).max
    qk[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), largest], dtype=dtype)
    cos[0, 0, :4] = torch.tensor([1.0, 1.0, 1.0, 1.5], dtype=dtype)
    got, want = ops.rotary(qk, cos, sin), rotate(qk, cos, sin)
    assert want[0, 0, 3].isinf()  # the overflow is exercised
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize("width", [49152, 1000, 9])  # SmolLM2's vocabulary, a tail after whole vectors, under one
def test_argmax_picks_what_torch_picks(ops, rows, width):
    # The greedy pick: the first of tied maxima, a NaN counted as the largest
    # (torch.argmax's rule), -inf and a row that is one value repeated.
    generator = torch.Generator().manual_seed(width + rows)
    logits = torch.randn(rows, width, generator=generator) * 10
    want_first = logits[0].argmax().item()
    logits[0, width - 1] = logits[0, want_first]  # a tie after the first maximum
    if rows > 1:
        logits[1, width // 2] = float("nan")
        logits[1, width - 1] = float("nan")
        logits[2] = 3.0
        logits[3, :] = -float("inf")
        logits[3, width - 1] = 0.0
        logits[4, 0] = float("inf")
    got = kernels.argmax(logits)
    assert torch.equal(got, logits.argmax(-1))
    assert got[0].item() == want_first
    assert torch.equal(kernels.argmax(logits[:, ::2]), logits[:, ::2].argmax(-1))  # strided rows


def test_argmax_refuses_what_it_cannot_pick_from(ops):
    for bad in (torch.randn(4, 8).double(), torch.randn(8), torch.empty(3, 0)):
        with pytest.raises(RuntimeError):
            ops.argmax(bad)


def test_the_greedy_sampler_picks_with_the_library(ops):
    from inference import SamplingParams
    from inference.sampler import Sampler
    from inference.sequence import Sequence

    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0)) for i in range(32)]
    logits = torch.randn(32, 49152)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        picked = Sampler().sample(seqs, logits)
    assert [token for token, _ in picked] == logits.argmax(-1).tolist()
    assert "chatapp::argmax" in {e.key for e in prof.key_averages()}
