"""python -m bench.engine: the engine against the Hugging Face peers, side by side in one run.

One process, one model (SmolLM2), one device (CUDA when present, else the
CPU), the same torch threads for every contender. For each number format the
engine runs in (fp32, bf16, int8, int8 weight-only, and "auto": what the engine picks by
measuring), the HF peers run in that same format:
  - 32 equal-length requests x 32 output tokens: the engine, HF static batching
    (one batch of 32) and HF generate one request at a time; the decode steps
    with all 32 sequences running give the step time against the roofline,
    with the peak matmul rate measured in that format;
  - one chat at a time (engine alone).
Format gains are their own table (each format against the engine in fp32), not
folded into the engine-versus-peer ratios. Then, in the format "auto" chose:
mixed lengths against HF static batching and transformers' continuous
batching; and on the engine's default format: B Poisson arrivals, C shared
prefix with prefix caching on/off, D 20% of streams aborted.
Every row carries the 1-minute load average at its start and end.
Prints markdown and writes the engine section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from bench import peers, report
from bench.engine_report import render
from bench.formats import engine_shapes
from inference import Engine, EngineConfig, SamplingParams
from inference.bootstrap import resolve_model
from inference.quantization import QUANT_PACKED_FP32, QUANT_PACKED_ONEDNN

HEADING = "## Engine (bench.engine)"
QUICK_OUT = "bench/scratch/engine_quick.md"
EQUAL_REQUESTS, EQUAL_PROMPT_TOKENS = 32, 128
CHAT_QUESTIONS = ("Explain in a few paragraphs how a bicycle's gears make climbing a hill easier.",
                  "Write a short story about a lighthouse keeper who finds a message in a bottle.",
                  "What should I check before buying a used car? Give me a detailed list.")


@dataclasses.dataclass
class Setup:
    """What every row shares: the model, the device, the workloads, and the
    measurements more than one row uses (peaks, HF peers of one format)."""
    model_dir: str
    tokenizer: object
    device: str
    config: EngineConfig  # dtype and quantization are replaced per row
    sizes: dict
    matmul_params: int  # per token, every layer weight and the lm_head
    vocab: int  # random prompt ids are drawn below it
    skip_peers: bool = False
    equal: list = dataclasses.field(default_factory=list)  # [(prompt ids, output tokens)]
    mixed: list = dataclasses.field(default_factory=list)
    peaks: dict = dataclasses.field(default_factory=dict)  # {"float32" | "bfloat16" | "float16" | "int8": FLOP/s}
    bandwidth: float = 0.0  # bytes/s read from memory (peers.read_bandwidth), measured once
    peer_rows: dict = dataclasses.field(default_factory=dict)  # {(dtype, quantization): {"static", "hf1"}}


def format_specs(device: str) -> list[tuple[str, str, str]]:
    """(label, EngineConfig.dtype, EngineConfig.quantization). int8 on the CPU
    computes in int8 (fp32 around it); int8-wo (weight-only) multiplies bf16
    activations by int8 weights there (fp32 around it), int4-wo by 4-bit
    weights (the same way); on CUDA all three are
    weight-only, so they are paired with bf16 activations there. bf16-w
    (CPU only) rounds the weights to bf16 and keeps fp32 everywhere else."""
    int8_dtype = "float32" if device == "cpu" else "bfloat16"
    cpu_only = [("bf16-w", "float32", "bf16_weight_only")] if device == "cpu" else []
    return [("fp32", "float32", "none"), ("bf16", "bfloat16", "none"), ("int8", int8_dtype, "int8"),
            ("int8-wo", int8_dtype, "int8_weight_only"), ("int4-wo", int8_dtype, "int4_weight_only"),
            *cpu_only, ("auto", "auto", "none")]


def workload_requests(count: int, rng: random.Random, vocab: int, out_range=(32, 256),
                      prompt_range=(32, 256)) -> list[tuple[list[int], int]]:
    """Random token ids (EOS is ignored) with lengths uniform in the ranges."""
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*out_range))
            for _ in range(count)]


def exact(num_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True, **extra)


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def measured(fn, *args, **kwargs) -> dict:
    """One row with the 1-minute load average at its start and end: the box is
    shared, and a load above our thread count means other work slowed the row."""
    load_start = os.getloadavg()[0]
    result = fn(*args, **kwargs)
    result.update(load_start=load_start, load_end=os.getloadavg()[0])
    return result


def peer_row(fn, *args, **kwargs) -> dict:
    try:
        # On a thread of its own: see peers.on_own_thread.
        return measured(peers.on_own_thread, fn, *args, **kwargs)
    except Exception as error:  # a peer broken by a transformers change must not lose a long run's other rows
        log(f"peer {fn.__name__} failed: {error!r}")
        return {"error": f"{type(error).__name__}: {error}"}


# ------------------------------------------------------------ engine workloads

def run_offline(engine: Engine, requests) -> dict:
    started = time.perf_counter()
    completions = engine.generate([p for p, _ in requests], [exact(n) for _, n in requests])
    elapsed = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for c in completions)
    return {"requests": len(requests), "output_tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


def run_equal(engine: Engine, requests) -> dict:
    """Offline throughput, timing on the side every step whose batch is exactly
    one decode token for each of the requests (all of them running)."""
    steps: list[float] = []

    def observe(batch, duration_s):
        if len(batch.seqs) == len(requests) and batch.num_tokens == len(requests):
            steps.append(duration_s)

    engine.step_observer = observe
    try:
        result = run_offline(engine, requests)
    finally:
        engine.step_observer = None
    return {**result, "decode_steps_s": steps}


def run_chats(engine: Engine, prompts: list[list[int]], num_tokens: int) -> dict:
    """One chat at a time, back to back; tok/s over the whole wall time, TTFT included."""
    ttfts, tokens, started = [], 0, time.perf_counter()
    for prompt in prompts:
        completion = engine.generate([prompt], exact(num_tokens))[0]
        tokens += len(completion.token_ids)
        ttfts.append(completion.metrics.ttft_s)
    elapsed = time.perf_counter() - started
    return {"chats": len(prompts), "output_tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "ttft_p50": report.percentile(ttfts, 0.5)}


def roofline(steps_s: list[float], matmul_params: int, batch: int, peak: float,
             bytes_read: int = 0, read_rate: float = 0.0) -> dict:
    """A decode step against its roofline: the longer of its FLOPs (2 x matmul
    parameters x tokens per step) at the format's matmul peak and the bytes it
    must read (every matmul weight in its stored format, and each sequence's
    KV) at the memory bandwidth. compute_pct is the step against the peak
    alone (the figure before the memory ceiling was measured)."""
    if not steps_s:
        return {"decode_steps": 0}
    flops = 2 * matmul_params * batch
    step_s, best_s = statistics.median(steps_s), min(steps_s)
    compute_s = flops / peak
    memory_s = bytes_read / read_rate if read_rate else 0.0
    roof_s = max(compute_s, memory_s)
    return {"decode_steps": len(steps_s), "step_ms": step_s * 1000, "best_step_ms": best_s * 1000,
            "achieved_gflops": flops / step_s / 1e9, "peak_gflops": peak / 1e9,
            "compute_pct": 100 * compute_s / step_s, "best_compute_pct": 100 * compute_s / best_s,
            "step_mb": bytes_read / 1e6, "bandwidth_gbs": read_rate / 1e9,
            "compute_ms": compute_s * 1000, "memory_ms": memory_s * 1000,
            "bound": "memory" if memory_s > compute_s else "compute",
            "roofline_pct": 100 * roof_s / step_s, "best_roofline_pct": 100 * roof_s / best_s}


def step_bytes(engine: Engine, batch: int, context: int) -> int:
    """What one decode step of `batch` sequences of `context` tokens must read:
    every matmul weight as the step reads it (quantized codes with their
    scales, the float weight, or small_linear's copies; the lm_head included)
    and each sequence's K and V."""
    net, runner = engine.runner.net, engine.runner
    kv = batch * context * runner.bytes_per_block // runner.block_size
    if 0 < batch <= net.small_rows and net.small_weights:
        # Steps this small run in small_linear (inference.kernels), over its
        # own copies: the bf16 ones under "bf16_weight_only".
        return sum(w.nbytes for layer in net.small_weights for w in layer) + net.lm_head_small.nbytes + kv
    if net.quant_mode in (QUANT_PACKED_FP32, QUANT_PACKED_ONEDNN):
        # Packed for MKL or oneDNN (inference.packing): the packed copy is
        # read, the unpacked weight beside it (in the scale slot) only for its
        # shape; the copy holds the weight's values (MKL's pads, but padding
        # is not read as weights), counted as the weight's size.
        weights = sum(w.nbytes for layer in net.weight_scales for w in layer) + net.lm_head.nbytes
        return weights + batch * context * runner.bytes_per_block // runner.block_size
    weights = sum(layer[slot].nbytes for layer in net.weights for slot in (1, 2, 4, 5))
    weights += sum(scale.nbytes for layer in net.weight_scales for scale in layer)
    if net.lm_head_quantized is not None:
        weights += net.lm_head_quantized[0].nbytes + net.lm_head_quantized[1].nbytes
    else:
        weights += net.lm_head.nbytes
    return weights + batch * context * runner.bytes_per_block // runner.block_size


def bandwidth(setup: Setup) -> float:
    """The memory's read rate, measured once per run."""
    if not setup.bandwidth:
        log("memory read bandwidth ...")
        setup.bandwidth = peers.on_own_thread(peers.read_bandwidth, setup.device)
    return setup.bandwidth


def peak(setup: Setup, kernel: str) -> float:
    """The square-matmul peak of one format, measured once per run."""
    if kernel not in setup.peaks:
        log(f"peak matmul rate, {kernel} ...")
        setup.peaks[kernel] = peers.on_own_thread(peers.matmul_flops, kernel, setup.device)
    return setup.peaks[kernel]


def peak_kernel(dtype: str, quantization: str, device: str, small_linear_rows: int | str = 0) -> str:
    # On the CPU int8 multiplies in int8 (torch._int_mm) and int8-wo in the
    # int8-weight kernel (aten._weight_int8pack_mm), unless small_linear runs
    # every step (its int8 copies widened to fp32: fp32 FMAs, fp32's peak);
    # elsewhere the weights are dequantized and the matmul runs in the
    # activation dtype.
    if device == "cpu" and quantization == "int8_weight_only" and small_linear_rows == "all":
        return dtype
    if device == "cpu" and quantization in ("int8", "int8_weight_only", "int4_weight_only"):
        return quantization
    return dtype


# ------------------------------------------------------------ rows

def run_format(setup: Setup, label: str, dtype: str, quantization: str, cuda_graphs: bool = False) -> dict:
    """The engine in one format: 32 x 32 equal lengths (with its decode steps
    against the roofline) and one chat at a time; with `cuda_graphs`, its
    decode steps replayed from CUDA graphs."""
    log(f"{label}{' + CUDA graphs' if cuda_graphs else ''}: engine ...")
    config = dataclasses.replace(setup.config, dtype=dtype, quantization=quantization, cuda_graphs=cuda_graphs)
    with Engine.from_pretrained(setup.model_dir, config) as engine:
        engine.generate([setup.equal[0][0]], exact(4))  # warm-up
        chats = [engine.apply_chat_template([{"role": "user", "content": q}])
                 for q in CHAT_QUESTIONS[:setup.sizes["chats"]]]
        # What the engine ran: "auto" may also have chosen bf16 weights (inference.formats).
        row = {"label": label, "cuda_graphs": cuda_graphs,
               "dtype": engine.config.dtype, "quantization": engine.config.quantization,
               "bf16_prompts": bool(engine.config.bf16_prompts),
               "small_linear_rows": engine.stats()["small_linear_rows"],
               "choice": engine.format_report.summary() if engine.format_report else None,
               "step_threads": engine.step_threads.summary(),  # which steps ran on one thread
               "engine": measured(run_equal, engine, setup.equal)}
        # The decode steps measured have all 32 sequences running, contexts from the
        # prompt to the prompt plus the output: the middle one stands for them.
        bytes_per_step = step_bytes(engine, len(setup.equal), EQUAL_PROMPT_TOKENS + setup.sizes["equal_out"] // 2)
        log(f"{label}: one chat at a time ...")
        row["chat"] = measured(run_chats, engine, chats, setup.sizes["chat_tokens"])
    kernel = peak_kernel(row["dtype"], row["quantization"], setup.device, row["small_linear_rows"])
    row["roofline"] = {"kernel": kernel, **roofline(row["engine"].pop("decode_steps_s"), setup.matmul_params,
                                                    len(setup.equal), peak(setup, kernel),
                                                    bytes_per_step, bandwidth(setup))}
    return row


def equal_peers(setup: Setup, dtype: str, quantization: str, bf16_prompts: bool = False) -> dict:
    """HF static batching (one batch of all 32) and HF one at a time in the same
    format (bf16 prompts included: bench.peers.PromptsInBf16Linear); run once
    per format ("auto" shares the row of the format it chose)."""
    quantization = peers.peer_quantization(quantization, bf16_prompts)
    key = (dtype, quantization)
    if key in setup.peer_rows:
        return {**setup.peer_rows[key], "shared": True}
    model = peers.on_own_thread(peers.load_model, setup.model_dir, dtype, quantization, setup.device)
    if model is None:
        missing = {"error": f"no HF {quantization} path on {setup.device}"}
        result = {"static": missing, "hf1": missing}
    else:
        log(f"peers in {dtype}/{quantization}: HF static batch of {len(setup.equal)} ...")
        result = {"static": peer_row(peers.hf_static_batches, model, setup.equal, batch_size=len(setup.equal),
                                     device=setup.device)}
        log(f"peers in {dtype}/{quantization}: HF generate one at a time ...")
        result["hf1"] = peer_row(peers.hf_one_at_a_time, model, setup.equal[:setup.sizes["hf1"]],
                                 device=setup.device)
    setup.peer_rows[key] = result
    return result


def run_mixed(setup: Setup, dtype: str, quantization: str = "none", bf16_prompts: bool = False) -> dict:
    """Mixed lengths in one format: the engine against HF static batches of 16
    and transformers' continuous batching (each on the first N requests). The
    peers run the dtype with the weights as loaded: under bf16_weight_only
    batches multiply fp32 weights too, so rounding them would not change the
    peers' speed; with bf16 prompts they multiply their prefills in bf16 as
    well (bench.peers.PromptsInBf16Linear, over the int8 weights times their
    scales under int8 weights)."""
    log(f"mixed lengths in {dtype}: engine ...")
    config = dataclasses.replace(setup.config, dtype=dtype, quantization=quantization,
                                 bf16_prompts=bf16_prompts or None)
    with Engine.from_pretrained(setup.model_dir, config) as engine:
        engine.generate([setup.mixed[0][0]], exact(4))  # warm-up
        result = {"dtype": dtype, "quantization": quantization, "bf16_prompts": bf16_prompts,
                  "engine": measured(run_offline, engine, setup.mixed)}
    if setup.skip_peers:
        return result
    model = peers.on_own_thread(peers.load_model, setup.model_dir, dtype,
                                peers.peer_quantization(quantization, True) if bf16_prompts else "none", setup.device)
    log(f"mixed lengths in {dtype}: HF static batches of 16 ...")
    result["static"] = peer_row(peers.hf_static_batches, model, setup.mixed[:setup.sizes["static_mixed"]],
                                batch_size=16, device=setup.device)
    log(f"mixed lengths in {dtype}: transformers continuous batching ...")
    result["cb"] = peer_row(peers.hf_continuous_batching, model, setup.mixed[:setup.sizes["cb"]])
    return result


# ------------------------------------------------------------ B, C, D: serving behaviour

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
    return {"rate": rate, "requests": len(requests), "ttft_p50": report.percentile(ttfts, 0.5),
            "ttft_p99": report.percentile(ttfts, 0.99), "itl_p50": report.percentile(itls, 0.5),
            "itl_p99": report.percentile(itls, 0.99), "tok_s": tokens / elapsed, "seconds": elapsed}


def run_prefix(setup: Setup, count: int, enable: bool) -> dict:
    """A shared 256-token system prompt plus a unique question; requests one after
    another so TTFT is pure prefill latency."""
    tokenizer = setup.tokenizer
    system = tokenizer.encode("You are a helpful, careful assistant for a small company. " * 40)[:256]
    questions = [f"Question {i}: what is {i} times {i + 3}, and why does it matter for the team?" for i in range(count)]
    config = dataclasses.replace(setup.config, enable_prefix_caching=enable, kv_cache_bytes=256 * 2**20)
    with Engine.from_pretrained(setup.model_dir, config) as engine:
        engine.generate([system[:64] + [5]], exact(1))  # warm-up on an unrelated prefix
        ttfts = [engine.generate([system + tokenizer.encode(q)], exact(16))[0].metrics.ttft_s for q in questions]
        hit_rate = engine.stats()["prefix_cache_hit_rate"]
    return {"prefix_caching": "on" if enable else "off", "requests": count, "ttft_mean": statistics.mean(ttfts),
            "ttft_p50": report.percentile(ttfts, 0.5), "hit_rate": hit_rate}


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


def run_serving(setup: Setup, rng: random.Random) -> dict:
    """B and D on one engine in its default format, C on engines of its own."""
    sizes, results = setup.sizes, {"B": []}
    with Engine.from_pretrained(setup.model_dir, dataclasses.replace(setup.config)) as engine:
        engine.generate([setup.mixed[0][0]], exact(4))  # warm-up
        results["dtype"] = engine.config.dtype
        for rate in sizes["rates"]:
            log(f"B: {rate} req/s ...")
            requests = workload_requests(sizes["B"], rng, setup.vocab, out_range=(32, 128))
            results["B"].append(measured(run_online, engine, requests, rate, rng))
        log("D: aborts ...")
        results["D"] = run_abort(engine, workload_requests(sizes["D"], rng, setup.vocab, out_range=(32, 128)), rng)
    log("C: shared prefix ...")
    results["C"] = [run_prefix(setup, sizes["C"], enable) for enable in (False, True)]
    return results


# ------------------------------------------------------------ main

def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model dir (default: the bundled SmolLM2, converted once under var/models)")
    parser.add_argument("--quick", action="store_true", help="small request counts: a smoke run in a few minutes")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when present)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for everyone")
    parser.add_argument("--formats", default=",".join(label for label, _, _ in format_specs("cpu")),
                        help="engine formats to run, comma-separated (bf16-w runs on the CPU only)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on CUDA, also run each format with its decode steps replayed from CUDA graphs "
                             "(EngineConfig.cuda_graphs), as a row of its own")
    parser.add_argument("--skip-peers", action="store_true", help="engine rows only")
    parser.add_argument("--skip-serving", action="store_true", help="skip B, C and D")
    parser.add_argument("--json", help="also write the raw results here (to re-render them with --render)")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: render a run saved with --json")
    parser.add_argument("--out", help="markdown file to write ('' to skip; default docs/BENCHMARKS.md, or "
                        f"{QUICK_OUT} with --quick: a smoke run's figures are no benchmark)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else "docs/BENCHMARKS.md"
    known = [label for label, _, _ in format_specs("cpu")]
    unknown = set(args.formats.split(",")) - set(known)
    if unknown:
        parser.error(f"unknown formats {sorted(unknown)}: choose from {', '.join(known)}")
    return args


def run_sizes(quick: bool) -> dict:
    if quick:
        return {"equal_out": 16, "hf1": 1, "chats": 1, "chat_tokens": 32, "mixed": 8, "mixed_out": (16, 64),
                "static_mixed": 8, "cb": 4, "rates": (4.0,), "B": 4, "C": 2, "D": 5}
    return {"equal_out": 32, "hf1": 4, "chats": 3, "chat_tokens": 128, "mixed": 32, "mixed_out": (32, 256),
            "static_mixed": 16, "cb": 16, "rates": (1.0, 4.0), "B": 12, "C": 8, "D": 20}


def make_setup(args) -> Setup:
    device = args.device
    if device == "auto":  # chosen once, at start: every row runs on it
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cuda_graphs and not device.startswith("cuda"):
        raise SystemExit(f"--cuda-graphs needs a CUDA device, not {device}")
    model_dir = args.model or bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)
    vocab = min(tokenizer.vocab_size, hf_config.vocab_size)
    sizes = run_sizes(args.quick)
    rng = random.Random(args.seed)
    config = EngineConfig(device=device, kv_cache_bytes=2**30, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_batched_tokens, num_threads=args.threads,
                          model_name=Path(model_dir).name)
    setup = Setup(model_dir, tokenizer, device, config, sizes,
                  sum(n_in * n_out * count for n_in, n_out, count in engine_shapes(hf_config).values()), vocab,
                  skip_peers=args.skip_peers)
    out = sizes["equal_out"]
    setup.equal = workload_requests(EQUAL_REQUESTS, rng, vocab, (out, out), (EQUAL_PROMPT_TOKENS,) * 2)
    setup.mixed = workload_requests(sizes["mixed"], rng, vocab, sizes["mixed_out"])
    return setup


def main(argv=None) -> int:
    args = _parse_args(argv)
    results = json.loads(Path(args.render).read_text()) if args.render else measure(args, argv)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    text = render(results, HEADING)
    print(text)
    if args.out:
        report.write_section(text, HEADING, Path(args.out))
        log(f"wrote {args.out}")
    return 0


def measure(args, argv) -> dict:
    started, machine = time.perf_counter(), report.machine_info()
    torch.set_num_threads(args.threads)
    setup = make_setup(args)
    results = {"machine": machine, "threads": args.threads, "device": setup.device,
               "gpu": torch.cuda.get_device_name(setup.device) if setup.device.startswith("cuda") else None,
               "sizes": setup.sizes, "config": dataclasses.asdict(setup.config),
               "equal_prompt_tokens": EQUAL_PROMPT_TOKENS,
               "command": report.command_line("bench.engine", argv), "rows": []}
    wanted = args.formats.split(",")
    for label, dtype, quantization in format_specs(setup.device):
        if label in wanted:
            row = run_format(setup, label, dtype, quantization)  # its engine is gone before the peers load
            row["peers"] = {} if setup.skip_peers else equal_peers(setup, row["dtype"], row["quantization"],
                                                                   row["bf16_prompts"])
            results["rows"].append(row)
            if args.cuda_graphs:
                graphed = run_format(setup, label, dtype, quantization, cuda_graphs=True)
                graphed["peers"] = row["peers"]  # the HF peers run no graphs: the same rows
                results["rows"].append(graphed)
    auto = [row for row in results["rows"] if row["label"] == "auto"] or results["rows"][:1]
    results["mixed"] = run_mixed(setup, auto[0]["dtype"], auto[0]["quantization"], auto[0].get("bf16_prompts", False))
    if not args.skip_serving:
        results["serving"] = run_serving(setup, random.Random(args.seed + 1))
    results["peaks"] = setup.peaks
    results["bandwidth"] = setup.bandwidth
    results["load_average_end"] = report.machine_info()["load_average"]
    results["wall_s"] = time.perf_counter() - started
    return results


def bundled_model_dir() -> str:
    """The bundled SmolLM2, converted once under var/models (the other engine benchmarks use it too)."""
    return resolve_model("bundled:smollm2", Path("var/models"), progress=log)


if __name__ == "__main__":
    raise SystemExit(main())
