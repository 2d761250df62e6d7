"""fp32 weights packed for MKL's or oneDNN's GEMM (EngineConfig.pack_weights,
inference.packing): each packed matmul computes the same products, the engine
packs only where it can and, left to choose, keeps the packer its start-up
measurement found fastest, and packed or not it keeps HF generate's greedy tokens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference import Engine, EngineConfig, SamplingParams
from inference import packing
from inference.formats import choose_cpu_format

needs_mkl = pytest.mark.skipif(not packing.MKL_PACKING, reason="this torch has no MKL sgemm packing")
packers = [pytest.param(name, marks=pytest.mark.skipif(name not in packing.PACKERS, reason=f"no {name} in this torch"))
           for name in ("mkl", "onednn")]


@pytest.mark.parametrize("packer", packers)
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 32, 200])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_a_packed_linear_computes_the_linear_product(packer, rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    x = torch.randn(rows, 80, generator=generator)
    packed = packing.pack_weight(weight, packer)
    if packer == "mkl":
        got = packing.packed_linear(x, packed, weight, bias)
    else:
        got = packing.onednn_linear(x, packed, bias)
    assert got.shape == (rows, 96)
    # One fp32 dot product per element either way; only the summation order may differ.
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packer", packers)
def test_the_engine_packs_for_the_packer_it_is_given(make_engine, packer):
    stats = make_engine(pack_backend=packer).stats()
    assert stats["packed_weights"] is True and stats["weight_packing"] == packer
    assert make_engine(pack_backend=packer, pack_weights=False).stats()["weight_packing"] == "none"


def test_left_to_choose_the_engine_packs_for_the_packer_measured_fastest(make_engine, reference_model):
    assert EngineConfig().pack_weights is True and EngineConfig().pack_backend == "auto"
    choice = packing.choose_packer(packing.layer_shapes(reference_model.config))
    assert set(choice.times_ms) == {"unpacked", *packing.PACKERS}
    stats = make_engine().stats()
    assert stats["weight_packing"] == (choice.packer or "none")
    assert stats["packed_weights"] is (choice.packer is not None)


def test_a_packer_is_kept_only_when_it_beats_f_linear(monkeypatch):
    shapes = ((96, 64), (64, 96))
    monkeypatch.setattr(packing, "PACK_MIN_GAIN", 0.0)  # no packer can take no time
    assert packing.choose_packer.__wrapped__(shapes, rows=(1, 8), copies=1, rounds=1).packer is None
    monkeypatch.setattr(packing, "PACK_MIN_GAIN", 1e9)  # any packer will do: the fastest is kept
    choice = packing.choose_packer.__wrapped__(shapes, rows=(1, 8), copies=1, rounds=1)
    relative = {p: sum(choice.times_ms[p][n] / choice.times_ms["unpacked"][n] for n in (1, 8)) for p in packing.PACKERS}
    assert choice.packer == min(relative, key=relative.get)
    assert choice.packer in choice.summary()


def test_an_unknown_or_missing_packer_is_a_clear_error(make_engine, monkeypatch):
    with pytest.raises(ValueError, match="pack_backend"):
        EngineConfig(pack_backend="openblas")
    monkeypatch.setattr(packing, "PACKERS", ())
    with pytest.raises(ValueError, match="not available"):
        packing.resolve_packer("mkl", None)


@pytest.mark.parametrize("settings", [
    pytest.param({"dtype": "bfloat16"}, id="bf16"),
    pytest.param({"quantization": "int8_weight_only"}, id="int8-weight-only"),
])
def test_other_formats_are_never_packed(make_engine, settings):
    assert make_engine(pack_backend="mkl", **settings).stats()["packed_weights"] is False


@pytest.mark.parametrize("settings", [
    pytest.param({"pack_backend": "mkl"}, id="mkl", marks=needs_mkl),
    pytest.param({"pack_backend": "onednn"}, id="onednn",
                 marks=pytest.mark.skipif(not packing.ONEDNN_PACKING, reason="no oneDNN")),
    pytest.param({"pack_weights": False}, id="unpacked"),
])
def test_packed_or_not_the_engine_keeps_hf_greedy_tokens(make_engine, prompts, expected, greedy, settings):
    # All prompts at once: prefill chunks and decode batches of many row counts.
    engine = make_engine(max_num_batched_tokens=128, **settings)
    got = [c.token_ids for c in engine.generate(prompts, greedy)]
    assert got == expected


@needs_mkl
def test_auto_format_times_fp32_as_the_engine_runs_it(reference_model):
    report = choose_cpu_format(reference_model, pack_fp32="mkl")
    assert report.fp32_packed == "mkl" and "fp32 packed for mkl" in report.summary()
    assert not choose_cpu_format(reference_model).fp32_packed


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir):
    """Four chats' prompts and HF generate's greedy tokens for them, one at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    questions = ["What is the capital of France?", "Write a haiku about autumn.",
                 "Explain what a prime number is.", "Name three colours of the rainbow."]
    # As Engine.apply_chat_template renders and encodes them.
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                              add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False) for q in questions]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=32, do_sample=False, pad_token_id=eos)
        outputs.append(out[0, len(prompt):].tolist())
    return prompts, outputs, eos


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("packer", packers)
def test_smollm2_batched_and_packed_gives_hf_generate_tokens(smollm2_dir, smollm2_reference, packer):
    """The real model, whose logits are closer together than the tiny one's:
    four chats decoded together on packed weights, their decode attention read
    in place from the paged cache (inference.kernels), against HF generate, one
    at a time."""
    from inference import kernels

    prompts, expected, eos = smollm2_reference
    with Engine.from_pretrained(smollm2_dir, EngineConfig(kv_cache_bytes=64 * 2**20, pack_backend=packer)) as engine:
        assert engine.stats()["weight_packing"] == packer
        assert engine.stats()["attention_kernel"] is (kernels._compiler() is not None)
        assert engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]) == prompts[0]
        got = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))]
    for tokens, reference in zip(got, expected):
        # HF keeps the EOS it stopped on; the engine's completion does not carry it.
        assert [t for t in tokens if t != eos] == [t for t in reference if t != eos]
