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

import errno
import logging
import mmap
import os
from pathlib import Path

import psutil
from django.conf import settings
from prometheus_client import mmap_dict
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values

log = logging.getLogger(__name__)


class AllocatedMmapedDict(mmap_dict.MmapedDict):
    """prometheus-client's value file, with its disk blocks allocated before
    they are mapped, so that a full disk costs metrics and never the process.

    The library grows a file with truncate, which on most file systems
    (ext4, xfs, tmpfs) leaves a hole, and then writes through the memory map:
    with no block left for the hole, the kernel sends SIGBUS and the process
    dies on the spot, without a traceback. That is how a full DATA_DIR took
    `serve` down (tests/faults/test_disk_full.py, beside a benchmark: a new
    label value at the wrong moment). Here posix_fallocate reserves the blocks
    first and fails with ENOSPC instead; the update is then dropped (one
    warning a file), and a later new key tries again, so metrics come back
    once there is room (values already in the file keep being written: their
    blocks exist). A file that cannot even be created keeps its values in
    memory only (/metrics does not show them)."""

    def __init__(self, filename, read_mode=False):
        if not read_mode:
            try:
                _allocate(filename, mmap_dict._INITIAL_MMAP_SIZE)
            except OSError as exc:
                self._disk_full(filename, exc)
                self._in_memory(filename)
                return
        super().__init__(filename, read_mode)

    def _in_memory(self, filename) -> None:
        self._f, self._fname = None, filename
        self._capacity = mmap_dict._INITIAL_MMAP_SIZE
        self._m = mmap.mmap(-1, self._capacity)
        self._positions = {}
        self._used = 8
        mmap_dict._pack_integer(self._m, 0, self._used)

    def _init_value(self, key):
        # The size the library's own loop will grow to, for the entry it packs
        # (a 4-byte length, the key padded to 8 bytes, two doubles).
        encoded = len(key.encode("utf-8"))
        needed = self._used + 4 + encoded + (8 - (encoded + 4) % 8) + 16
        capacity = self._capacity
        while needed > capacity:
            capacity *= 2
        if capacity != self._capacity:
            if self._f is None:  # in memory only: it does not grow
                raise OSError(errno.ENOSPC, "metrics kept in memory are full", self._fname)
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)  # its truncate to `capacity` keeps the blocks

    def read_value(self, key):
        try:
            return super().read_value(key)
        except OSError as exc:
            self._disk_full(self._fname, exc)
            return 0.0, 0.0

    def write_value(self, key, value, timestamp):
        try:
            super().write_value(key, value, timestamp)
        except OSError as exc:
            self._disk_full(self._fname, exc)

    def close(self):
        if self._f is None and self._m is not None:  # in memory only
            self._m.close()
            self._m = None
            return
        super().close()

    def _disk_full(self, filename, exc: OSError) -> None:
        if not getattr(self, "_warned", False):
            self._warned = True
            log.warning("metrics: cannot grow %s (%s); new metric values of this process are dropped",
                        filename, exc.strerror or exc)


def _allocate(filename, size: int) -> None:
    """Create the file with `size` bytes of real blocks (ENOSPC if there is no
    room; a file created here is then removed, as /metrics cannot read an
    empty one)."""
    with open(filename, "a+b") as f:
        existing = os.fstat(f.fileno()).st_size
        if existing >= size:
            return
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError:
            if existing == 0:
                Path(filename).unlink(missing_ok=True)
            raise


def use_files() -> None:
    """Make the metrics defined from now on write to METRICS_DIR.

    prometheus-client chooses its value class from PROMETHEUS_MULTIPROC_DIR
    when it is first imported; settings sets that variable, but a library
    (or a benchmark) may have imported prometheus-client before the settings
    ran, so the choice is made again here, before any metric is defined."""
    if not settings.METRICS_ENABLED:
        return
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.METRICS_DIR)
    # The multiprocess value class opens its files through this module-level
    # name at each new file (prometheus-client 0.26, pinned).
    values.MmapedDict = AllocatedMmapedDict
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
