"""How many CPU threads each step gets (EngineConfig.one_thread_rows).

A step of a few token rows (one chat decoding, a handful of them) runs faster
on one thread than on the engine's team on some machines, by a lot: on the
2-core EPYC VM a one-row bf16 + int8-weight decode step took 25 ms on one
thread against 38-41 ms on two (docs/BENCHMARKS.md, "Threads of a small
step"). Such a step is ~250 parallel regions (the matmuls, the attention's
small bmm and softmax, the norms) of a few microseconds of work each, and the
engine thread's OpenMP worker must be woken for every one of them. libgomp
lets a worker spin between regions only while the process has no more
OpenMP threads than CPUs. The engine now builds on its own thread so that
its team is the process's only one (inference.engine), but any other thread
that runs multi-threaded torch work (a test's HF reference, a benchmark's
peers, a host application) starts a second team, and then the worker mostly
sleeps: each wake-up cost 40-120 us here against ~5 us for the work. The
same tiny bmm took 25 us from a process's only team and 45-150 us from a
second one. With the engine's team alone, one thread no longer won on the
2-core Xeon (bf16 + int8 weights, one row: 43.6 ms on one thread, 29.2 on
two), and the measurement below keeps the team there.

Whether one thread wins, and up to how many rows, depends on the CPU, the
hypervisor and the format, so it is measured at start (choose_step_threads):
synthetic decode steps of 1, 2, 4, ... rows through the real forward, on one
thread and on the engine's count, interleaved, best of a few, on a thread of
its own as the engine's steps are. One thread keeps the rows where it is at
least MIN_GAIN faster; the first row count where it is not ends the search.

Only half precision (bf16, fp16, int8 with half activations): those kernels
(oneDNN's matmuls, the int8 kernels, the half attention) return the same bits
on one thread as on several, so a sequence's tokens do not depend on whether
its step ran alone or batched (tests/inference/test_engine_formats.py checks
it). fp32's MKL GEMMs and SDPA do not (logits moved by ~2e-5 between one and
two threads), and fp32 promises Hugging Face generate's exact tokens, so fp32
keeps the engine's thread count for every step.

No Django here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from inference.llama import AttentionPlan, DecodeGroup

log = logging.getLogger(__name__)

CANDIDATE_ROWS = (1, 2, 4, 8, 16)
# One thread must beat the team by this much: a gain within timing noise
# would flip between restarts.
MIN_GAIN = 1.05
CONTEXT_BLOCKS = 4  # the synthetic steps attend over this many blocks (64 tokens at block size 16)


@dataclass
class StepThreads:
    threads: int  # the engine thread's count for every other step
    one_thread_rows: int  # steps of at most this many token rows run on one thread (0: none)
    reason: str
    # {rows: {"one": ms, "team": ms}}: best synthetic decode step on one thread and on `threads`.
    measured_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def threads_for(self, rows: int) -> int:
        return 1 if rows <= self.one_thread_rows else self.threads

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        times = ", ".join(f"{rows} rows {m['one']:.1f}/{m['team']:.1f} ms" for rows, m in self.measured_ms.items())
        return (f"steps of <= {self.one_thread_rows} rows on one thread, others on {self.threads} "
                f"({self.reason}{'; one/' + str(self.threads) + ' threads: ' + times if times else ''})")


def choose_step_threads(runner, one_thread_rows: int | None) -> StepThreads:
    """The runner's thread plan: one_thread_rows None measures it (where it can apply)."""
    threads = torch.get_num_threads()
    if runner.device.type != "cpu":
        return StepThreads(threads, 0, "not on CPU")
    if threads == 1:
        return StepThreads(1, 0, "the engine has one thread")
    if runner.dtype == torch.float32:
        # See the module docstring: fp32 kernels differ in the last bits with the thread count.
        return StepThreads(threads, 0, "fp32 keeps its thread count (HF-identical tokens)")
    if one_thread_rows is not None:
        return StepThreads(threads, one_thread_rows, "set by configuration")
    if runner.num_blocks < CONTEXT_BLOCKS or runner.max_model_len < CONTEXT_BLOCKS * runner.block_size:
        return StepThreads(threads, 0, "cache too small to measure")
    started = time.monotonic()
    # On the engine thread, which builds the runner (inference.engine): the
    # steps measured run on the same OpenMP team as the real ones will.
    measured = _measure(runner, threads)
    if isinstance(measured, BaseException):
        log.warning("measuring step threads failed; every step uses %d threads", threads, exc_info=measured)
        return StepThreads(threads, 0, "measurement failed")
    rows = 0
    for candidate, ms in measured.items():
        if ms["one"] * MIN_GAIN > ms["team"]:
            break
        rows = candidate
    plan = StepThreads(threads, rows, "measured", measured, round(time.monotonic() - started, 2))
    log.info("step threads: %s", plan.summary())
    return plan


def _measure(runner, threads: int, repeats: int = 3):
    """{rows: {"one": ms, "team": ms}} for CANDIDATE_ROWS until one thread stops winning."""
    try:
        measured: dict[int, dict[str, float]] = {}
        with torch.inference_mode():
            for rows in CANDIDATE_ROWS:
                step = _synthetic_decode(runner, rows)
                best = {"one": float("inf"), "team": float("inf")}
                for round_index in range(repeats + 1):  # round 0 warms each count up and is dropped
                    for name, count in (("one", 1), ("team", threads)):
                        torch.set_num_threads(count)
                        began = time.perf_counter()
                        step()
                        if round_index > 0:
                            best[name] = min(best[name], (time.perf_counter() - began) * 1000)
                measured[rows] = {name: round(ms, 2) for name, ms in best.items()}
                if best["one"] * MIN_GAIN > best["team"]:
                    break
            # The blocks the steps wrote into: zeroed, though every sequence
            # writes its positions before it attends to them.
            runner.k_cache[:, :, :CONTEXT_BLOCKS].zero_()
            runner.v_cache[:, :, :CONTEXT_BLOCKS].zero_()
        return measured
    except Exception as exc:  # a failed measurement leaves the default plan
        return exc


def _synthetic_decode(runner, rows: int):
    """A decode step of `rows` rows at position CONTEXT_BLOCKS * block_size - 1,
    each attending over blocks 0..CONTEXT_BLOCKS-1 (before any request owns them)."""
    device, bs = runner.device, runner.block_size
    context = CONTEXT_BLOCKS * bs
    blocks = torch.arange(CONTEXT_BLOCKS, device=device).repeat(rows)  # [rows * nb]
    mask = torch.ones(rows, 1, 1, context, dtype=torch.bool, device=device)
    plan = AttentionPlan(rows, [DecodeGroup(0, rows, blocks, mask)], [])
    tokens = torch.zeros(rows, dtype=torch.long, device=device)
    positions = torch.full((rows,), context - 1, dtype=torch.long, device=device)
    slots = torch.full((rows,), context - 1, dtype=torch.long, device=device)  # last slot of block nb-1
    logit_rows = torch.arange(rows, device=device)
    return lambda: runner.net.forward(tokens, positions, slots, plan, logit_rows, runner.k_cache, runner.v_cache)
