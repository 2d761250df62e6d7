"""Start-up and memory: a fresh clone to a serving product, a second start, idle memory.

    .venv/bin/python -m chatapp.bench_startup [--write]

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
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Start-up and memory (chatapp.bench_startup)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        if mine and "bench_startup" not in cmdline:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    clone = work / "clone"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        port = _free_port()
        print("fresh clone: make run ...", flush=True)
        proc, first = _start(clone, port, work / "run1.log", timeout=1800)
        time.sleep(20)  # let start-up work settle before reading memory
        processes = _processes_under(clone)
        rows = []
        for pid, cmd in sorted(processes.items()):
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
        stop1, left1 = _stop(proc, clone)
        print("second start ...", flush=True)
        proc, second = _start(clone, port, work / "run2.log", timeout=600)
        stop2, left2 = _stop(proc, clone)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by_kind: dict[str, list[int]] = {}
    for kind, rss, pss in rows:
        entry = by_kind.setdefault(kind, [0, 0, 0])
        entry[0] += 1
        entry[1] += rss
        entry[2] += pss
    lines = [
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| fresh clone → `make run` → healthy `/healthz` (venv, pip install, one-time GGUF conversion) | {first:.1f} |",
        f"| second `make run` → healthy | {second:.1f} |",
        f"| SIGTERM → everything stopped (first / second run) | {stop1:.1f} / {stop2:.1f} |",
        f"| processes left after stopping (first / second run) | {left1} / {left2} |",
        "",
        "| idle process | count | RSS MiB | PSS MiB |",
        "|---|---|---|---|",
    ]
    for kind, (count, rss, pss) in by_kind.items():
        lines.append(f"| {kind} | {count} | {rss / 1024:.0f} | {pss / 1024:.0f} |")
    total_pss = sum(v[2] for v in by_kind.values())
    lines.append(f"| total | {sum(v[0] for v in by_kind.values())} | — | {total_pss / 1024:.0f} |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        from inference.bench_report import write_section

        section = (f"{SECTION}\n\nCommand: `python -m chatapp.bench_startup --write`. PSS shares the pages "
                   "that processes have in common (Postgres's shared buffers, libraries) between them, so the "
                   "total is what the product holds; the serve process's RSS includes the fp32 weights "
                   "(about 540 MiB for SmolLM2-135M) and the preallocated KV cache (`ENGINE_KV_CACHE_MB`, "
                   "512 by default). pip's download cache was warm.\n\n" + body + "\n")
        write_section(ROOT / "docs" / "BENCHMARKS.md", section, SECTION)
        print("wrote its section of docs/BENCHMARKS.md")
    return 0 if left1 == left2 == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
