"""Start-up and memory: a fresh clone to a serving product, a second start, idle memory.

    .venv/bin/python -m bench.startup [--write]

Clones this checkout's HEAD into a temporary folder and runs the README's own
command there (`make run`, which creates the venv, installs, converts the
bundled model once and serves), times it to the first healthy `/healthz`, adds
up the idle product's memory from /proc (the serve process, its Celery worker,
Postgres and Redis), stops it with SIGTERM and checks no process is left, then
times a second `make run`. pip's download cache is whatever this machine has.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import free_port, report

SECTION = "## Start-up and memory (bench.startup)"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _status(pid: int, field: str) -> int:
    """A kB figure from /proc (VmRSS) or smaps_rollup (Pss); 0 when the process is gone."""
    name = "smaps_rollup" if field == "Pss" else "status"
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return 0  # the process is gone
    return 0


def _processes_under(folder: Path) -> dict[int, str]:
    """Every process whose command line mentions the clone (serve, worker, postgres, redis)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        # serve runs as `.venv/bin/python manage.py serve` (relative), so its working folder names it.
        mine = str(folder) in cmdline or cwd == str(folder) or cwd.startswith(str(folder) + "/")
        if mine and "bench.startup" not in cmdline:
            found[int(entry.name)] = cmdline.strip()
    return found


def _start(clone: Path, port: int, log: Path, timeout: float) -> tuple[subprocess.Popen, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(["make", "run", f"PORT={port}"], cwd=clone, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not _healthy(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the product never became healthy; see {log}")
        time.sleep(0.2)
    return proc, time.perf_counter() - t0


def _stop(proc: subprocess.Popen, clone: Path) -> tuple[float, int]:
    """SIGTERM to `serve` (as an init system would); returns seconds to exit and processes left."""
    serve = [pid for pid, cmd in _processes_under(clone).items() if "manage.py serve" in cmd]
    t0 = time.perf_counter()
    for pid in serve:
        os.kill(pid, signal.SIGTERM)
    proc.wait(120)
    took = time.perf_counter() - t0
    time.sleep(1)
    return took, len(_processes_under(clone))


def _idle_memory(clone: Path) -> list[tuple[str, int, int]]:
    """(kind, RSS kB, PSS kB) of each of the idle product's processes."""
    rows = []
    for pid, cmd in sorted(_processes_under(clone).items()):
        if "manage.py serve" in cmd:
            kind = "serve (Daphne + engine)"
        elif "celery" in cmd:
            kind = "Celery worker + beat"
        elif "postgres" in cmd:
            kind = "Postgres"
        elif "redis-server" in cmd:
            kind = "Redis"
        else:
            continue  # make, the shell
        rows.append((kind, _status(pid, "VmRSS"), _status(pid, "Pss")))
    return rows


def _measure() -> dict:
    """Fresh clone, first start, idle memory, stop; second start, stop."""
    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    clone = work / "clone"
    try:
        subprocess.run(["git", "clone", "-q", str(report.ROOT), str(clone)], check=True)
        port = free_port()
        print("fresh clone: make run ...", flush=True)
        proc, first = _start(clone, port, work / "run1.log", timeout=1800)
        time.sleep(20)  # let start-up work settle before reading memory
        memory = _idle_memory(clone)
        stop1, left1 = _stop(proc, clone)
        print("second start ...", flush=True)
        proc, second = _start(clone, port, work / "run2.log", timeout=600)
        stop2, left2 = _stop(proc, clone)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"first": first, "second": second, "stop": (stop1, stop2), "left": (left1, left2), "memory": memory}


def _render(m: dict, machine: dict) -> str:
    by_kind: dict[str, list[int]] = {}
    for kind, rss, pss in m["memory"]:
        entry = by_kind.setdefault(kind, [0, 0, 0])
        entry[0] += 1
        entry[1] += rss
        entry[2] += pss
    (stop1, stop2), (left1, left2) = m["stop"], m["left"]
    steps = report.table(["step", "seconds"], [
        ("fresh clone → `make run` → healthy `/healthz` (venv, pip install, one-time GGUF conversion)",
         f"{m['first']:.1f}"),
        ("second `make run` → healthy", f"{m['second']:.1f}"),
        ("SIGTERM → everything stopped (first / second run)", f"{stop1:.1f} / {stop2:.1f}"),
        ("processes left after stopping (first / second run)", f"{left1} / {left2}"),
    ])
    memory_rows = [(kind, count, f"{rss / 1024:.0f}", f"{pss / 1024:.0f}") for kind, (count, rss, pss) in by_kind.items()]
    total_pss = sum(v[2] for v in by_kind.values())
    memory_rows.append(("total", sum(v[0] for v in by_kind.values()), "—", f"{total_pss / 1024:.0f}"))
    return "\n".join([f"{report.machine_header(machine)} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
                      "", steps, "", report.table(["idle process", "count", "RSS MiB", "PSS MiB"], memory_rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    machine = report.machine_info()
    measured = _measure()
    body = _render(measured, machine)
    print(body)
    if args.write:
        section = (f"{SECTION}\n\nCommand: `{report.command_line('bench.startup', argv)}`. PSS shares the pages "
                   "that processes have in common (Postgres's shared buffers, libraries) between them, so the "
                   "total is what the product holds; the serve process's RSS includes the model's weights in the "
                   "format `ENGINE_DTYPE` chose (fp32 SmolLM2-135M: about 540 MiB, plus a packed copy where "
                   "`ENGINE_PACK_WEIGHTS` packs them), the preallocated KV cache (`ENGINE_KV_CACHE_MB`, 512 by "
                   "default) and the moderation and embedding models, which load at start (`LOAD_MODELS`). "
                   "pip's download cache was warm.\n\n" + body + "\n")
        report.write_section(section, SECTION)
        print("wrote its section of docs/BENCHMARKS.md")
    return 0 if measured["left"] == (0, 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
