"""Engine fixtures: a tiny random-weight Llama (fp32, fixed seed), its HF
reference outputs, and the real SmolLM2 for end-to-end text."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from inference import Engine, EngineConfig, SamplingParams

VOCAB = 512
# The folder the suite's servers build the native kernels' library in
# (tests/env.py): the engines here load it from there, so a fresh machine builds it once.
KERNEL_DIR = os.environ.get("ENGINE_KERNEL_DIR")
MAX_NEW_TOKENS = 24


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        # A wider init than the default spreads the logits, so greedy argmax
        # never sits on a float near-tie between batched and unbatched math.
        initializer_range=0.08, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def reference_model():
    return tiny_llama()


def make_prompts(count: int = 16, seed: int = 7, min_len: int = 1, max_len: int = 90) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    device = next(model.parameters()).device  # the CUDA tests' reference lives on the GPU
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def chosen_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The log-probability the model gives each of `tokens` after the prompt (teacher-forced)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def one_stream_on(reference: torch.nn.Module, reference_model: torch.nn.Module, engine, prompts: list[list[int]],
                  max_tokens: int = 16) -> None:
    """Each prompt alone through a reduced-weights engine gives HF generate's
    greedy tokens on `reference` (the model as the format holds it); and the
    log-probabilities, which on this model tell the format's weights from fp32
    where the tokens may not, are `reference`'s to fp32 rounding (1e-4), by
    far closer than to the fp32 `reference_model`'s."""
    from inference import SamplingParams

    expected = [hf_greedy(reference, p, max_tokens) for p in prompts]
    done = [engine.generate([p], SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0))[0]
            for p in prompts]
    assert [c.token_ids for c in done] == expected
    for prompt, completion in zip(prompts, done):
        got = torch.tensor([lp.logprob for lp in completion.logprobs])
        on_reference = (got - chosen_logprobs(reference, prompt, completion.token_ids)).abs().max().item()
        on_fp32 = (got - chosen_logprobs(reference_model, prompt, completion.token_ids)).abs().max().item()
        assert on_reference < 1e-4 < on_fp32, (on_reference, on_fp32)


def batched_and_alone(engine, prompts: list[list[int]], params) -> tuple[list, list]:
    """The engine's tokens for each prompt, all in one generate and one at a time."""
    batched = [c.token_ids for c in engine.generate(prompts, params)]
    return batched, [engine.generate([p], params)[0].token_ids for p in prompts]


def half_precision_batched_and_alone(make_engine, prompts: list[list[int]], stat: str) -> tuple[list, list]:
    """A bf16 engine's 16 greedy tokens for each prompt, all at once and one at a
    time, with `stat` (a kernel the engine reports in stats()) on."""
    from inference import SamplingParams

    engine = make_engine(dtype="bfloat16", max_num_batched_tokens=128)
    assert engine.stats()[stat] is True
    return batched_and_alone(engine, prompts, SamplingParams(max_tokens=16, temperature=0.0))


def stop_frees_its_slot_within_one_step(engine) -> None:
    """On an engine of one slot: a request stopped mid-reply ends with "abort",
    and the request waiting behind it is admitted by the step after the one
    running when the abort arrived."""
    steps: list[set[str]] = []
    engine.step_observer = lambda batch, _duration: steps.append({s.request_id for s in batch.seqs})
    first, second = make_prompts(2, seed=51, min_len=8, max_len=8)
    hog = engine.submit(first, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), request_id="hog")
    waiting = engine.submit(second, SamplingParams(max_tokens=4, temperature=0.0), request_id="next")
    stopped_at = None
    for event in hog.iter_sync(timeout_s=60):
        if stopped_at is None and len(event.token_ids) > 0:
            stopped_at = len(steps)  # steps done when the abort is sent
            engine.abort("hog")
    assert event.finish_reason == "abort"
    assert waiting.result(timeout_s=60).finish_reason == "length"
    admitted = next(i for i, ids in enumerate(steps) if "next" in ids)
    # One step may already be running when the abort arrives; the one after admits the waiting request.
    assert admitted - stopped_at <= 1


@pytest.fixture(scope="session")
def prompts():
    return make_prompts()


@pytest.fixture(scope="session")
def expected(reference_model, prompts):
    """HF generate, one prompt at a time: the ground truth for greedy decoding."""
    return [hf_greedy(reference_model, p) for p in prompts]


@pytest.fixture
def make_engine(reference_model):
    """Build engines on a private copy of the reference weights; shut down after the test."""
    engines = []

    def build(**overrides) -> Engine:
        settings = {"kv_cache_bytes": 4 * 2**20, "max_num_batched_tokens": 256, "kernel_dir": KERNEL_DIR,
                    **overrides}
        engine = Engine(copy.deepcopy(reference_model), None, EngineConfig(**settings))
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.shutdown()


@pytest.fixture
def greedy():
    return SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir):
    engine = Engine.from_pretrained(smollm2_dir, EngineConfig(kv_cache_bytes=64 * 2**20, kernel_dir=KERNEL_DIR))
    yield engine
    engine.shutdown()
