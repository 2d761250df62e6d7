"""The engine on a CUDA device: the guarantees the CPU suite checks, on the
GPU, and decode steps replayed from CUDA graphs (EngineConfig.cuda_graphs)
against the same steps run eagerly.

CI has no GPU, so this module is skipped there; a session lent one runs it
(`ENGINE_TEST_DEVICE` unset picks CUDA when torch sees it). With
ENGINE_TEST_DEVICE=cpu the tests that do not need CUDA run on the CPU, which
checks the tests themselves on a machine without a GPU.
"""
from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

from inference import SamplingParams

from .conftest import MAX_NEW_TOKENS, batched_and_alone, hf_greedy, stop_frees_its_slot_within_one_step

DEVICE = os.environ.get("ENGINE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = [pytest.mark.skipif(not DEVICE, reason="no CUDA device (ENGINE_TEST_DEVICE=cpu runs it on the CPU)"),
              pytest.mark.timeout(300)]
needs_cuda = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs need a CUDA device")

REDUCED = [
    pytest.param({"dtype": "bfloat16"}, id="bf16"),
    pytest.param({"dtype": "float16"}, id="fp16"),
    pytest.param({"dtype": "bfloat16", "quantization": "int8_weight_only"}, id="bf16-int8-weight-only"),
    pytest.param({"dtype": "bfloat16", "quantization": "int4_weight_only"}, id="bf16-int4-weight-only"),
]


@pytest.fixture(scope="module", autouse=True)
def exact_fp32_matmuls():
    """TF32 rounds fp32 matmul inputs to 10 mantissa bits on Ampere and later;
    the fp32 guarantee (HF generate's tokens) is for fp32 as written."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def device_reference(reference_model):
    return copy.deepcopy(reference_model).to(DEVICE)


@pytest.fixture(scope="module")
def device_expected(device_reference, prompts):
    """HF generate on DEVICE, one prompt at a time: fp32's ground truth there."""
    return [hf_greedy(device_reference, p) for p in prompts]


@pytest.fixture
def engine_on(make_engine):
    """Engines on DEVICE over private copies of the reference weights."""
    return functools.partial(make_engine, device=DEVICE)


def _tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


GREEDY = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)


@pytest.mark.parametrize("overrides", [
    pytest.param({}, id="batched"),
    # 12 blocks of 16 fp32 tokens (3 layers x K and V x 2 heads x 16 dims x 4 bytes): 16 requests cannot fit.
    pytest.param({"kv_cache_bytes": 12 * 12288, "max_num_batched_tokens": 512}, id="preempted"),
    pytest.param({"max_num_batched_tokens": 8}, id="chunked-prefill"),
])
def test_fp32_is_hf_generate_one_at_a_time(engine_on, device_expected, prompts, overrides):
    engine = engine_on(dtype="float32", **overrides)
    assert _tokens(engine.generate(prompts, GREEDY)) == device_expected
    if "kv_cache_bytes" in overrides:
        assert engine.stats()["preemptions"] > 0
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("settings", REDUCED)
def test_reduced_precision_batched_equals_alone(engine_on, prompts, settings):
    batched, alone = batched_and_alone(engine_on(**settings), prompts, GREEDY)
    assert batched == alone


def _mixed_lengths(engine, prompts) -> list[list[int]]:
    """Requests of different lengths, so that the batch shrinks step by step
    and the decode steps need graphs of several batch sizes."""
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))]
    return _tokens(engine.generate(prompts, params))


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_steps_give_the_eager_steps_tokens(engine_on, prompts, dtype):
    eager = _mixed_lengths(engine_on(dtype=dtype), prompts)
    graphed_engine = engine_on(dtype=dtype, cuda_graphs=True)
    assert _mixed_lengths(graphed_engine, prompts) == eager
    captured = graphed_engine.runner.graphs.graphs
    assert len({rows for rows, _width in captured}) > 2, captured.keys()  # the shrinking batch used several
    # Padded rows wrote only into the scratch block: every real block is handed back.
    assert graphed_engine.stats()["kv_blocks_used"] == 0


@needs_cuda
def test_cuda_graphs_keep_fp32_on_hf_generate(engine_on, device_expected, prompts):
    assert _tokens(engine_on(dtype="float32", cuda_graphs=True).generate(prompts, GREEDY)) == device_expected


@pytest.mark.parametrize("overrides", [
    pytest.param({"dtype": "bfloat16"}, id="bf16"),
    pytest.param({"dtype": "bfloat16", "cuda_graphs": True}, id="bf16-cuda-graphs", marks=needs_cuda),
])
def test_stopping_a_request_frees_its_slot_within_one_step(engine_on, overrides):
    stop_frees_its_slot_within_one_step(engine_on(max_num_seqs=1, **overrides))
