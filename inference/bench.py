"""python -m inference.bench: the engine against the Hugging Face peers on SmolLM2.

Workloads (one process, one run, same model, dtype and threads for everyone):
  A offline throughput, B Poisson arrivals with streaming, C shared-prefix TTFT
  with prefix caching on/off, D 20% of streams aborted midway; plus the decode
  step at 32 concurrent sequences against the measured matmul roofline.
Prints markdown tables and writes the engine section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from inference import Engine, EngineConfig, SamplingParams
from inference import bench_peers as peers
from inference import bench_report as report


def workload_requests(count: int, rng: random.Random, vocab: int, out_range=(32, 256)) -> list[tuple[list[int], int]]:
    """Prompt and output lengths uniform in [32, 256]; random token ids (EOS is ignored)."""
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(32, 256))], rng.randint(*out_range))
            for _ in range(count)]


def exact(num_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True, **extra)


def run_offline(engine: Engine, requests) -> dict:
    started = time.perf_counter()
    completions = engine.generate([p for p, _ in requests], [exact(n) for _, n in requests])
    elapsed = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for c in completions)
    return {"requests": len(requests), "output_tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _stream(engine: Engine, prompt, params, delay_s: float, abort_after: int | None = None) -> dict:
    await asyncio.sleep(delay_s)
    submitted = time.perf_counter()
    handle = engine.submit(prompt, params)
    stamps, tokens, final = [], [], None
    async for event in handle:
        if event.finished:
            final = event
            break
        if event.token_ids:
            stamps.append(time.perf_counter())
            tokens.extend(event.token_ids)
            if abort_after is not None and len(tokens) == abort_after:
                engine.abort(handle.request_id)
    return {"submitted": submitted, "stamps": stamps, "tokens": tokens, "final": final}


def run_online(engine: Engine, requests, rate: float, rng: random.Random) -> dict:
    delays, clock = [], 0.0
    for _ in requests:
        clock += rng.expovariate(rate)
        delays.append(clock)

    async def main():
        return await asyncio.gather(*(_stream(engine, p, exact(n), d) for (p, n), d in zip(requests, delays)))

    started = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - started
    ttfts = [r["stamps"][0] - r["submitted"] for r in results]
    itls = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(len(r["tokens"]) for r in results)
    return {"rate": rate, "requests": len(requests), "ttft_p50": percentile(ttfts, 50),
            "ttft_p99": percentile(ttfts, 99), "itl_p50": percentile(itls, 50), "itl_p99": percentile(itls, 99),
            "tok_s": tokens / elapsed, "seconds": elapsed}


def run_prefix(model, tokenizer, config: EngineConfig, count: int, enable: bool) -> dict:
    """A shared 256-token system prompt plus a unique question; requests one after
    another so TTFT is pure prefill latency."""
    system = tokenizer.encode("You are a helpful, careful assistant for a small company. " * 40)[:256]
    questions = [f"Question {i}: what is {i} times {i + 3}, and why does it matter for the team?" for i in range(count)]
    engine = Engine(model, tokenizer, dataclasses.replace(config, enable_prefix_caching=enable, kv_cache_bytes=256 * 2**20))
    try:
        engine.generate([system[:64] + [5]], exact(1))  # warm-up on an unrelated prefix
        ttfts = []
        for question in questions:
            completion = engine.generate([system + tokenizer.encode(question)], exact(16))[0]
            ttfts.append(completion.metrics.ttft_s)
        stats = engine.stats()
    finally:
        engine.shutdown()
    return {"prefix_caching": "on" if enable else "off", "requests": count, "ttft_mean": statistics.mean(ttfts),
            "ttft_p50": percentile(ttfts, 50), "hit_rate": stats["prefix_cache_hit_rate"]}


def run_abort(engine: Engine, requests, rng: random.Random) -> dict:
    reference = [c.token_ids for c in engine.generate([p for p, _ in requests], [exact(n) for _, n in requests])]
    doomed = set(rng.sample(range(len(requests)), k=max(1, len(requests) // 5)))

    async def main():
        return await asyncio.gather(*(
            _stream(engine, p, exact(n), 0.0, abort_after=n // 2 if i in doomed else None)
            for i, (p, n) in enumerate(requests)))

    started = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - started
    time.sleep(0.1)  # blocks are freed on the engine thread right after the final events
    kept = [i for i in range(len(requests)) if i not in doomed]
    stats = engine.stats()
    return {"streams": len(requests), "aborted": len(doomed),
            "aborted_final": sum(results[i]["final"].finish_reason == "abort" for i in doomed),
            "others_exact": sum(results[i]["tokens"] == reference[i] for i in kept), "others": len(kept),
            "kv_blocks_used_after": stats["kv_blocks_used"], "running_after": stats["running"],
            "waiting_after": stats["waiting"], "tok_s": sum(len(r["tokens"]) for r in results) / elapsed}


def run_roofline(engine: Engine, peak_flops: float, rng: random.Random, steps: int) -> dict:
    """Engine steps whose batch is exactly 32 decode tokens (32 running sequences)."""
    durations = []

    def observe(batch, duration_s):
        if len(batch.seqs) == 32 and batch.num_tokens == 32:
            durations.append(duration_s)

    engine.step_observer = observe
    engine.generate([[rng.randrange(100, 40000) for _ in range(128)] for _ in range(32)], exact(steps))
    engine.step_observer = None
    step_s = statistics.median(durations)
    achieved = 2 * engine.runner.matmul_params * 32 / step_s
    best_s = min(durations)
    flops_per_step = 2 * engine.runner.matmul_params * 32
    return {"decode_steps": len(durations), "step_ms": step_s * 1000, "achieved_gflops": achieved / 1e9,
            "peak_gflops": peak_flops / 1e9, "roofline_pct": 100 * achieved / peak_flops,
            "best_step_ms": best_s * 1000, "best_roofline_pct": 100 * flops_per_step / best_s / peak_flops}


def with_load(result: dict) -> dict:
    """Tag a result with the 1-minute load average at its end: the box is shared,
    and a load well above our own thread count means someone else was running."""
    result["load_1m"] = os.getloadavg()[0]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model dir (default: the bundled SmolLM2, converted once under var/models)")
    parser.add_argument("--quick", action="store_true", help="small request counts: a smoke run in ~3 minutes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for everyone")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peers", action="store_true", help="engine workloads only")
    parser.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file to write ('' to skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = args.model or _bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)
    quick = args.quick
    sizes = {"A": 16 if quick else 64, "hf1": 2 if quick else 4, "static": 16 if quick else 32,
             "cb": 8 if quick else 32, "B": 6 if quick else 16, "C": 4 if quick else 12,
             "D": 10 if quick else 30, "roof_steps": 16 if quick else 48}
    rng = random.Random(args.seed)
    config = EngineConfig(kv_cache_bytes=2 * 2**30, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_batched_tokens, num_threads=args.threads,
                          model_name=Path(model_dir).name)
    results = {"machine": peers.machine_info(args.threads), "sizes": sizes, "config": config,
               "command": "python -m inference.bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    log = lambda *parts: print(*parts, file=sys.stderr, flush=True)  # noqa: E731
    log("measuring matmul FLOP/s ...")
    results["peak_flops"] = peers.matmul_flops()
    a_requests = workload_requests(sizes["A"], rng, vocab)
    engine = Engine(model, tokenizer, config)
    try:
        engine.generate([a_requests[0][0]], exact(4))  # warm-up
        log("A: engine ...")
        results["A_engine"] = with_load(run_offline(engine, a_requests))
        log("roofline at 32 decoding sequences ...")
        results["roofline"] = with_load(run_roofline(engine, results["peak_flops"], rng, sizes["roof_steps"]))
        results["B"] = []
        for rate in (0.5, 1.0, 2.0, 4.0):
            log(f"B: {rate} req/s ...")
            b_requests = workload_requests(sizes["B"], rng, vocab, out_range=(32, 128))
            results["B"].append(run_online(engine, b_requests, rate, rng))
        log("D: aborts ...")
        results["D"] = run_abort(engine, workload_requests(sizes["D"], rng, vocab, out_range=(32, 128)), rng)
    finally:
        engine.shutdown()
    log("C: shared prefix ...")
    results["C"] = [run_prefix(model, tokenizer, config, sizes["C"], enable) for enable in (False, True)]
    if not args.skip_peers:
        log("peer: HF generate one at a time ...")
        results["A_hf1"] = with_load(peers.hf_one_at_a_time(model, a_requests[:sizes["hf1"]]))
        log("peer: HF static batches of 16 ...")
        results["A_static"] = with_load(peers.hf_static_batches(model, a_requests[:sizes["static"]]))
        log("peer: transformers continuous batching ...")
        results["A_cb"] = with_load(peers.hf_continuous_batching(model, a_requests[:sizes["cb"]]))
    results["machine"]["load_average_end"] = peers.machine_info(args.threads)["load_average"]
    text = report.render(results)
    print(text)
    if args.out:
        report.write_section(Path(args.out), text)
        log(f"wrote {args.out}")
    return 0


def _bundled_model_dir() -> str:
    from inference.bootstrap import resolve_model

    return resolve_model("bundled:smollm2", Path("var/models"), progress=lambda *a: print(*a, file=sys.stderr))


if __name__ == "__main__":
    raise SystemExit(main())
