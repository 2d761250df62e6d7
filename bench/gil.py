"""The engine beside busy Python threads: why the layer stack is TorchScript.

    .venv/bin/python -m bench.gil [--repeats 2] [--out docs/BENCHMARKS.md]

The engine runs in the web server's process, so its step loop shares the GIL
with Django's threads. A forward pass called op by op from Python gives the
GIL back around every torch op and must win it back afterwards; while other
threads run Python, each of those waits can last a whole switch interval
(5 ms). This measures one engine step (the prefill of a 12-token prompt, and a
decode step of 8 sequences) with 0, 1 and 2 threads spinning in pure Python
beside it, with the decoder layers run eagerly from Python and as the one
TorchScript call the engine uses, and the TorchScript stack again with the
interpreter's switch interval shortened as `serve` does
(ENGINE_GIL_SWITCH_INTERVAL_MS); step times are the engine's own (its step
observer). On a 2-core box two spinning threads also take both cores from the
engine's torch threads, so that row measures CPU sharing as much as the GIL.
Prints a table and replaces its own section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

from bench import report
from bench.engine import bundled_model_dir
from inference import Engine, EngineConfig, SamplingParams

SECTION = "## Engine beside busy Python threads (bench.gil)"
PREFILL = [list(range(1000, 1012))]
DECODE = [list(range(2000 + 40 * i, 2012 + 40 * i)) for i in range(8)]
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
THREE = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


class _Burners:
    """Threads that run Python without pause, as a busy web server's do."""

    def __init__(self, count: int):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._spin, daemon=True) for _ in range(count)]

    def _spin(self):
        while not self.stop.is_set():
            sum(i * i for i in range(2000))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()


def _step_ms(engine, prompts, params, repeats: int, which: slice) -> float:
    """Best of `repeats` runs of the median duration of the engine steps in
    `which` (the engine's own step timing, through its step observer)."""
    best = float("inf")
    for _ in range(repeats):
        steps: list[float] = []
        engine.step_observer = lambda batch, seconds: steps.append(seconds)
        try:
            engine.generate(prompts, params)
        finally:
            engine.step_observer = None
        chosen = sorted(steps[which])
        best = min(best, chosen[len(chosen) // 2])
    return best * 1000


def measure(model_dir: str, name: str, script_layers: bool, interval_s: float, repeats: int) -> list[tuple]:
    """One layer stack at one switch interval, beside 0, 1 and 2 busy threads."""
    engine = Engine.from_pretrained(model_dir, EngineConfig(
        kv_cache_bytes=64 * 2**20, enable_prefix_caching=False, script_layers=script_layers))
    default_interval = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    name = f"{name}, switch interval {interval_s * 1000:g} ms"
    rows = []
    try:
        engine.generate(DECODE, THREE)  # warm-up
        for busy in (0, 1, 2):
            with _Burners(busy):
                prefill_ms = _step_ms(engine, PREFILL, ONE, repeats, slice(0, 1))
                # The first step prefills the 8 prompts; the next two decode them.
                decode_ms = _step_ms(engine, DECODE, THREE, repeats, slice(1, None))
            rows.append((name, busy, f"{prefill_ms:.0f}", f"{decode_ms:.0f}"))
            print(f"{name}, {busy} busy threads: prefill {prefill_ms:.0f} ms, decode {decode_ms:.0f} ms",
                  file=sys.stderr, flush=True)
    finally:
        sys.setswitchinterval(default_interval)
        engine.shutdown()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model dir (default: the bundled SmolLM2, converted once under var/models)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each cell")
    parser.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file to write ('' to skip)")
    parser.add_argument("--switch-interval-ms", type=float, default=0.5,
                        help="the shortened switch interval to compare with Python's default (serve's default: 0.5)")
    args = parser.parse_args(argv)
    model_dir = args.model or bundled_model_dir()
    machine = report.machine_info()
    default_interval = sys.getswitchinterval()
    cases = (("eager (op by op from Python)", False, default_interval),
             ("TorchScript (one call)", True, default_interval),
             ("TorchScript (one call)", True, args.switch_interval_ms / 1000))
    rows = [row for name, script_layers, interval in cases
            for row in measure(model_dir, name, script_layers, interval, args.repeats)]
    body = "\n".join([
        f"SmolLM2-135M-Instruct, fp32, {torch.get_num_threads()} torch threads; "
        f"best of {args.repeats}; prefix caching off. {report.machine_header(machine)}",
        "",
        report.table(["layer stack", "threads running Python beside it", "prefill step, 12 tokens (ms)",
                      "decode step, 8 sequences (ms)"], rows),
    ])
    print(body)
    if args.out:
        command = report.command_line("bench.gil", argv)
        about = __doc__.split("\n\n")[1].strip()
        report.write_section(f"{SECTION}\n\nCommand: `{command}`. {about}\n\n{body}\n", SECTION, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
