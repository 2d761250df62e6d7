"""Speed of number formats and int8 weights on this CPU, side by side.

    python -m bench.formats [--models-dir var/models] [--rounds 2] [--no-write]

1. Matmul timings at the engine's own SmolLM2 shapes (fused QKV, o_proj, fused
   gate/up, down_proj, lm_head) at 1 and 32 rows: fp32, bf16, fp16, the
   engine's int8 kernels (per-token int8 activations; weight-only on CPU, with
   bf16 activations; the dequantizing CUDA path), and for the record two int8
   kernels the engine does not use (torch's dynamic quantization through
   fbgemm, and aten._weight_int8pack_mm with fp32 activations).
2. The engine's throughput on a small offline workload (32 requests of 64
   prompt tokens x 32 output tokens, EOS ignored) for each setting, the
   settings interleaved over --rounds rounds, best round kept: the box is
   shared, and a round slowed by other work says nothing about the format.
3. What dtype "auto" picks here (inference.formats), with its timings.

Writes the "Number formats and int8 on CPU" section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer

from bench.sections import replace_section
from inference import Engine, EngineConfig, SamplingParams
from inference.bootstrap import resolve_model
from inference.formats import REPORTED_FLAGS, ROWS, cpu_info
from inference.quantization import dequantized_linear, int8_linear, quantize_weight

HEADING = "## Number formats and int8 on CPU (bench.formats)"
BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"
NUM_REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 32, 64, 32
SETTINGS = [("fp32", "float32", "none"), ("bf16", "bfloat16", "none"), ("fp16", "float16", "none"),
            ("int8", "float32", "int8"), ("int8 + bf16", "bfloat16", "int8"),
            ("int8 weight-only", "float32", "int8_weight_only"), ("auto", "auto", "none")]


def engine_shapes(config) -> dict[str, tuple[int, int, int]]:
    """{name: (in, out, how many per forward)} as the engine's paged forward runs them."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = config.num_hidden_layers
    return {"qkv": (hidden, (heads + 2 * kv_heads) * head_dim, layers), "o": (heads * head_dim, hidden, layers),
            "gate_up": (hidden, 2 * config.intermediate_size, layers),
            "down": (config.intermediate_size, hidden, layers), "lm_head": (hidden, config.vocab_size, 1)}


def kernels(weight: torch.Tensor, rows: int) -> dict:
    """The contenders for x [rows, in] @ weight^T, each a no-argument callable."""
    x = torch.randn(rows, weight.shape[1])
    xb, xh, wb, wh = x.bfloat16(), x.half(), weight.bfloat16(), weight.half()
    q, scale = quantize_weight(weight)
    packed = torch.ops.quantized.linear_prepack(
        torch.quantize_per_channel(weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0,
                                   torch.qint8), None)
    return {"fp32": lambda: F.linear(x, weight), "bf16": lambda: F.linear(xb, wb), "fp16": lambda: F.linear(xh, wh),
            "int8 (engine, CPU)": lambda: int8_linear(x, q, scale, None, False),
            "int8 weight-only (engine, CPU: bf16 activations)": lambda: int8_linear(x, q, scale, None, True),
            "int8 weight-only (engine, CUDA path)": lambda: dequantized_linear(x, q, scale),
            "fbgemm dynamic int8 (not used)": lambda: torch.ops.quantized.linear_dynamic(x, packed, True),
            "_weight_int8pack_mm, fp32 activations (not used)": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale)}


def time_kernels(shapes: dict, rounds: int = 30) -> dict:
    """{(shape, rows): {kernel: best us}}, kernels interleaved within each round."""
    results = {}
    for name, (n_in, n_out, _count) in shapes.items():
        weight = torch.randn(n_out, n_in) * 0.02
        for rows in ROWS:
            cases = kernels(weight, rows)
            best = {}
            for fn in cases.values():
                fn()  # warm-up: oneDNN and fbgemm build their kernels on first use
            for _ in range(rounds):
                for label, fn in cases.items():
                    started = time.perf_counter()
                    fn()
                    best[label] = min(best.get(label, 1e9), time.perf_counter() - started)
            results[(name, rows)] = {label: seconds * 1e6 for label, seconds in best.items()}
    return results


def workload(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode(TEXT.read_text())
    stride = (len(ids) - PROMPT_TOKENS) // NUM_REQUESTS
    return [ids[i * stride:i * stride + PROMPT_TOKENS] for i in range(NUM_REQUESTS)]


def run_engine(model_dir: str, dtype: str, quantization: str, prompts) -> dict:
    config = EngineConfig(dtype=dtype, quantization=quantization, kv_cache_bytes=64 * 2**20)
    with Engine.from_pretrained(model_dir, config) as engine:
        params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
        engine.generate(prompts[:2], params)  # warm-up
        started = time.perf_counter()
        completions = engine.generate(prompts, params)
        seconds = time.perf_counter() - started
        output = sum(len(c.token_ids) for c in completions)
        report = engine.format_report
        return {"dtype": engine.config.dtype, "seconds": seconds, "tok_s": output / seconds,
                "report": report.summary() if report else None}


def measure_engines(model_dir: str, rounds: int) -> dict:
    prompts = workload(AutoTokenizer.from_pretrained(model_dir))
    best: dict[str, dict] = {}
    for round_index in range(rounds):
        for label, dtype, quantization in SETTINGS:
            result = run_engine(model_dir, dtype, quantization, prompts)
            print(f"round {round_index + 1} {label:12s} {result['tok_s']:7.1f} tok/s ({result['dtype']})", flush=True)
            if label not in best or result["tok_s"] > best[label]["tok_s"]:
                best[label] = result
    return best


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(timings: dict, shapes: dict, engines: dict, command: str, load: tuple) -> str:
    cpu, flags = cpu_info()
    labels = list(next(iter(timings.values())))
    lines = [HEADING, "", f"Command: `{command}`", "",
             f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
             f"threads, Python {platform.python_version()}. CPU flags that matter here: "
             f"{' '.join(f for f in REPORTED_FLAGS if flags and f in flags) or 'unknown'}. Load average "
             f"{tuple(round(x, 2) for x in load)} at start, {tuple(round(x, 2) for x in os.getloadavg())} at end "
             "(a load above the core count means other work shared the cores; timings are the best of "
             "interleaved rounds).", "",
             "### Matmuls at the engine's SmolLM2-135M shapes (best time, µs)", "",
             _row("shape (in → out) × per forward", "rows", *labels), _row(*["---"] * (len(labels) + 2))]
    for (name, rows), by_label in timings.items():
        n_in, n_out, count = shapes[name]
        lines.append(_row(f"{name} ({n_in} → {n_out}) × {count}", rows, *(f"{by_label[k]:.0f}" for k in labels)))
    for rows in ROWS:
        totals = {k: sum(timings[(name, rows)][k] * shapes[name][2] for name in shapes) for k in labels}
        lines.append(_row("**one forward's matmuls, ms**", rows, *(f"**{totals[k] / 1000:.1f}**" for k in labels)))
    lines += ["", f"### Engine: {NUM_REQUESTS} requests × {PROMPT_TOKENS} prompt tokens × {OUTPUT_TOKENS} output "
              "tokens, offline, EOS ignored", "",
              _row("setting", "dtype run", "seconds", "output tok/s", "vs fp32"), _row(*["---"] * 5)]
    base = engines["fp32"]["tok_s"]
    for label, r in engines.items():
        lines.append(_row(label, r["dtype"], f"{r['seconds']:.2f}", f"{r['tok_s']:.1f}", f"{r['tok_s'] / base:.2f}×"))
    auto = engines.get("auto", {}).get("report")
    if auto:
        lines += ["", f"dtype \"auto\" chose: {auto}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", default="var/models")
    parser.add_argument("--rounds", type=int, default=2, help="engine rounds, settings interleaved")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    load = os.getloadavg()
    model_dir = resolve_model("bundled:smollm2", Path(args.models_dir))
    shapes = engine_shapes(AutoConfig.from_pretrained(model_dir))
    timings = time_kernels(shapes)
    for (name, rows), by_label in timings.items():
        print(name, rows, " ".join(f"{k}={v:.0f}" for k, v in by_label.items()), flush=True)
    engines = measure_engines(model_dir, args.rounds)
    command = "python -m bench.formats" + (f" --rounds {args.rounds}" if args.rounds != 2 else "")
    markdown = render(timings, shapes, engines, command, load)
    print(markdown)
    if not args.no_write:
        replace_section(BENCHMARKS, HEADING, markdown)
        print(f"wrote the section to {BENCHMARKS}")


if __name__ == "__main__":
    main()
