"""Prefill attention read in place from the paged cache, in half precision
(EngineConfig.attention_kernel, inference.kernels' csrc/prefill_attention.cpp):
the op computes what SDPA in fp32 over the gathered keys computes, with and
without earlier context, for grouped heads and head sizes with and without a
fixed-size path; each row gets the same bits however its prompt is chunked; it
rejects what would read outside the cache; and a half-precision engine runs its
prefill chunks through it, the same batched, alone or chunked small."""
from __future__ import annotations

import os

import pytest
import torch

from inference import SamplingParams, kernels

pytestmark = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine")

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "bf16", "fp16"])


@pytest.fixture(scope="module")
def prefill():
    # A compiler present and the library not built is a failure, not a skip.
    assert kernels.load_kernels(os.environ.get("ENGINE_KERNEL_DIR"))
    return torch.ops.chatapp.paged_prefill_attention


def _cache(generator, dtype, kv_heads, dim, block_size, context_len, num_blocks=48):
    """Caches of random K/V and a table of distinct blocks in no order covering context_len."""
    k = torch.randn(kv_heads, num_blocks, block_size, dim, generator=generator).to(dtype)
    v = torch.randn(kv_heads, num_blocks, block_size, dim, generator=generator).to(dtype)
    blocks = torch.randperm(num_blocks, generator=generator)[:-(-context_len // block_size)]
    return k, v, blocks


@DTYPES
@pytest.mark.parametrize("kv_heads,group,dim,block_size,q_len,context_len", [
    (3, 3, 64, 16, 128, 128),  # SmolLM2's heads, a whole 128-token prompt
    (3, 3, 64, 16, 37, 300),  # a chunk after earlier context, ragged at both ends
    (2, 1, 128, 8, 20, 20),  # no grouping, the other fixed head size
    (1, 5, 32, 4, 9, 30),  # a head size without a fixed path; an odd group
    (1, 8, 64, 16, 1, 17),  # one query: a chunk of one token
])
def test_the_kernel_computes_what_sdpa_in_fp32_computes(prefill, dtype, kv_heads, group, dim, block_size, q_len,
                                                        context_len):
    generator = torch.Generator().manual_seed(q_len * dim + context_len)
    k, v, blocks = _cache(generator, dtype, kv_heads, dim, block_size, context_len)
    # As the layer calls it: the query heads of the fused QKV output, rows strided.
    qkv = torch.randn(q_len, kv_heads * (group + 2), dim, generator=generator).to(dtype)
    q = qkv[:, :kv_heads * group]
    got = prefill(q, k, v, blocks, context_len, dim ** -0.5)
    want = kernels.reference_prefill_attention(q, k, v, blocks, context_len, dim ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_row_gets_the_same_bits_however_its_prompt_is_chunked(prefill, dtype):
    # What SDPA's bf16 kernel did not give: a prompt prefilled whole, in two
    # chunks cut anywhere, or in many, yields the same attention bit for bit.
    generator = torch.Generator().manual_seed(9)
    k, v, blocks = _cache(generator, dtype, 3, 64, 16, 300)
    q = torch.randn(300, 9, 64, generator=generator).to(dtype)
    whole = prefill(q, k, v, blocks, 300, 0.125)
    for cuts in ([7], [16], [17], [100], [299], [1, 2, 50, 64, 200, 250]):
        edges = [0, *cuts, 300]
        pieces = [prefill(q[a:b], k, v, blocks, b, 0.125) for a, b in zip(edges, edges[1:])]
        assert torch.equal(torch.cat(pieces), whole), cuts


@pytest.mark.parametrize("bad", ["block out of range", "context past the table", "context shorter than the chunk",
                                 "int32 table", "dtype mismatch", "heads not packed"])
def test_the_kernel_rejects_arguments_that_would_read_outside_the_cache(prefill, bad):
    generator = torch.Generator().manual_seed(5)
    k, v, blocks = _cache(generator, torch.float32, 2, 16, 4, 10, num_blocks=8)
    q, context_len = torch.randn(4, 4, 16, generator=generator), 10
    if bad == "block out of range":
        blocks[1] = 8
    elif bad == "context past the table":
        context_len = 13
    elif bad == "context shorter than the chunk":
        context_len = 3
    elif bad == "int32 table":
        blocks = blocks.int()
    elif bad == "dtype mismatch":
        q = q.bfloat16()
    else:
        q = torch.randn(4, 16, 4, generator=generator).transpose(1, 2)
    with pytest.raises(RuntimeError):
        prefill(q, k, v, blocks, context_len, 0.25)


def _engine_ops(engine, prompts, params) -> tuple[list, set[str]]:
    # The engine's forward runs on its own thread, which only an all-threads profile sees.
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=config) as prof:
        tokens = [c.token_ids for c in engine.generate(prompts, params)]
    return tokens, {e.key for e in prof.key_averages()}


def test_a_half_precision_engine_prefills_through_the_kernel_and_fp32_through_sdpa(make_engine, prompts, prefill):
    params = SamplingParams(max_tokens=4, temperature=0.0)
    _, half = _engine_ops(make_engine(dtype="bfloat16"), prompts[:4], params)
    assert "chatapp::paged_prefill_attention" in half
    _, full = _engine_ops(make_engine(), prompts[:4], params)
    assert "chatapp::paged_prefill_attention" not in full  # fp32 keeps HF generate's sums


def test_a_half_precision_engine_gives_the_same_tokens_chunked_small_batched_or_alone(make_engine, prompts, prefill):
    # Chunks of 16 tokens cut every prompt into many, at other places than a
    # 256-token budget does; all at once, or one at a time: the same tokens.
    params = SamplingParams(max_tokens=16, temperature=0.0)
    small = make_engine(dtype="bfloat16", max_num_batched_tokens=16)
    chunked = [c.token_ids for c in small.generate(prompts[:8], params)]
    large = make_engine(dtype="bfloat16")
    batched = [c.token_ids for c in large.generate(prompts[:8], params)]
    alone = [large.generate(p, params)[0].token_ids for p in prompts[:8]]
    assert chunked == batched == alone
