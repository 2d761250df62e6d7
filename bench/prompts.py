"""Prompts in bf16 (EngineConfig.bf16_prompts) against prompts in fp32, side by side.

    python -m bench.prompts [--rounds 3] [--write]

The contenders run SmolLM2-135M-Instruct on bf16 weights ("bf16_weight_only",
what dtype "auto" picks on the 2-core EPYC and the AMX Xeon); one multiplies
the prompt's rows in fp32 as before, three in bf16 on oneDNN: in calls of 64
rows only; in calls of 64 and the larger counts that give the same bits
(EngineConfig.bf16_prompt_max_block, inference.llama.same_bits_blocks); and
(the default) also in the smaller counts that do (EngineConfig.
bf16_prompt_min_block), which short prompts pad to instead of 64. Each runs in
its own process (two engines in one process share OpenMP's threads and slow
each other), all of them by turns over --rounds rounds, and each figure is the
median of the rounds. Per contender:

- a prompt's prefill alone, at several lengths (the step's time, median of 5
  random prompts; prefix caching off): what a chat's time to first token is
  made of;
- 32 prompts of 128 tokens sent at once, until each has its first token (the
  chat page's burst);
- one stream's decode step (32-token prompt, 64 tokens): generated tokens keep
  fp32 activations, so it should not move.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.report import machine_info, provenance, table, write_section

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Prompts in bf16 (bench.prompts)"
LENGTHS = (12, 20, 28, 60, 200, 500)
# name → EngineConfig settings of its own
CONTENDERS = {
    "prompts in fp32": {"bf16_prompts": False},
    "prompts in bf16, calls of 64 rows": {"bf16_prompts": True, "bf16_prompt_max_block": 64,
                                          "bf16_prompt_min_block": 64},
    "prompts in bf16, calls of 64 rows and more": {"bf16_prompts": True, "bf16_prompt_min_block": 64},
    "prompts in bf16": {"bf16_prompts": True},
}


def worker(model_dir: str, settings: dict) -> dict:
    """In a process of its own: time the contender's prefills and decode step."""
    from inference import Engine, EngineConfig, SamplingParams

    rng = random.Random(0)
    engine = Engine.from_pretrained(model_dir, EngineConfig(
        kv_cache_bytes=2**29, quantization="bf16_weight_only", enable_prefix_caching=False, **settings))
    steps: list[tuple[int, float]] = []
    engine.step_observer = lambda batch, duration: steps.append((batch.num_tokens, duration))
    first = SamplingParams(max_tokens=1, temperature=0.0)
    try:
        result = {"bf16_prompts": engine.stats()["bf16_prompts"], "blocks": engine.stats()["bf16_prompt_blocks"]}
        for n in LENGTHS:
            times = []
            for _ in range(5):
                steps.clear()
                engine.generate([[rng.randrange(100, 40000) for _ in range(n)]], first)
                times.append(sum(duration for _, duration in steps))
            result[f"prefill_{n}_ms"] = 1000 * statistics.median(times)
        burst = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(32)]
        started = time.perf_counter()
        engine.generate(burst, first)
        result["burst_32x128_ms"] = 1000 * (time.perf_counter() - started)
        steps.clear()
        engine.generate([[rng.randrange(100, 40000) for _ in range(32)]],
                        SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
        result["decode_step_ms"] = 1000 * statistics.median(duration for rows, duration in steps if rows == 1)
    finally:
        engine.shutdown()
    result["load"] = os.getloadavg()[0]
    return result


def _run(model_dir: str, settings: dict) -> dict:
    code = (f"import json; from bench.prompts import worker; "
            f"print('RESULT ' + json.dumps(worker({model_dir!r}, {settings!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    from inference.bootstrap import resolve_model

    model_dir = str(resolve_model("bundled:smollm2", ROOT / "var" / "models"))
    machine = machine_info()
    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for round_index in range(args.rounds):
        order = list(CONTENDERS) if round_index % 2 == 0 else list(reversed(CONTENDERS))
        for name in order:
            result = _run(model_dir, CONTENDERS[name])
            print(f"round {round_index + 1} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
            runs[name].append(result)
    keys = [f"prefill_{n}_ms" for n in LENGTHS] + ["burst_32x128_ms", "decode_step_ms"]
    median = {name: {k: statistics.median(r[k] for r in results) for k in keys} for name, results in runs.items()}
    fp32, calls64, larger, bf16 = (median[name] for name in CONTENDERS)
    headers = ["contender"] + [f"prefill {n} tokens, ms" for n in LENGTHS] + [
        "32 × 128 tokens at once, to the last first token, ms", "one stream's decode step, ms"]
    rows = [(name, *(f"{median[name][k]:.1f}" for k in keys)) for name in CONTENDERS]
    rows.append(("fp32 ÷ bf16", *(f"{fp32[k] / bf16[k]:.2f}×" for k in keys)))
    rows.append(("calls of 64 ÷ larger calls", *(f"{calls64[k] / larger[k]:.2f}×" for k in keys)))
    rows.append(("64 and more ÷ smaller calls too", *(f"{larger[k] / bf16[k]:.2f}×" for k in keys)))
    loads = [r["load"] for results in runs.values() for r in results]
    text = table(headers, rows)
    print(text)
    if args.write:
        section = "\n".join([
            HEADING, "", provenance("bench.prompts", argv, machine), "",
            f"Medians of {args.rounds} alternating rounds, each contender in its own process; 1-minute load "
            f"{min(loads):.2f}–{max(loads):.2f}. All on bf16 weights (\"bf16_weight_only\"); prefix caching "
            "off; prefill = the step's time for one prompt of random ids. The calls that give the bits of 64 "
            f"rows, per matmul (qkv, o, gate_up, down): {runs['prompts in bf16'][0]['blocks']}.", "", text])
        write_section(section, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
