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
A one-thread verdict stands only if a second measurement CONFIRM_AFTER_S
later agrees (the rows both grant): a burst of load during one measurement
would otherwise fix it for the engine's life.

A busy machine changes the answer for every step, not just small ones. The
team's worker spins between regions, and while another process wants that
core the worker is descheduled in the middle of a step, so the engine thread
waits at the next region's barrier for a timeslice. With one CPU-bound
neighbour process on the 2-core Xeon (int4 weights, one stream, 45 s each,
docs/BENCHMARKS.md "A busy neighbour"), the team streamed 10.9-14.1 tok/s and
cut the neighbour's rate by 26-36%, where one thread streamed 36.0 tok/s and
left the neighbour alone (49.2 and 35.2 tok/s without the neighbour).
OMP_WAIT_POLICY=PASSIVE helped under load (25-30 tok/s) but cost 60% alone.
So, with EngineConfig.follow_cpu_load, steps run on as many threads as other
processes leave cores free (CpuLoad: /proc/stat less this process's own CPU
time, re-read every LOAD_INTERVAL_S; half a free core counts as one; fewer
threads only once two readings in a row see the load, so a burst that is over
within one reading does not cost the next), at least one, and on the whole
team again once the cores are free. It is on
by default: alone it changes nothing, and beside a busy process it streamed
3x the team's rate. Through the chat page it once cut one int4 chat from 51
to 24 tok/s (bench.chat): not by giving way, but because the moderation and embedding
threads, whose torch thread count is settled lazily from the process-wide
count, took the engine's 2 whenever the engine restored its team, and a
second OpenMP team stops the engine's worker from spinning. Those threads
now settle their count first (docs/BENCHMARKS.md, "Why it was off by default").
Whatever the setting, a start-up measurement taken while other processes
kept half a core busy does not fix small steps to one thread.

Only formats whose steps give the same bits on any thread count (half
precision, and the weight-only int8/int4 kernels, which run in bf16 around
fp32 norms, rotary and SDPA that split work by row and head): a sequence's
tokens then do not depend on whether its step ran alone or batched, nor on
what else the machine was doing (tests/inference/test_engine_formats.py checks
it). fp32's MKL GEMMs do not (logits moved by ~2e-5 between one and two
threads), and fp32 promises Hugging Face generate's exact tokens, so fp32
keeps the engine's thread count for every step.

No Django here.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from inference.llama import AttentionPlan, DecodeGroup
from inference.quantization import QUANT_INT4_WEIGHT_ONLY, QUANT_INT8_WEIGHT_ONLY

log = logging.getLogger(__name__)

CANDIDATE_ROWS = (1, 2, 4, 8, 16)
# One thread must beat the team by this much: a gain within timing noise
# would flip between restarts.
MIN_GAIN = 1.05
CONTEXT_BLOCKS = 4  # the synthetic steps attend over this many blocks (64 tokens at block size 16)
# How often the other processes' CPU load is re-read: often enough to give way
# within a second, rarely enough that reading /proc/stat costs nothing.
LOAD_INTERVAL_S = 0.5
# Other processes' busy cores during the start-up measurement beyond which its
# verdict for small steps is not kept (see choose_step_threads).
BUSY_DURING_MEASUREMENT = 0.5
# One thread must win a second measurement this long after the first. A burst
# of load that the guard above averages away can still slow the team's half of
# one measurement: the chat benchmark's server, measuring while the benchmark
# started its own engine beside it, timed the team at 35.6 ms against 20.9 on
# one thread (~14 ms for the team on a quiet box) and ran every one-row step on
# one thread for its whole life (docs/BENCHMARKS.md, "Why it was off by default").
CONFIRM_AFTER_S = 1.0
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuLoad:
    """How many cores other processes keep busy: /proc/stat's busy time for the
    cores this process may run on, less its own CPU time, over the last interval_s
    (Linux; None elsewhere, or until two samples exist). The engine's own
    threads are left out, so whatever the engine does with its threads does
    not feed back into the reading."""

    def __init__(self, interval_s: float = LOAD_INTERVAL_S, read_machine=None, read_own=None, clock=time.monotonic):
        self.interval_s = interval_s
        self._read_machine = read_machine or _machine_busy_s
        self._read_own = read_own or _own_cpu_s
        self._clock = clock
        self._last: tuple[float, float, float] | None = None  # (wall, machine busy, own) at the last sample
        self.others_busy: float | None = None  # cores, from the last complete interval
        self.previous_busy: float | None = None  # cores, from the interval before it

    def sample(self) -> float | None:
        """Cores busy with other processes' work; re-read at most every interval_s."""
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.interval_s:
            return self.others_busy
        machine, own = self._read_machine(), self._read_own()
        if machine is None:
            return None
        if self._last is not None:
            wall, last_machine, last_own = self._last
            self.previous_busy = self.others_busy
            self.others_busy = max(0.0, ((machine - last_machine) - (own - last_own)) / (now - wall))
        self._last = (now, machine, own)
        return self.others_busy


def _machine_busy_s(stat: bytes | None = None) -> float | None:
    """Seconds of CPU that the cores this process may run on have spent busy
    since boot (/proc/stat's user, nice, system, irq and softirq; idle, iowait
    and steal are not busy). Only those cores: in a container pinned to a few
    cores of a big host, /proc/stat still lists every core of the host."""
    try:
        if stat is None:
            with open("/proc/stat", "rb") as handle:
                stat = handle.read()
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    except OSError:
        return None
    ticks = 0
    for line in stat.splitlines():
        if not line.startswith(b"cpu") or line[3:4] in (b" ", b""):
            continue  # not a core's line, or the all-cores total
        fields = line.split()
        if allowed is not None and int(fields[0][3:]) not in allowed:
            continue
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
        ticks += user + nice + system + irq + softirq
    return ticks / _TICKS_PER_S


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class StepThreads:
    threads: int  # the engine thread's count for every other step
    one_thread_rows: int  # steps of at most this many token rows run on one thread (0: none)
    reason: str
    # {rows: {"one": ms, "team": ms}}: best synthetic decode step on one thread and on `threads`.
    measured_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    # Set when the team gives way to other processes' load (EngineConfig.follow_cpu_load).
    load: CpuLoad | None = None
    cpus: int = 0  # the cores this process may run on
    yielding: int = 0  # threads given up now because other processes keep their cores busy
    yielded_steps: int = 0

    def threads_for(self, rows: int) -> int:
        if rows <= self.one_thread_rows:
            return 1
        if self.load is None:
            return self.threads
        others = self.load.sample()
        current = self.threads - self.yielding
        if others is not None:
            # As many threads as there are cores free, rounding half a core up;
            # back up only once three quarters of the next core are free, so
            # that a reading near the edge does not flip the count every interval.
            # Fewer only for load that two readings in a row saw: a burst of
            # half a second (a chat server's 32 POSTs, their client and
            # Postgres) had the team give way for the next half second, when
            # the burst was over and 32 prompts were prefilling on one thread
            # (docs/BENCHMARKS.md "Giving way only to load that lasts").
            free = self.cpus - min(others, self.load.previous_busy if self.load.previous_busy is not None else 0.0)
            fits = int(free + 0.5)
            if fits > current:
                fits = max(current, int(self.cpus - others + 0.25))
            self.yielding = self.threads - max(1, min(self.threads, fits))
        if self.yielding:
            self.yielded_steps += 1
        return self.threads - self.yielding

    def as_dict(self) -> dict:
        report = {name: getattr(self, name) for name in
                  ("threads", "one_thread_rows", "reason", "measured_ms", "seconds", "yielding", "yielded_steps")}
        report["follows_cpu_load"] = self.load is not None
        report["others_busy_cores"] = None if self.load is None or self.load.others_busy is None \
            else round(self.load.others_busy, 2)
        return report

    def summary(self) -> str:
        times = ", ".join(f"{rows} rows {m['one']:.1f}/{m['team']:.1f} ms" for rows, m in self.measured_ms.items())
        follows = "; fewer threads while other processes keep cores busy" if self.load is not None else ""
        return (f"steps of <= {self.one_thread_rows} rows on one thread, others on {self.threads} "
                f"({self.reason}{'; one/' + str(self.threads) + ' threads: ' + times if times else ''}){follows}")


def thread_invariant(runner) -> bool:
    """Whether the runner's steps give the same bits on any thread count: half
    precision, or fp32 activations around the weight-only kernels (int8 and
    int4), whose matmuls run in bf16 and whose fp32 ops (norms, rotary, SDPA)
    split work by row and head, never inside one sum (tests/inference/
    test_engine_formats.py checks both). fp32 matmuls (MKL) do not."""
    return runner.dtype != torch.float32 or runner.net.quant_mode in (QUANT_INT8_WEIGHT_ONLY, QUANT_INT4_WEIGHT_ONLY)


def choose_step_threads(runner, one_thread_rows: int | None, follow_cpu_load: bool = False) -> StepThreads:
    """The runner's thread plan: one_thread_rows None measures it (where it
    can apply); follow_cpu_load lets the team give way to other processes."""
    eligible = runner.device.type == "cpu" and thread_invariant(runner)
    load = CpuLoad(interval_s=0.0) if eligible else None
    if load is not None:
        load.sample()  # the interval the measurement below runs in starts now
    plan = _choose(runner, one_thread_rows)
    others = load.sample() if load is not None else None
    if plan.reason.startswith("measured") and plan.one_thread_rows and others is not None and others >= BUSY_DURING_MEASUREMENT:
        # Measured while other processes kept a core busy: one thread won
        # because the team could not have its cores. Fixed now, that verdict
        # would hold after the load is gone (an int4 stream at 35 tok/s on a
        # quiet box instead of 51); the team keeps small steps instead.
        plan.one_thread_rows = 0
        plan.reason = f"measured while other processes kept {others:.1f} cores busy: not kept"
    if load is not None and follow_cpu_load and plan.threads > 1:
        load.interval_s = LOAD_INTERVAL_S
        plan.load = load
        plan.cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if plan.measured_ms or plan.load is not None:
        log.info("step threads: %s", plan.summary())
    return plan


def _choose(runner, one_thread_rows: int | None) -> StepThreads:
    threads = torch.get_num_threads()
    if runner.device.type != "cpu":
        return StepThreads(threads, 0, "not on CPU")
    if threads == 1:
        return StepThreads(1, 0, "the engine has one thread")
    if not thread_invariant(runner):
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
    rows, reason = _one_thread_rows(measured), "measured"
    if rows:
        # Kept only if a second measurement, a moment later, agrees (CONFIRM_AFTER_S).
        time.sleep(CONFIRM_AFTER_S)
        again = _measure(runner, threads)
        confirmed = 0 if isinstance(again, BaseException) else _one_thread_rows(again)
        reason = "measured twice" if confirmed >= rows else \
            f"measured; a second measurement kept {confirmed} rows of {rows} on one thread"
        rows = min(rows, confirmed)
    return StepThreads(threads, rows, reason, measured, round(time.monotonic() - started, 2))


def _one_thread_rows(measured: dict[int, dict[str, float]]) -> int:
    """The most rows one thread wins by MIN_GAIN at, counting up until it does not."""
    rows = 0
    for candidate, ms in measured.items():
        if ms["one"] * MIN_GAIN > ms["team"]:
            break
        rows = candidate
    return rows


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
    lens = torch.full((rows,), context, dtype=torch.long, device=device)
    plan = AttentionPlan(rows, [DecodeGroup(0, rows, blocks, mask, lens)], [])
    tokens = torch.zeros(rows, dtype=torch.long, device=device)
    positions = torch.full((rows,), context - 1, dtype=torch.long, device=device)
    slots = torch.full((rows,), context - 1, dtype=torch.long, device=device)  # last slot of block nb-1
    logit_rows = torch.arange(rows, device=device)
    return lambda: runner.net.forward(tokens, positions, slots, plan, logit_rows, runner.k_cache, runner.v_cache)
