"""32 equal-length requests x 32 tokens: the engine against HF static batching, in alternating rounds.

    .venv/bin/python -m bench.equal_paired [--formats fp32,auto] [--rounds 6] [--write]

bench.engine times each contender once, minutes apart, and this VM's speed
moves between minutes by more than the gap the target asks about (the
engine's own 32 x 32 row moved 133-156 tok/s between identical runs). Here
two worker processes, one holding the engine and one the HF model in the
same format (what the engine chose, for "auto"), run bench.engine's very
32 x 32 workload by turns, the order swapped every round; each round's
ratio compares two runs seconds apart. Workers rather than one process: an
HF generate on another thread would give the engine's process a second
lasting OpenMP team, which slows the engine's steps (bench.peers).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

from bench import report

SECTION = "## 32 × 32 in alternating rounds (bench.equal_paired)"
ABOUT = ("Two worker processes, one holding the engine and one the HF model in the same format, run bench.engine's "
         "32 × 32 workload (32 prompts of 128 random ids, 32 greedy tokens each, EOS ignored) by turns, the order "
         "swapped every round, so each round's ratio compares two runs seconds apart on this VM, whose speed moves "
         "between minutes. HF static batching is one batch of 32; both use the same torch threads.")


# ------------------------------------------------------------ the workers

def _setup():
    from bench import engine as bench_engine

    return bench_engine, bench_engine.make_setup(bench_engine._parse_args([]))


def _worker(kind: str, label: str, dtype: str, quantization: str) -> None:
    """Load, warm up, say "ready" (with the format run), then one 32 x 32 run per "go" line."""
    import dataclasses

    import torch

    from bench import peers
    from inference import Engine

    bench_engine, setup = _setup()
    if kind == "engine":
        dtype, quantization = next((d, q) for name, d, q in bench_engine.format_specs(setup.device) if name == label)
        engine = Engine.from_pretrained(setup.model_dir, dataclasses.replace(setup.config, dtype=dtype,
                                                                             quantization=quantization))
        engine.generate([setup.equal[0][0]], bench_engine.exact(4))
        # The peer's quantization names the engine's bf16 prompts too (bench.peers.BF16_PROMPTS).
        run, ready = (lambda requests: bench_engine.run_equal(engine, requests)), {
            "dtype": engine.config.dtype,
            "quantization": peers.peer_quantization(engine.config.quantization, bool(engine.config.bf16_prompts))}
    else:
        torch.set_num_threads(setup.config.num_threads)
        model = peers.load_model(setup.model_dir, dtype, quantization, setup.device)
        if model is None:
            raise SystemExit(f"no HF {quantization} path on {setup.device}")
        run, ready = (lambda requests: peers.hf_static_batches(model, requests, batch_size=len(requests),
                                                               device=setup.device)), {"dtype": dtype,
                                                                                       "quantization": quantization}
    print(json.dumps({"ready": ready}), flush=True)
    out = setup.sizes["equal_out"]
    for line in sys.stdin:
        command, _, seed = line.partition(" ")
        if command != "go":
            break
        # Prompts new to every round: the engine's prefix cache must not carry a round's prefill to the next.
        result = run(bench_engine.workload_requests(bench_engine.EQUAL_REQUESTS, random.Random(int(seed)), setup.vocab,
                                                    (out, out), (bench_engine.EQUAL_PROMPT_TOKENS,) * 2))
        steps = result.pop("decode_steps_s", [])
        result["decode_step_ms"] = statistics.median(steps) * 1000 if steps else None
        print(json.dumps(result), flush=True)


class Worker:
    def __init__(self, kind: str, label: str, dtype: str = "", quantization: str = ""):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.equal_paired", "--worker", kind, "--format", label,
                                      "--dtype", dtype, "--quantization", quantization],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()["ready"]

    def _read(self) -> dict:
        for line in self.proc.stdout:  # a library may print before the worker's JSON
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"a worker exited with {self.proc.wait()}")

    def run(self, seed: int) -> dict:
        self.proc.stdin.write(f"go {seed}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(60)


# ------------------------------------------------------------ the parent

def render(rounds: list[dict], fmt: dict, label: str) -> str:
    rows = [(i, f"{r['engine']['tok_s']:.1f}", f"{r['engine']['decode_step_ms']:.1f}", f"{r['static']['tok_s']:.1f}",
             f"{r['engine']['tok_s'] / r['static']['tok_s']:.2f}×", r["first"], f"{r['load']:.2f}")
            for i, r in enumerate(rounds, start=1)]
    ratios = [r["engine"]["tok_s"] / r["static"]["tok_s"] for r in rounds]
    table = report.table(["round", "engine tok/s", "engine decode step at 32, median ms", "HF static batch of 32 tok/s",
                          "engine ÷ HF static", "ran first", "load average at its start"], rows)
    return (f"Format {label}: the engine ran dtype {fmt['dtype']}, quantization {fmt['quantization']}; HF static "
            f"batching the same.\n\n{table}\n\nEngine ÷ HF static: median **{statistics.median(ratios):.2f}×**, "
            f"{min(ratios):.2f}–{max(ratios):.2f}× over {len(rounds)} rounds (target ≥ 1.5×).")


def paired(label: str, rounds_wanted: int) -> str:
    """One format: its two workers, `rounds_wanted` rounds, the rendered table."""
    engine = Worker("engine", label)
    static = None
    try:
        static = Worker("static", label, engine.ready["dtype"], engine.ready["quantization"])
        rounds = []
        for i in range(rounds_wanted):
            first = "engine" if i % 2 == 0 else "HF static"
            load = os.getloadavg()[0]
            seed = 1000 + i  # bench.engine's own run is seed 0
            if first == "engine":
                result = {"engine": engine.run(seed), "static": static.run(seed)}
            else:
                result = {"static": static.run(seed), "engine": engine.run(seed)}
            rounds.append({**result, "first": first, "load": load})
            print(f"{label}, round {i + 1}: engine {result['engine']['tok_s']:.1f} tok/s, HF static "
                  f"{result['static']['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        engine.close()
        if static is not None:
            static.close()
    return render(rounds, engine.ready, label)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="fp32,auto", help="bench.engine format labels (fp32, bf16, auto, ...)")
    parser.add_argument("--format", default="fp32", help=argparse.SUPPRESS)  # a worker's
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--write", action="store_true", help="write its section of docs/BENCHMARKS.md")
    parser.add_argument("--worker", choices=("engine", "static"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="", help=argparse.SUPPRESS)
    parser.add_argument("--quantization", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.format, args.dtype, args.quantization)
        return 0
    machine = report.machine_info()
    body = "\n\n".join(paired(label, args.rounds) for label in args.formats.split(","))
    print(body)
    if args.write:
        report.write_section(f"{SECTION}\n\n{report.provenance('bench.equal_paired', argv, machine)}\n\n"
                             f"{ABOUT}\n\n{body}\n", SECTION)
        print(f"wrote its section of {report.BENCHMARKS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
