"""The engine's decode step, this tree against another checkout, side by side.

    python -m bench.decode [--baseline-tree /tmp/old-checkout] [--rounds 3] [--steps 48]
        [--config NAME=JSON ...] [--new-config NAME=JSON ...]

Each contender runs in its own subprocess (its tree first on sys.path), the
contenders interleaved over --rounds rounds and the best round kept per
contender: the box is shared, and a round slowed by other work says nothing
about the code. Per contender:

- one stream: a 32-token prompt, 128 output tokens, EOS ignored; median
  decode step (ms) and the tok/s that step time gives;
- 32 concurrent sequences (128-token prompts): median decode step (ms) and
  its share of the fp32 roofline, with the peak matmul rate measured in the
  same run (bench.peers.matmul_flops);
- 32 sequences with long replies (32-token prompts, --long-steps decode
  steps; 0 skips it): median decode step (ms). As in a chat server, each
  sequence's KV blocks past its prompt are taken one at a time while the
  other 31 take theirs, so a sequence's blocks lie scattered over the
  cache, where the 128-token prompts' blocks above are mostly contiguous.

SmolLM2-135M-Instruct, fp32. Prints a markdown table; docs/BENCHMARKS.md's
"Decode step" paragraph quotes it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _decode_steps(engine, prompts: list[list[int]], num_tokens: int) -> list[float]:
    """Durations (s) of the steps whose batch is one decode token per prompt."""
    from inference import SamplingParams

    durations: list[float] = []

    def observe(batch, duration_s):
        if len(batch.seqs) == len(prompts) and batch.num_tokens == len(prompts):
            durations.append(duration_s)

    engine.step_observer = observe
    engine.generate(prompts, SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True))
    engine.step_observer = None
    return durations


def worker(model_dir: str, steps: int, extra_config: dict, threads: int, long_steps: int = 0) -> dict:
    """Runs inside the contender's tree: measure one stream and 32 sequences."""
    import torch

    from bench.peers import matmul_flops
    from inference import Engine, EngineConfig

    torch.set_num_threads(threads)
    rng = random.Random(0)
    # 1 GiB: the long replies' 32 x 320 tokens fit without preemption.
    engine = Engine.from_pretrained(model_dir, EngineConfig(kv_cache_bytes=2**30, max_num_seqs=32,
                                                            **extra_config))
    try:
        one = _decode_steps(engine, [[rng.randrange(100, 40000) for _ in range(32)]], 128)
        many = _decode_steps(engine, [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(32)], steps)
        long = _decode_steps(engine, [[rng.randrange(100, 40000) for _ in range(32)] for _ in range(32)],
                             long_steps) if long_steps else []
        flops_per_step = 2 * engine.runner.matmul_params * 32
    finally:
        engine.shutdown()
    peak = matmul_flops(seconds_per_size=0.5)
    one_ms, many_ms = 1000 * statistics.median(one), 1000 * statistics.median(many)
    return {"one_step_ms": one_ms, "one_tok_s": 1000 / one_ms, "many_step_ms": many_ms,
            "peak_gflops": peak / 1e9, "roofline_pct": 100 * flops_per_step / (many_ms / 1000) / peak,
            "long_step_ms": 1000 * statistics.median(long) if long else None, "load": os.getloadavg()[0]}


def _run_contender(tree: str, model_dir: str, steps: int, extra_config: dict, threads: int,
                   long_steps: int) -> dict:
    # This file is loaded by path: an older tree has no bench/decode.py.
    code = ("import importlib.util, json; "
            f"spec = importlib.util.spec_from_file_location('decode_bench', {__file__!r}); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            f"print('RESULT ' + json.dumps(module.worker({model_dir!r}, {steps}, {extra_config!r}, {threads}, {long_steps})))")
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", help="a checkout of the code to compare against (git worktree add)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on an oversubscribed box: "
                        "2 OpenMP threads that lose their cores wait on each other at every op)")
    parser.add_argument("--steps", type=int, default=48, help="decode steps at 32 sequences")
    parser.add_argument("--long-steps", type=int, default=288,
                        help="decode steps of the long-reply run at 32 sequences (0: skip it)")
    parser.add_argument("--config", action="append", default=[],
                        help='NAME=JSON: an extra contender with EngineConfig overrides, on this tree and '
                             '(as "baseline NAME") on the baseline tree')
    parser.add_argument("--new-config", action="append", default=[],
                        help="NAME=JSON: a contender on this tree only (a setting the baseline does not have)")
    args = parser.parse_args(argv)
    from inference.bootstrap import resolve_model

    model_dir = resolve_model("bundled:smollm2", ROOT / "var" / "models")
    contenders = [("this tree", str(ROOT), {})]
    if args.baseline_tree:
        contenders.insert(0, ("baseline", str(Path(args.baseline_tree).resolve()), {}))
    for spec in args.config:
        name, _, overrides = spec.partition("=")
        if args.baseline_tree:
            contenders.append((f"baseline {name}", str(Path(args.baseline_tree).resolve()), json.loads(overrides)))
        contenders.append((name, str(ROOT), json.loads(overrides)))
    for spec in args.new_config:
        name, _, overrides = spec.partition("=")
        contenders.append((name, str(ROOT), json.loads(overrides)))
    best: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for name, tree, extra in contenders:
            result = _run_contender(tree, model_dir, args.steps, extra, args.threads, args.long_steps)
            print(f"round {round_index + 1} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
            if name not in best or result["many_step_ms"] + result["one_step_ms"] < (
                    best[name]["many_step_ms"] + best[name]["one_step_ms"]):
                best[name] = result
    print("| contender | one stream: step ms | one stream tok/s | 32 sequences: step ms | peak GFLOP/s "
          "| % of fp32 roofline | 32 long replies: step ms | load 1m |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in best.items():
        long = f"{r['long_step_ms']:.1f}" if r.get("long_step_ms") else "—"
        print(f"| {name} | {r['one_step_ms']:.1f} | {r['one_tok_s']:.1f} | {r['many_step_ms']:.1f} | "
              f"{r['peak_gflops']:.0f} | {r['roofline_pct']:.1f}% | {long} | {r['load']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
