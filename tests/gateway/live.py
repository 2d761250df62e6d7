"""Run the project under Daphne in a subprocess, sharing this test run's
Postgres (the test database) and Redis, for tests through a real socket."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.db import connection

from chatapp import embedded

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url() -> str:
    params = connection.get_connection_params()
    name = connection.settings_dict["NAME"]
    if settings.DATABASES["default"].get("EMBEDDED_PGDATA"):
        host = embedded.postgres_socket_dir(settings.DATABASES["default"]["EMBEDDED_PGDATA"])
        return f"postgresql://{params.get('user') or 'postgres'}@/{name}?host={host}"
    return os.environ["DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"


def start_daphne(**env_overrides) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "GATEWAY_REGISTRY_TTL_S": "0",
        "LOAD_MODELS": "0",
        "PYTHONUNBUFFERED": "1",
        **env_overrides,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatapp.asgi:application"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daphne exited: {proc.stdout.read()}")
        try:
            httpx.get(f"{base}/v1/models", timeout=2)
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("daphne never answered")


def settled(user_id: int | None = None, timeout_s: float = 15.0, quiet_s: float = 0.3) -> None:
    """Wait until the server is done writing: the user has no generation in
    flight and no other connection to this test database has run a statement
    for `quiet_s`. A reply's bill and ledger row are written beside its final
    event (gateway.services._serve), so a client can be done while the server
    still writes; the teardown's flush (TRUNCATE) must not race that write, or
    Postgres breaks the lock cycle by failing the flush."""
    from gateway import concurrency

    deadline = time.monotonic() + timeout_s
    while user_id is not None and concurrency.in_flight(user_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    quiet_since = time.monotonic()
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                " AND (state <> 'idle' OR state_change > now() - make_interval(secs => %s))",
                [quiet_s],
            )
            if cursor.fetchone()[0]:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
