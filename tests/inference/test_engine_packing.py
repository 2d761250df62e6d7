"""fp32 weights packed for MKL's sgemm (EngineConfig.pack_weights, inference.packing):
the packed matmul computes the same products, the engine packs only where it
can, and packed or not it keeps HF generate's greedy tokens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference import EngineConfig, SamplingParams
from inference import packing
from inference.formats import choose_cpu_format

needs_mkl = pytest.mark.skipif(not packing.MKL_PACKING, reason="this torch has no MKL sgemm packing")


@needs_mkl
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 32, 200])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_packed_linear_computes_the_linear_product(rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    x = torch.randn(rows, 80, generator=generator)
    packed = packing.pack_weight(weight)
    got = packing.packed_linear(x, packed, weight, bias)
    assert got.shape == (rows, 96)
    # One fp32 dot product per element either way; only the summation order may differ.
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_the_engine_packs_fp32_weights_on_the_cpu_by_default(make_engine):
    assert EngineConfig().pack_weights is True
    assert make_engine().stats()["packed_weights"] is True
    assert make_engine(pack_weights=False).stats()["packed_weights"] is False


@pytest.mark.parametrize("settings", [
    pytest.param({"dtype": "bfloat16"}, id="bf16"),
    pytest.param({"quantization": "int8_weight_only"}, id="int8-weight-only"),
])
def test_other_formats_are_never_packed(make_engine, settings):
    assert make_engine(**settings).stats()["packed_weights"] is False


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
def test_packed_or_not_the_engine_keeps_hf_greedy_tokens(make_engine, prompts, expected, greedy, pack):
    # All prompts at once: prefill chunks and decode batches of many row counts.
    engine = make_engine(pack_weights=pack, max_num_batched_tokens=128)
    got = [c.token_ids for c in engine.generate(prompts, greedy)]
    assert got == expected


@needs_mkl
def test_auto_format_times_fp32_as_the_engine_runs_it(reference_model):
    report = choose_cpu_format(reference_model, pack_fp32=True)
    assert report.fp32_packed and "fp32 packed for MKL" in report.summary()
    assert not choose_cpu_format(reference_model).fp32_packed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_batched_and_packed_gives_hf_generate_tokens(smollm2_engine, smollm2_dir):
    """The real model, whose logits are closer together than the tiny one's:
    four chats decoded together on packed weights, their decode attention read
    in place from the paged cache (inference.kernels), against HF generate, one
    at a time."""
    from transformers import AutoModelForCausalLM

    from inference import kernels

    assert smollm2_engine.stats()["packed_weights"] is packing.MKL_PACKING
    assert smollm2_engine.stats()["attention_kernel"] is (kernels._compiler() is not None)
    questions = ["What is the capital of France?", "Write a haiku about autumn.",
                 "Explain what a prime number is.", "Name three colours of the rainbow."]
    prompts = [smollm2_engine.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    got = [c.token_ids for c in smollm2_engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=32, do_sample=False, pad_token_id=eos)
        # HF keeps the EOS it stopped on; the engine's completion does not carry it.
        assert [t for t in tokens if t != eos] == [t for t in out[0, len(prompt):].tolist() if t != eos]
