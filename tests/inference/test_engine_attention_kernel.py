"""Decode attention read in place from the paged cache (EngineConfig.attention_kernel,
inference.kernels): the op computes what the gather and SDPA compute, each row
alone whatever the batch, it rejects tables that point outside the cache, the
engine uses it on the CPU by default and keeps HF generate's greedy tokens with
it, and without a compiler the engine keeps the torch path. SmolLM2 against HF
generate with the kernel on: test_engine_packing's batched SmolLM2 test."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from inference import kernels
from .conftest import half_precision_batched_and_alone

has_compiler = kernels._compiler() is not None
needs_kernel = pytest.mark.skipif(not has_compiler, reason="no C++ compiler on this machine")


@pytest.fixture(scope="module")
def kernel_ready():
    # A compiler present and the library not built is a failure, not a skip.
    # Where the suite's engines and servers load it from (tests/env.py).
    assert kernels.load_kernels(os.environ.get("ENGINE_KERNEL_DIR"))
    return torch.ops.chatapp.paged_decode_attention


def _case(generator, dtype, batch, kv_heads, group, dim, block_size, lens, num_blocks=64):
    heads = kv_heads * group
    width = max(-(-n // block_size) for n in lens)
    # Distinct blocks per row, in no order, each row padded with block 0 as the runner pads.
    perm = torch.randperm(num_blocks - 1, generator=generator) + 1
    table = torch.zeros(batch, width, dtype=torch.long)
    taken = 0
    for row, n in enumerate(lens):
        used = -(-n // block_size)
        table[row, :used] = perm[taken:taken + used]
        taken += used
    q = torch.randn(batch, heads, dim, generator=generator).to(dtype)
    k = torch.randn(kv_heads, num_blocks, block_size, dim, generator=generator).to(dtype)
    v = torch.randn(kv_heads, num_blocks, block_size, dim, generator=generator).to(dtype)
    return q, k, v, table, torch.tensor(lens)


@needs_kernel
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kv_heads,group,dim,block_size,lens", [
    (3, 3, 64, 16, [1, 15, 16, 17, 150, 160]),  # SmolLM2's heads; block edges
    (2, 1, 16, 4, [9, 3, 12]),  # no grouping, a small head
    (1, 8, 128, 8, [33, 1]),  # one KV head for eight query heads
    (1, 5, 64, 16, [40, 7]),  # a group the fixed-shape kernel does not cover: the general one
])
def test_the_kernel_computes_what_the_gather_and_sdpa_compute(kernel_ready, dtype, tolerance, kv_heads, group,
                                                              dim, block_size, lens):
    generator = torch.Generator().manual_seed(len(lens) * dim)
    q, k, v, table, context_lens = _case(generator, dtype, len(lens), kv_heads, group, dim, block_size, lens)
    got = kernel_ready(q, k, v, table, context_lens, dim ** -0.5)
    want = kernels.reference_decode_attention(q, k, v, table, context_lens, dim ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@needs_kernel
def test_each_row_is_computed_alone_whatever_the_batch(kernel_ready):
    # Bit for bit: a sequence's attention does not depend on who shares its step.
    generator = torch.Generator().manual_seed(3)
    q, k, v, table, lens = _case(generator, torch.float32, 5, 3, 3, 64, 16, [40, 3, 160, 17, 99])
    batched = kernel_ready(q, k, v, table, lens, 0.125)
    for row in range(5):
        width = -(-int(lens[row]) // 16)
        alone = kernel_ready(q[row:row + 1].contiguous(), k, v, table[row:row + 1, :width].contiguous(),
                             lens[row:row + 1], 0.125)
        assert torch.equal(alone[0], batched[row])


@needs_kernel
@pytest.mark.parametrize("bad", ["block out of range", "negative block", "context past the table", "empty context",
                                 "int32 table", "dtype mismatch"])
def test_the_kernel_rejects_arguments_that_would_read_outside_the_cache(kernel_ready, bad):
    generator = torch.Generator().manual_seed(5)
    q, k, v, table, lens = _case(generator, torch.float32, 2, 2, 2, 16, 4, [5, 8], num_blocks=8)
    if bad == "block out of range":
        table[1, 0] = 8
    elif bad == "negative block":
        table[0, 1] = -1
    elif bad == "context past the table":
        lens[0] = 9
    elif bad == "empty context":
        lens[1] = 0
    elif bad == "int32 table":
        table = table.int()
    else:
        q = q.double()
    with pytest.raises(RuntimeError):
        kernel_ready(q, k, v, table, lens, 0.25)


@needs_kernel
def test_the_engine_reads_the_cache_in_place_by_default(make_engine, kernel_ready):
    assert make_engine().stats()["attention_kernel"] is True
    assert make_engine(attention_kernel=False).stats()["attention_kernel"] is False


@needs_kernel
@pytest.mark.parametrize("settings", [
    pytest.param({}, id="fp32"),
    pytest.param({"pack_weights": False}, id="fp32-unpacked"),
    pytest.param({"enable_prefix_caching": True, "kv_cache_bytes": 2**20}, id="small-cache-preempts"),
])
def test_with_the_kernel_the_engine_keeps_hf_greedy_tokens(make_engine, prompts, expected, greedy, settings,
                                                           kernel_ready):
    # All prompts at once: decode batches of every size beside prefill chunks;
    # the small cache makes the scheduler preempt and recompute.
    engine = make_engine(max_num_batched_tokens=128, **settings)
    assert engine.stats()["attention_kernel"] is True
    got = [c.token_ids for c in engine.generate(prompts, greedy)]
    assert got == expected


@needs_kernel
def test_half_precision_with_the_kernel_is_the_same_batched_or_alone(make_engine, prompts, kernel_ready):
    batched, alone = half_precision_batched_and_alone(make_engine, prompts[:8], "attention_kernel")
    assert batched == alone


def test_without_a_compiler_the_engine_keeps_the_torch_path(make_engine, prompts, expected, greedy,
                                                            monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="inference.kernels"):
        assert kernels._load.__wrapped__(str(tmp_path)) is False
    assert "no C++ compiler" in caplog.text
    engine = make_engine(attention_kernel=False)
    assert [c.token_ids for c in engine.generate(prompts[:4], greedy)] == expected[:4]


@needs_kernel
def test_a_failed_build_is_logged_and_leaves_the_torch_path(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "paged_attention.cpp"
    broken.write_text("this is not C++\n")
    # The broken source alone: the real ones beside it only made the test wait
    # for their compiles (6 s), the failure is the same.
    monkeypatch.setattr(kernels, "SOURCES", [broken])
    with caplog.at_level(logging.WARNING, logger="inference.kernels"):
        assert kernels._load.__wrapped__(str(tmp_path / "build")) is False
    assert "native kernels unavailable" in caplog.text
    assert not list((tmp_path / "build").glob("*.so"))  # no half-written library left behind


@needs_kernel
def test_the_built_library_is_reused(tmp_path, monkeypatch):
    # The key is the sources and headers, torch, flags, compiler and CPU: a second start finds
    # the same file, and a changed source is built anew. A small source stands
    # in for the real ones (whose build the kernel_ready fixture already paid).
    source, header = tmp_path / "probe.cpp", tmp_path / "probe.h"
    header.write_text("#define CHATAPP_PROBE 1\n")
    source.write_text('extern "C" int chatapp_probe() { return 1; }\n')
    monkeypatch.setattr(kernels, "SOURCES", [source])
    monkeypatch.setattr(kernels, "HEADERS", [header])
    compiler = kernels._compiler()
    key = kernels._build_key(compiler)
    assert kernels._build_key(compiler) == key
    target = tmp_path / "build" / f"kernels-{key}.so"
    kernels._build(compiler, target)
    assert target.exists() and not list(target.parent.glob(".*"))  # written whole, temporaries gone
    source.write_text('extern "C" int chatapp_probe() { return 2; }\n')
    assert kernels._build_key(compiler) != key
    key = kernels._build_key(compiler)
    header.write_text("#define CHATAPP_PROBE 2\n")  # a header the sources include changes the library too
    assert kernels._build_key(compiler) != key


@needs_kernel
def test_the_kernel_leaves_the_calling_threads_count_alone(kernel_ready):
    # Its first call on a thread once reset that thread's count to whatever any
    # thread set last: an engine thread took another engine's one-thread count.
    import threading

    generator = torch.Generator().manual_seed(9)
    q, k, v, table, lens = _case(generator, torch.float32, 3, 2, 3, 32, 8, [9, 20, 1])
    seen = []

    def engine_thread():
        torch.set_num_threads(2)
        torch.ones(2**20).sum()  # torch's own per-thread start-up done
        other = threading.Thread(target=torch.set_num_threads, args=(1,))  # another engine's one-thread step
        other.start()
        other.join()
        kernel_ready(q, k, v, table, lens, 0.125)
        seen.append(torch.get_num_threads())

    previous = torch.get_num_threads()
    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join(60)
    torch.set_num_threads(previous)
    assert seen == [2]
