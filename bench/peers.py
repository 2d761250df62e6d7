"""The engine benchmark's yardsticks: the machine's matmul FLOP/s and the Hugging
Face peers (generate one at a time, static padded batches, transformers'
continuous batching)."""
from __future__ import annotations

import time

import torch


def matmul_flops(dtype=torch.float32, seconds_per_size: float = 1.5) -> float:
    """The best fp32 matmul rate over a few square sizes (FLOP/s): the compute roofline."""
    best = 0.0
    for size in (1024, 2048, 3072):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < seconds_per_size:
            fastest = time.perf_counter()
            a @ b
            fastest = time.perf_counter() - fastest
            best = max(best, 2 * size**3 / fastest)
            runs += 1
    return best


def _exact_length_kwargs(model, num_tokens: int) -> dict:
    # min_new_tokens == max_new_tokens: EOS is suppressed, like our ignore_eos.
    return {"max_new_tokens": num_tokens, "min_new_tokens": num_tokens, "do_sample": False,
            "pad_token_id": 0, "eos_token_id": model.generation_config.eos_token_id}


@torch.inference_mode()
def hf_one_at_a_time(model, requests: list[tuple[list[int], int]]) -> dict:
    model.generate(torch.tensor([requests[0][0][:8]]), **_exact_length_kwargs(model, 4))  # warm-up
    tokens, started = 0, time.perf_counter()
    for prompt, num_out in requests:
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             **_exact_length_kwargs(model, num_out))
        tokens += out.shape[1] - len(prompt)
    elapsed = time.perf_counter() - started
    return {"requests": len(requests), "output_tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


@torch.inference_mode()
def hf_static_batches(model, requests: list[tuple[list[int], int]], batch_size: int = 16) -> dict:
    """Left-padded batches; each batch runs to its longest output, so shorter
    requests cost steps they do not use. Counts useful tokens only."""
    useful, started = 0, time.perf_counter()
    for first in range(0, len(requests), batch_size):
        chunk = requests[first:first + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        model.generate(ids, attention_mask=mask, **_exact_length_kwargs(model, max(n for _, n in chunk)))
        useful += sum(n for _, n in chunk)
    elapsed = time.perf_counter() - started
    return {"requests": len(requests), "output_tokens": useful, "seconds": elapsed, "tok_s": useful / elapsed}


@torch.inference_mode()
def hf_continuous_batching(model, requests: list[tuple[list[int], int]]) -> dict:
    """transformers' own continuous batching manager (what generate_batch drives),
    with each request's own max_new_tokens and EOS disabled."""
    from transformers import GenerationConfig

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
    tokens = sum(done.values())
    return {"requests": len(requests), "output_tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}
