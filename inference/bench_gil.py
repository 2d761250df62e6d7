"""The engine beside busy Python threads: why the layer stack is TorchScript.

    .venv/bin/python -m inference.bench_gil [--repeats 2] [--out docs/BENCHMARKS.md]

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
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from inference import Engine, EngineConfig, SamplingParams
from inference.bench_report import write_section

SECTION = "## Engine beside busy Python threads (inference.bench_gil)"


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model dir (default: the bundled SmolLM2, converted once under var/models)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each cell")
    parser.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file to write ('' to skip)")
    parser.add_argument("--switch-interval-ms", type=float, default=0.5,
                        help="the shortened switch interval to compare with Python's default (serve's default: 0.5)")
    args = parser.parse_args(argv)
    if args.model:
        model_dir = args.model
    else:
        from inference.bench import _bundled_model_dir

        model_dir = _bundled_model_dir()
    prefill = [list(range(1000, 1012))]
    decode = [list(range(2000 + 40 * i, 2012 + 40 * i)) for i in range(8)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    three = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    rows = []
    default_interval = sys.getswitchinterval()
    cases = (("eager (op by op from Python)", False, default_interval),
             ("TorchScript (one call)", True, default_interval),
             ("TorchScript (one call)", True, args.switch_interval_ms / 1000))
    try:
        for name, script_layers, interval in cases:
            engine = Engine.from_pretrained(model_dir, EngineConfig(
                kv_cache_bytes=64 * 2**20, enable_prefix_caching=False, script_layers=script_layers))
            sys.setswitchinterval(interval)
            name = f"{name}, switch interval {interval * 1000:g} ms"
            engine.generate(decode, three)  # warm-up
            for busy in (0, 1, 2):
                with _Burners(busy):
                    prefill_ms = _step_ms(engine, prefill, one, args.repeats, slice(0, 1))
                    # The first step prefills the 8 prompts; the next two decode them.
                    decode_ms = _step_ms(engine, decode, three, args.repeats, slice(1, None))
                rows.append((name, busy, prefill_ms, decode_ms))
                print(f"{name}, {busy} busy threads: prefill {prefill_ms:.0f} ms, decode {decode_ms:.0f} ms",
                      file=sys.stderr, flush=True)
            engine.shutdown()
    finally:
        sys.setswitchinterval(default_interval)
    lines = [
        f"SmolLM2-135M-Instruct, fp32, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, Python {platform.python_version()}; "
        f"best of {args.repeats}; prefix caching off.",
        "",
        "| layer stack | threads running Python beside it | prefill step, 12 tokens (ms) | decode step, 8 sequences (ms) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {busy} | {p:.0f} | {d:.0f} |" for name, busy, p, d in rows]
    body = "\n".join(lines)
    print(body)
    if args.out:
        command = "python -m inference.bench_gil " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(Path(args.out), f"{SECTION}\n\nCommand: `{command.strip()}`. {__doc__.split(chr(10) + chr(10))[1].strip()}\n\n{body}\n", SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
