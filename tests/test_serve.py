"""`manage.py serve` end to end, as a real process on a fresh DATA_DIR."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_using(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(data_dir) in cmdline and proc.pid != os.getpid():
            found.append(proc)
    return found


def start_serve(data_dir: Path, port: int, *extra: str, load_models: bool = False) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "LOAD_MODELS": "1" if load_models else "0",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("serve never became healthy")


@pytest.mark.timeout(300)
def test_serve_starts_answers_healthz_and_stops_cleanly(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    proc = start_serve(data_dir, port, load_models=True)
    try:
        health = wait_healthy(port, proc)
        assert health["database"]["status"] == "ok"
        assert health["redis"]["status"] == "ok"
        assert health["model_pools"]["small"]["status"] == "ok"
        assert health["model_pools"]["small"]["stats"]["running"] == 0
        page = httpx.get(f"http://127.0.0.1:{port}/accounts/signup/")
        assert page.status_code == 200 and b"Sign up" in page.content

        # A second serve on the same DATA_DIR refuses to start, and says why.
        second = start_serve(data_dir, free_port())
        output, _ = second.communicate(timeout=60)
        assert second.returncode != 0
        assert "already running" in output
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopped." in output
    leftovers = processes_using(data_dir)
    assert leftovers == [], [p.cmdline() for p in leftovers]
    restart = start_serve(data_dir, port)
    try:
        wait_healthy(port, restart)
    finally:
        restart.send_signal(signal.SIGINT)
        restart.communicate(timeout=60)
    assert restart.returncode == 0
    assert processes_using(data_dir) == []
    # Both shutdowns were clean: Postgres never had to run crash recovery.
    pg_log = (data_dir / "pg" / "log").read_text()
    assert "database system was shut down at" in pg_log
    assert "not properly shut down" not in pg_log


@pytest.mark.timeout(120)
def test_serve_on_a_busy_port_exits_with_a_clear_message(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = start_serve(tmp_path / "data", busy.getsockname()[1], "--no-worker")
        output, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "could not listen" in output
    assert processes_using(tmp_path / "data") == []
