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
DEFAULT_CHECKERS = "safety.checkers.RulesChecker,safety.checkers.EmbeddingHeadChecker"


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


def start_serve(data_dir: Path, port: int, *extra: str, load_models: bool = False,
                env: dict | None = None) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "LOAD_MODELS": "1" if load_models else "0",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
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
    # The product's default checkers: their models load at start, with the engine's.
    proc = start_serve(data_dir, port, load_models=True, env={"SAFETY_CHECKERS": DEFAULT_CHECKERS})
    try:
        health = wait_healthy(port, proc)
        assert health["database"]["status"] == "ok"
        assert health["redis"]["status"] == "ok"
        assert health["model_pools"]["small"]["status"] == "ok"
        assert health["model_pools"]["small"]["stats"]["running"] == 0
        # Loaded before the first healthy answer, so the first chat does not wait seconds for them.
        assert health["moderation"]["checkers"] == {"rules": "ok", "embedding_head": "ok"}
        assert health["embeddings"]["retrieval"]["dtype"] in {"float32", "bfloat16"}
        assert health["embeddings"]["moderation_shallow"] is not None
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
        lazy = wait_healthy(port, restart)
        # LOAD_MODELS=0: they load on first use instead.
        assert lazy["moderation"]["checkers"] is None and lazy["embeddings"]["retrieval"] is None
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


# ------------------------------------------------------------ bounded shutdown

def postmaster(data_dir: Path) -> psutil.Process:
    return psutil.Process(int((data_dir / "pg" / "postmaster.pid").read_text().split()[0]))


def start_with_stuck_postgres(data_dir: Path, **env: str) -> subprocess.Popen:
    """A healthy serve (and worker) whose Postgres then stops answering."""
    port = free_port()
    proc = start_serve(data_dir, port, env=env)
    wait_healthy(port, proc)
    deadline = time.monotonic() + 120
    while not celery_children(proc):
        assert time.monotonic() < deadline, "serve started no worker"
        time.sleep(0.25)
    postmaster(data_dir).suspend()  # SIGSTOP: a pg_ctl stop now waits for nothing
    return proc


def celery_children(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "celery" in " ".join(p.cmdline())]


@pytest.mark.timeout(300)
def test_shutdown_ends_within_its_timeout_even_with_a_stuck_postgres(tmp_path):
    data_dir = tmp_path / "data"
    proc = start_with_stuck_postgres(data_dir, SHUTDOWN_TIMEOUT_S="10")
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=50)
    finally:
        proc.kill()
    took = time.monotonic() - asked
    assert proc.returncode != 0 and "shutdown took over 10 s" in output, output
    assert took < 40, took
    leftovers = processes_using(data_dir)
    assert leftovers == [], [p.cmdline() for p in leftovers]
    # Killed mid-shutdown, Postgres recovers from its WAL at the next start.
    port = free_port()
    restart = start_serve(data_dir, port, "--no-worker")
    try:
        wait_healthy(port, restart)
    finally:
        restart.send_signal(signal.SIGTERM)
        restart.communicate(timeout=60)
    assert restart.returncode == 0


@pytest.mark.timeout(300)
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    data_dir = tmp_path / "data"
    proc = start_with_stuck_postgres(data_dir, SHUTDOWN_TIMEOUT_S="300")
    proc.send_signal(signal.SIGINT)
    lines = []
    for line in proc.stdout:  # the first stop is under way (and stuck)
        lines.append(line)
        if "shutting down" in line:
            break
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "second SIGINT" in output, "".join(lines) + output
    assert time.monotonic() - asked < 30
    leftovers = processes_using(data_dir)
    assert leftovers == [], [p.cmdline() for p in leftovers]


@pytest.mark.timeout(300)
def test_serve_stops_a_worker_left_by_a_killed_serve(tmp_path):
    """Where the kernel did not take the worker down with its serve (not
    Linux, a worker started by hand): one of this DATA_DIR's, found by its
    beat schedule, is stopped before the new worker starts."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    stale = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "celery", "worker",
                              "--schedule", str(data_dir / "celerybeat-schedule")], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "celery", "worker",
                              "--schedule", str(tmp_path / "elsewhere" / "celerybeat-schedule")],
                             start_new_session=True)
    port = free_port()
    proc = start_serve(data_dir, port)
    try:
        wait_healthy(port, proc)
        assert stale.wait(60) is not None
        assert other.poll() is None, "a worker of another DATA_DIR was stopped"
    finally:
        other.kill()
        stale.kill()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    assert "left by a previous serve" in output
    assert proc.returncode == 0, output
