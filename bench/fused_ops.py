"""A layer's element-wise ops fused or as torch ops (EngineConfig.fused_ops), side by side.

    python -m bench.fused_ops [--rounds 3] [--write]

Two measurements, SmolLM2-135M-Instruct, fp32, the engine's default settings:

- the ops alone at the model's shapes: RMSNorm (576 wide), the rotary
  embedding of the fused QKV's Q and K heads (12 heads of 64, rows strided as
  in the layer) and SiLU(gate) * up (1536 wide), at 1, 32 and 512 rows (one
  chat's decode, 32 chats', a prefill chunk): median µs of each path. In a
  process of their own: run from a second thread beside the engine's, the
  ops' OpenMP team would be the process's second, whose wake-ups cost tens of
  µs, and the engine's worker would stop spinning (inference.threads);
- the engine's decode steps, paired: one engine whose forward switches
  between the two paths at every step (PagedLlama.fused_ops, which the forward
  reads each step), so both paths see the same sequences, the same context
  lengths and the same moment of a shared box. One stream (32-token prompt,
  256 tokens) and 32 sequences (128-token prompts, 96 tokens), EOS ignored;
  median step of each path per round.

With --write, the table goes into docs/BENCHMARKS.md under its section.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import statistics
import time

from bench import report
from bench.report import ROOT

SECTION = "## Fused element-wise ops (bench.fused_ops)"
ROWS = (1, 32, 512)


def _median_us(fn, repeat: int = 300) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e6 * statistics.median(times)


def op_rows(threads: int) -> list[tuple]:
    """In this process, before any other torch work (see the module docstring)."""
    import torch

    from inference import kernels
    from inference import layer_ops

    torch.set_num_threads(threads)
    if not kernels.load_kernels():
        raise SystemExit("no kernels library here (no C++ compiler?): nothing to compare")

    ops = torch.ops.chatapp
    rows = []
    for n in ROWS:
        h, weight = torch.randn(n, 576), torch.randn(576)
        qk = torch.randn(n, 15, 64)[:, :12]
        cos, sin = torch.randn(n, 1, 64), torch.randn(n, 1, 64)
        gate_up = torch.randn(n, 3072)
        pairs = {
            "RMSNorm": (lambda: layer_ops.rms_norm(h, weight, 1e-5), lambda: ops.rms_norm(h, weight, 1e-5)),
            "rotary": (lambda: layer_ops.rotate(qk, cos, sin), lambda: ops.rotary(qk, cos, sin)),
            "SiLU(gate) * up": (lambda: layer_ops.silu_mul(gate_up), lambda: ops.silu_mul(gate_up)),
        }
        for name, (torch_path, fused) in pairs.items():
            t, f = _median_us(torch_path), _median_us(fused)
            rows.append((name, n, f"{t:.1f}", f"{f:.1f}", f"{t / f:.1f}×"))
    return rows


def paired_steps(engine, sequences: int, prompt_len: int, tokens: int, seed: int) -> tuple[float, float, int]:
    """Median step (ms) with the fused ops and with torch's, and the steps each ran."""
    from inference import SamplingParams

    net = engine.runner.net
    steps: dict[bool, list[float]] = {True: [], False: []}

    def observe(batch, duration_s):
        if batch.num_tokens == sequences and len(batch.seqs) == sequences:
            steps[net.fused_ops].append(duration_s)
        net.fused_ops = not net.fused_ops

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(sequences)]
    engine.step_observer = observe
    try:
        engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    finally:
        engine.step_observer = None
        net.fused_ops = True
    return (1000 * statistics.median(steps[True]), 1000 * statistics.median(steps[False]),
            min(len(steps[True]), len(steps[False])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    parser.add_argument("--ops-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.ops_only:
        print(json.dumps(op_rows(args.threads)))
        return 0
    child = subprocess.run([sys.executable, "-m", "bench.fused_ops", "--ops-only", "--threads", str(args.threads)],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    ops = [tuple(r) for r in json.loads(child.stdout.strip().splitlines()[-1])]
    import torch

    from inference import Engine, EngineConfig
    from inference.bootstrap import resolve_model

    torch.set_num_threads(args.threads)
    machine = report.machine_info()
    model_dir = resolve_model("bundled:smollm2", ROOT / "var" / "models")
    engine = Engine.from_pretrained(model_dir, EngineConfig(kv_cache_bytes=512 * 2**20, max_num_seqs=32))
    try:
        if not engine.stats()["fused_ops"]:
            raise SystemExit("the engine runs without the fused ops here (no kernels library): nothing to compare")
        steps = []
        for round_index in range(args.rounds):
            for sequences, prompt_len, tokens in ((1, 32, 256), (32, 128, 96)):
                fused, plain, n = paired_steps(engine, sequences, prompt_len, tokens, seed=round_index)
                steps.append((round_index + 1, sequences, n, f"{plain:.2f}", f"{fused:.2f}", f"{plain - fused:.2f}",
                              f"{100 * (plain - fused) / plain:.1f}%"))
    finally:
        engine.shutdown()
    text = "\n\n".join([
        f"Command: `{report.command_line('bench.fused_ops', argv)}`. {report.machine_header(machine)}",
        "The ops alone at SmolLM2-135M's shapes, fp32, median µs:",
        report.table(["op", "rows", "torch ops µs", "fused µs", "speed-up"], ops),
        "The engine's decode steps, the two paths alternating step by step in one engine (median step ms):",
        report.table(["round", "sequences", "steps each", "torch ops ms", "fused ms", "saved ms", "saved"], steps),
    ])
    print(text)
    if args.write:
        report.write_section(f"{SECTION}\n\n{text}\n", SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
