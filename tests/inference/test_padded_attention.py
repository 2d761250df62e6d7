"""An encoder's attention over right-padded texts in the engine's library
(inference.kernels' padded_attention, csrc/prefill_attention.cpp), which
retrieval's bf16 MiniLM runs instead of SDPA: it computes what SDPA in fp32
with the padding masked computes, from the strided heads transformers passes;
a text's result does not depend on the texts batched with it; and it refuses
lengths outside its texts."""
from __future__ import annotations

import os

import pytest
import torch

from inference import kernels

pytestmark = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler on this machine")

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "bf16"])


@pytest.fixture(scope="module")
def attention():
    # A compiler present and the library not built is a failure, not a skip.
    assert kernels.load_kernels(os.environ.get("ENGINE_KERNEL_DIR"))
    return torch.ops.chatapp.padded_attention


def _heads(generator, dtype, batch, heads, length, dim):
    """q, k, v [B, H, L, D] as transformers' BERT passes them: transposed views of [B, L, H * D]."""
    return [torch.randn(batch, length, heads, dim, generator=generator).to(dtype).transpose(1, 2)
            for _ in range(3)]


@DTYPES
@pytest.mark.parametrize("heads,dim,lengths", [
    (12, 32, [107, 95, 101, 60]),  # MiniLM's heads, reply windows of about 100 tokens
    (12, 32, [5]),  # one short text, not padded
    (4, 24, [33, 1, 17]),  # a head size without a fixed path; a text of one token
    (2, 64, [16, 16]),  # whole tiles
])
def test_the_kernel_computes_what_sdpa_in_fp32_computes(attention, dtype, heads, dim, lengths):
    generator = torch.Generator().manual_seed(sum(lengths) * dim)
    q, k, v = _heads(generator, dtype, len(lengths), heads, max(lengths), dim)
    lens = torch.tensor(lengths)
    got = attention(q, k, v, lens, dim ** -0.5)
    want = kernels.reference_padded_attention(q, k, v, lens, dim ** -0.5)
    assert got.dtype == dtype and got.shape == (len(lengths), max(lengths), heads, dim) and got.is_contiguous()
    torch.testing.assert_close(got.float(), want.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    # The padding really is masked: attending to every position gives another result.
    if min(lengths) < max(lengths):
        unmasked = kernels.reference_padded_attention(q, k, v, torch.full_like(lens, max(lengths)), dim ** -0.5)
        assert (unmasked.float() - want.float()).abs().max() > 10 * TOLERANCE[dtype]


@DTYPES
def test_a_text_gets_the_same_bits_alone_and_batched(attention, dtype):
    generator = torch.Generator().manual_seed(7)
    q, k, v = _heads(generator, dtype, 5, 12, 80, 32)
    lens = torch.tensor([80, 41, 66, 3, 79])
    batched = attention(q, k, v, lens, 32 ** -0.5)
    for b, n in enumerate(lens.tolist()):
        # Alone, cut to its own length: its positions' results, bit for bit.
        alone = attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n], lens[b:b + 1], 32 ** -0.5)
        assert torch.equal(alone[0], batched[b, :n])


def test_lengths_outside_the_texts_are_refused(attention):
    q, k, v = _heads(torch.Generator().manual_seed(0), torch.float32, 2, 2, 8, 32)
    for bad in ([8, 0], [9, 8]):
        with pytest.raises(RuntimeError, match="a length outside 1..L"):
            attention(q, k, v, torch.tensor(bad), 1.0)
    with pytest.raises(RuntimeError, match="int64 lengths"):
        attention(q, k, v, torch.tensor([8]), 1.0)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        attention(q.half(), k.half(), v.half(), torch.tensor([8, 8]), 1.0)


def test_threads_asking_for_the_library_at_once_load_it_one_at_a_time(monkeypatch):
    # An engine's start and MiniLM's two threads may ask first at the same
    # time; a build's temporary files are named by the process, so two builds
    # at once in one process would write the same files.
    import threading
    import time

    inside, most = [0], [0]

    def slow_load(kernel_dir):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        inside[0] -= 1
        return True

    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_load", slow_load)
    results = []
    threads = [threading.Thread(target=lambda: results.append(kernels.load_kernels("/nonexistent")))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 4 and most[0] == 1
