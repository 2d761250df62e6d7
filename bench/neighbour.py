"""One chat streaming beside a busy neighbour process: the engine's threads against other processes' load.

A self-hoster's box runs more than the engine (a browser, a build, a second
serve), and CI runs the suite beside other work. Each contender (an
EngineConfig and an environment) runs in a process of its own: one stream
of greedy tokens for --seconds alone, then for --seconds beside a neighbour
process that spins pure Python on one core. The neighbour's own rate alone
is measured first, so the table shows what each side costs the other.

    python -m bench.neighbour [--seconds 45] [--rounds 1] [--write]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.report import BENCHMARKS_MD, ROOT, command_line, machine_header, table, write_section

HEADING = "## Engine beside a busy neighbour (bench.neighbour)"
INT4 = {"quantization": "int4_weight_only"}
# (name, EngineConfig overrides, extra environment)
CONTENDERS = [
    ("int4, the team (ENGINE_FOLLOW_CPU_LOAD=false)", {**INT4, "follow_cpu_load": False}, {}),
    ("int4, the team, OMP_WAIT_POLICY=PASSIVE", {**INT4, "follow_cpu_load": False}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("int4, one thread (ENGINE_THREADS=1)", {**INT4, "num_threads": 1}, {}),
    ("int4, following the load (the default)", {**INT4, "follow_cpu_load": True}, {}),
    ("fp32 (keeps its team: HF-identical tokens)", {}, {}),
]


def neighbour(seconds: float) -> None:
    """Spin pure Python; print work units a second (median of 1 s windows)."""
    end, rates = time.monotonic() + seconds, []
    window, count = time.monotonic(), 0
    while time.monotonic() < end:
        total = 0
        for i in range(20000):
            total += i * i
        count += 1
        now = time.monotonic()
        if now - window >= 1.0:
            rates.append(count / (now - window))
            window, count = now, 0
    print("RESULT " + json.dumps({"units_per_s": statistics.median(rates) if rates else 0.0}), flush=True)


def engine(model_dir: str, overrides: dict, seconds: float) -> None:
    """One stream after another for `seconds` alone, then as long again beside a neighbour."""
    from inference import Engine, EngineConfig, SamplingParams

    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    prompt = [100 + i for i in range(32)]
    eng = Engine.from_pretrained(model_dir, EngineConfig(kv_cache_bytes=128 * 2**20, max_num_seqs=8, **overrides))
    try:
        eng.generate([prompt], params)  # warm-up

        def stream_for(duration: float) -> float:
            tokens, started = 0, time.monotonic()
            while time.monotonic() - started < duration:
                tokens += len(eng.generate([prompt], params)[0].token_ids)
            return tokens / (time.monotonic() - started)

        alone = stream_for(seconds)
        side = _start("neighbour", seconds)
        beside = stream_for(seconds)
        neighbour_rate = _result(side)["units_per_s"]
        plan = eng.step_threads.as_dict()
    finally:
        eng.shutdown()
    print("RESULT " + json.dumps({"alone": alone, "beside": beside, "neighbour": neighbour_rate,
                                  "yielded_steps": plan.get("yielded_steps", 0)}), flush=True)


def _start(role: str, seconds: float, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.neighbour", "--role", role, "--seconds", str(seconds), *args],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"a contender failed (exit {process.returncode})")
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    parser.add_argument("--role", choices=["main", "neighbour", "engine"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "neighbour":
        neighbour(args.seconds)
        return 0
    from inference.bootstrap import resolve_model

    model_dir = str(resolve_model("bundled:smollm2", ROOT / "var" / "models"))
    if args.role == "engine":
        engine(model_dir, json.loads(args.config), args.seconds)
        return 0
    header = machine_header()
    print(header, file=sys.stderr)
    alone_rate = _result(_start("neighbour", min(args.seconds, 20.0)))["units_per_s"]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in CONTENDERS}
    for round_index in range(args.rounds):
        for name, overrides, env in CONTENDERS:
            result = _result(_start("engine", args.seconds, "--config", json.dumps(overrides), env=env))
            print(f"round {round_index + 1} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
            results[name].append(result)
    rows = []
    for name, runs in results.items():
        rows.append((name, " / ".join(f"{r['alone']:.1f}" for r in runs), " / ".join(f"{r['beside']:.1f}" for r in runs),
                     " / ".join(f"{100 * r['neighbour'] / alone_rate:.0f}%" for r in runs),
                     " / ".join(str(r["yielded_steps"]) for r in runs)))
    body = table(["contender", "one stream alone, tok/s", "beside the neighbour, tok/s",
                  "neighbour's rate kept", "steps given way"], rows)
    print(body)
    if args.write:
        section = (f"{HEADING}\n\n`{command_line('bench.neighbour', argv)}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
                   f"{header}\n\nSmolLM2-135M-Instruct, one greedy stream of 64-token replies after another for "
                   f"{args.seconds:.0f} s alone, then as long beside a process spinning pure Python on one core "
                   f"(alone: {alone_rate:.0f} units/s). Each contender in its own process; rounds separated by "
                   f"\" / \".\n\n{body}\n")
        write_section(section, HEADING, BENCHMARKS_MD)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
