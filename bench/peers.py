"""The engine benchmark's yardsticks: the machine's matmul rate in each number
format and the Hugging Face peers (generate one at a time, static padded
batches, transformers' continuous batching), in any dtype, on CPU or CUDA.
"""
from __future__ import annotations

import threading
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def on_own_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a short-lived thread with the caller's torch
    thread count; returns its result or raises its exception.

    The engine under test must keep the process's only lasting OpenMP team, as
    it does in the server: a team started on the main thread (an HF load, a
    peer's generate, a peak matmul) stays for the process's life and puts the
    engine thread's workers to sleep between parallel regions (one fp32
    stream's step 44 ms before the main thread's team existed, 62 ms after;
    inference.engine). A thread's team ends with the thread."""
    threads = torch.get_num_threads()
    outcome: dict = {}

    def run():
        torch.set_num_threads(threads)
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised on the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"bench-{getattr(fn, '__name__', 'work')}")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def sync(device: str) -> None:
    """CUDA runs asynchronously: a timer must wait for the queued kernels."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _square_operands(size: int, dtype: str, device: str):
    if dtype == "int8":
        # The kernel the engine's CPU int8 path runs (inference.quantization).
        a = torch.randint(-127, 128, (size, size), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (size, size), dtype=torch.int8, device=device)
        return lambda: torch._int_mm(a, b)
    if dtype == "int8_weight_only":
        # The CPU weight-only kernel: bf16 activations times int8 weights.
        a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
        b = torch.randint(-127, 128, (size, size), dtype=torch.int8, device=device)
        scales = torch.rand(size, dtype=torch.bfloat16, device=device)
        return lambda: torch.ops.aten._weight_int8pack_mm(a, b, scales)
    if dtype == "int4_weight_only":
        # The CPU int4 kernel: bf16 activations times 4-bit weights in groups of 32.
        from inference.quantization import INT4_GROUP_SIZE, pack_int4, quantize_weight_int4  # noqa: PLC0415

        a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
        packed, scales_offsets = pack_int4(*quantize_weight_int4(torch.randn(size, size)), torch.device(device))
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, INT4_GROUP_SIZE, scales_offsets)
    a = torch.randn(size, size, dtype=DTYPES[dtype], device=device)
    b = torch.randn(size, size, dtype=DTYPES[dtype], device=device)
    return lambda: a @ b


def _square_products(size: int, dtype: str, device: str) -> list:
    """Every way the engine may run a matmul in this format. fp32 on the CPU
    also runs on weights packed once for MKL or oneDNN (inference.packing):
    oneDNN's packed matmul reached 189-199 GFLOP/s on a 2-core EPYC where
    torch.mm reached 128-136, and a peak the engine's own kernel beats would
    flatter its share of the roofline."""
    products = [_square_operands(size, dtype, device)]
    if dtype == "float32" and device == "cpu":
        from inference import packing  # noqa: PLC0415

        a = torch.randn(size, size)
        weight = torch.randn(size, size)
        for packer in packing.PACKERS:
            packed = packing.pack_weight(weight, packer)
            products.append(lambda packed=packed, packer=packer: packing.packed_matmul(a, packed, weight, packer))
    return products


def matmul_flops(dtype: str = "float32", device: str = "cpu", seconds_per_size: float = 1.0) -> float:
    """The best square-matmul rate in one format (FLOP/s, or int8 OP/s): the
    compute roofline a decode step is measured against. CUDA gets larger sizes,
    as small ones leave most of a GPU idle."""
    sizes = (4096, 8192) if device.startswith("cuda") else (1024, 2048, 3072)
    best = 0.0
    for size in sizes:
        for product in _square_products(size, dtype, device):
            product()  # warm-up: oneDNN builds its kernel, CUDA loads its library
            sync(device)
            runs, started = 0, time.perf_counter()
            while runs < 3 or time.perf_counter() - started < seconds_per_size:
                fastest = time.perf_counter()
                product()
                sync(device)
                best = max(best, 2 * size**3 / (time.perf_counter() - fastest))
                runs += 1
    return best


def read_bandwidth(device: str = "cpu", seconds: float = 1.0) -> float:
    """The best rate at which the torch threads read a buffer far larger than
    the caches (bytes/s): the memory ceiling of the roofline. A decode step
    reads every matmul weight and each sequence's KV once; when those bytes
    take longer at this rate than the FLOPs at the matmul peak, the step is
    memory-bound and this, not the peak, is its ceiling. A sum reads each
    element once and writes nothing (1 GiB: four times the largest L3 seen
    here, 260 MiB; CUDA gets 4 GiB, past any GPU's L2)."""
    size = (4 if device.startswith("cuda") else 1) * 2**30
    buffer = torch.ones(size // 4, dtype=torch.float32, device=device)
    buffer.sum()  # warm-up: pages touched, threads up
    sync(device)
    best, runs, started = 0.0, 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < seconds:
        fastest = time.perf_counter()
        buffer.sum()
        sync(device)
        best = max(best, size / (time.perf_counter() - fastest))
        runs += 1
    return best


# A peer "quantization" for the engine's bf16 prompts (EngineConfig.bf16_prompts
# under "bf16_weight_only"): load_model gives HF the same format.
BF16_PROMPTS = "bf16_prompts"
# int8 weights with bf16 prompts: the same, over the int8 weights times their
# scales (decode rows over those in fp32, as small_linear multiplies them).
INT8_PROMPTS = "int8_prompts"


class PromptsInBf16Linear(torch.nn.Module):
    """An nn.Linear as the engine runs it with bf16 prompts: a forward over
    several positions of a sequence (HF generate's prefill) multiplies bf16
    activations by the bf16 weight (oneDNN, as the engine), one position (a
    decode step) fp32 activations by the weight rounded to bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rounded: bool = True):
        super().__init__()
        self.half = weight.detach().bfloat16()
        # Decode rows: over the weight rounded to bf16, or (rounded False) as given.
        self.rounded = self.half.float() if rounded else weight.detach()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.size(1) > 1:
            y = torch.nn.functional.linear(x.bfloat16(), self.half).float()
            return y if self.bias is None else y + self.bias
        return torch.nn.functional.linear(x, self.rounded, self.bias)


def peer_quantization(quantization: str, bf16_prompts: bool) -> str:
    """The load_model quantization for an engine row (its bf16 prompts included)."""
    if bf16_prompts:
        return INT8_PROMPTS if quantization == "int8_weight_only" else BF16_PROMPTS
    return quantization


def load_model(model_dir: str, dtype: str, quantization: str, device: str):
    """A fresh HF model in the engine row's format. int8 on CPU is torch's
    dynamic quantization of every nn.Linear (fbgemm/oneDNN int8 GEMMs with
    int8 activations, as the engine's int8 does); int8 weight-only on CPU
    swaps every nn.Linear for the engine's own weight-only kernel (torchao,
    HF's route to it, is not installed; it calls the same aten op), and int4
    weight-only likewise (its lm_head at int8 weight-only, as the engine);
    BF16_PROMPTS: the layers as PromptsInBf16Linear, the lm_head on rounded
    weights (the engine's keeps fp32 activations); INT8_PROMPTS likewise over
    the int8 weights times their scales; None where HF has no int8
    path to compare with (CUDA)."""
    if quantization != "none" and device != "cpu":
        return None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    if quantization in (BF16_PROMPTS, INT8_PROMPTS):
        from bench.quality import hf_variant  # noqa: PLC0415 - only these peers need it

        int8 = quantization == INT8_PROMPTS
        # The lm_head's rounded (or int8) weights, fp32 activations.
        model = hf_variant(model, dtype, "int8_small" if int8 else "bf16_weight_only")
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if int8 and hasattr(child, "weight_dequantized"):  # bench.quality's QuantLinear
                        setattr(parent, name, PromptsInBf16Linear(child.weight_dequantized, child.bias, rounded=False))
                    elif hasattr(child, "weight_rounded"):
                        setattr(parent, name, PromptsInBf16Linear(child.weight_rounded, child.bias))
        return model
    if quantization in ("int8_weight_only", "int4_weight_only", "bf16_weight_only"):
        from bench.quality import hf_variant  # noqa: PLC0415 - only this peer needs it

        return hf_variant(model, dtype, quantization)
    if quantization != "none":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def _exact_length_kwargs(model, num_tokens: int) -> dict:
    # min_new_tokens == max_new_tokens: EOS is suppressed, like our ignore_eos.
    return {"max_new_tokens": num_tokens, "min_new_tokens": num_tokens, "do_sample": False,
            "pad_token_id": 0, "eos_token_id": model.generation_config.eos_token_id}


def _result(requests: list, tokens: int, elapsed: float) -> dict:
    return {"requests": len(requests), "output_tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


@torch.inference_mode()
def hf_one_at_a_time(model, requests: list[tuple[list[int], int]], device: str = "cpu") -> dict:
    model.generate(torch.tensor([requests[0][0][:8]], device=device), **_exact_length_kwargs(model, 4))  # warm-up
    sync(device)
    tokens, started = 0, time.perf_counter()
    for prompt, num_out in requests:
        out = model.generate(torch.tensor([prompt], device=device),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                             **_exact_length_kwargs(model, num_out))
        tokens += out.shape[1] - len(prompt)
    sync(device)
    return _result(requests, tokens, time.perf_counter() - started)


@torch.inference_mode()
def hf_static_batches(model, requests: list[tuple[list[int], int]], batch_size: int = 16,
                      device: str = "cpu") -> dict:
    """Left-padded batches; each batch runs to its longest output, so shorter
    requests cost steps they do not use. Counts useful tokens only."""
    model.generate(torch.tensor([requests[0][0][:8]] * 2, device=device), **_exact_length_kwargs(model, 2))
    sync(device)
    useful, started = 0, time.perf_counter()
    for first in range(0, len(requests), batch_size):
        chunk = requests[first:first + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        model.generate(ids.to(device), attention_mask=mask.to(device),
                       **_exact_length_kwargs(model, max(n for _, n in chunk)))
        useful += sum(n for _, n in chunk)
    sync(device)
    return _result(requests, useful, time.perf_counter() - started)


@torch.inference_mode()
def hf_continuous_batching(model, requests: list[tuple[list[int], int]]) -> dict:
    """transformers' own continuous batching manager (what generate_batch drives),
    with each request's own max_new_tokens and EOS disabled."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in requests),
                              eos_token_id=None, pad_token_id=0)
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=600) as manager:
        manager.add_request(requests[0][0][:8], max_new_tokens=2)  # warm-up inside the manager
        manager.get_result(timeout=600)
        started = time.perf_counter()
        ids = [manager.add_request(prompt, max_new_tokens=n) for prompt, n in requests]
        done = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=600)
            if result is None:
                break
            if result.is_finished():
                done[result.request_id] = len(result.generated_tokens)
        elapsed = time.perf_counter() - started
    return _result(requests, sum(done.values()), elapsed)
