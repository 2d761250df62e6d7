"""Benchmarks, each runnable as `python -m bench.<name>`; none is imported by the product.

    bench.engine   the engine in each number format against same-format HF peers (docs/BENCHMARKS.md, "Engine")
    bench.gil      an engine step beside threads running Python
    bench.gateway  what the gateway's policy layer costs per request
    bench.chat     chat streaming through Daphne + SSE against the engine alone
    bench.relay    a remote backend (bench.sse_stub) alone against it through the /v1 relay
    bench.reply_floor  the least time moderating replies adds to a burst through the relay
    bench.reply_cascade  whether a cheaper moderation head could clear replies before the full one
    bench.startup  a fresh clone to a serving product, and its idle memory
    bench.first_chat  the first chat after a start, against the second
    bench.equal_paired  32 x 32: the engine and HF static batching by turns, a ratio per round
    bench.formats  matmul and engine speed per number format and int8
    bench.quality  perplexity and agreement with fp32 per number format and int8

bench.report holds what they share (machine header, tables, writing their
section of docs/BENCHMARKS.md); bench.peers the engine benchmark's HF peers and
bench.engine_report its markdown.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A benchmark stopped with SIGTERM (`timeout`, `kill`) tears down as Ctrl-C
# does: its finally blocks stop the server and the embedded Postgres and Redis
# it started, which otherwise outlive it (found: a bench.chat ended by pkill
# left its Postgres cluster and Redis running).
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _interrupt)


def setup_django_offline() -> None:
    """Django for a benchmark that runs the product's code in its own process
    and needs no server, database or engine model: settings, apps, logging
    (warnings only), LOAD_MODELS=0 unless set."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    os.environ.setdefault("LOAD_MODELS", "0")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    # Imported here: Django is configured by the environment set just above.
    import django

    django.setup()


def free_port() -> int:
    """A loopback port nothing listens on (for the servers the benchmarks start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_services_env(data_dir_name: str) -> dict:
    """The environment of a `serve` the benchmark starts on its own embedded
    Postgres and Redis (after django.setup()): its DATA_DIR under the
    benchmark's, and the database, Redis and secret key the benchmark uses."""
    # Imported here: Django is set up by the benchmark, after this module loads.
    from django.conf import settings
    from django.db import connection

    from chatapp import embedded

    socket_dir = embedded.postgres_socket_dir(settings.DATABASES["default"]["EMBEDDED_PGDATA"])
    return {
        "DATA_DIR": str(Path(settings.DATA_DIR) / data_dir_name),
        "DATABASE_URL": f"postgresql://postgres@/{connection.settings_dict['NAME']}?host={socket_dir}",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": settings.SECRET_KEY,
    }


def wait_healthy(proc: subprocess.Popen, port: int, log_name: str, timeout_s: float = 300) -> None:
    """Until a started `serve` answers /healthz; it is killed if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {log_name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server never became healthy")


async def http_body_parts(reader: asyncio.StreamReader, chunked: bool):
    """An HTTP/1.1 response body as it arrives on a plain socket: its chunks,
    or reads until the server closes. The benchmarks' streaming clients read
    this way rather than through httpx's line iterator, whose CPU a token would
    be taken from the cores of the server they measure."""
    while True:
        if not chunked:
            data = await reader.read(65536)
            if not data:
                return
            yield data
            continue
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]
