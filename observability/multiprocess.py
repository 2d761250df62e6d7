"""Metric values shared by every process of one DATA_DIR: prometheus-client's
multiprocess mode, with its files in METRICS_DIR.

Why this and not a worker that serves its own registry for `serve` to merge:
the worker is a Celery main process plus prefork pool processes (and a beat),
each with its own memory, so it would need its own multiprocess files anyway,
plus a port, a second HTTP client in the scrape path and a merge step; a
worker restarted by `serve` would lose its counters. Here every process
(Daphne with the engines, the worker's processes, a manage.py command) writes
its values into its own memory-mapped file, `/metrics` in the serving
process reads them all, and the worker needs no server. The cost is a
memory-mapped write under a process-wide lock per update instead of a
plain float under a per-value lock, and a scrape that reads every file.
Measured (`python -m bench.metrics`, docs/BENCHMARKS.md, on a loaded 2-core
box): an update costs 5 to 30 µs either way, with neither mode ahead across
runs (the label lookup and the box's load dominate); a scrape of 4 files
with the pools' stats takes 7 to 40 ms; the four updates of one chat
request take 0.04 ms; and, paired with rounds without metrics, a scrape
every second costs the engine 1 to 3.5% of its CPU per token, which at
Prometheus' 15 s comes to at most 0.5% (the intervals' upper ends, scaled).

The directory belongs to one `serve`: at its start every file not written
by itself is removed (`clear_stale_files`), so counters restart with the
server, which Prometheus handles as it does any restart.

While it runs, prometheus-client's rules for a process that exits (a worker
stopped or killed, a pool process replaced, a `manage.py` command done):
its counters and histograms stay in the sums (their files are kept, so a
total never goes down), and its "live" gauges (livesum, livemax, ...) must
stop counting, which the library leaves to `mark_process_dead(pid)`. Nothing
can call that for a process that was killed outright, so every scrape does it
first for each live gauge file whose process is gone (`forget_dead_processes`).
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil
from django.conf import settings
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values


def use_files() -> None:
    """Make the metrics defined from now on write to METRICS_DIR.

    prometheus-client chooses its value class from PROMETHEUS_MULTIPROC_DIR
    when it is first imported; settings sets that variable, but a library
    (or a benchmark) may have imported prometheus-client before the settings
    ran, so the choice is made again here, before any metric is defined."""
    if not settings.METRICS_ENABLED:
        return
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.METRICS_DIR)
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()


def clear_stale_files(directory: Path | None = None, keep_pid: int | None = None) -> int:
    """Remove the value files of other processes (an earlier `serve` and its
    worker); returns how many. This process's own files stay: its metrics
    already write into them."""
    directory = Path(directory or settings.METRICS_DIR)
    keep = f"_{keep_pid if keep_pid is not None else os.getpid()}.db"
    removed = 0
    for path in directory.glob("*.db"):
        if not path.name.endswith(keep):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def forget_dead_processes(directory: Path | None = None) -> list[int]:
    """Drop the live gauges of processes that have exited (or are zombies
    not yet reaped); returns their pids. Files are named
    `gauge_live<mode>_<pid>.db` by prometheus-client."""
    directory = Path(directory or settings.METRICS_DIR)
    dead = set()
    for path in directory.glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            dead.add(int(pid))
    for pid in dead:
        prometheus_multiprocess.mark_process_dead(pid, path=str(directory))
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True
