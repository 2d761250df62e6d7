"""`manage.py serve`: the one command that runs the whole product on one box.

Order matters: embedded services first (everything else needs them), then
migrations, the reaper (before any new reply can stream), models, and Daphne
last, in this process, so the engines live beside the SSE consumers that read
their tokens. The Celery worker starts once Daphne listens: it holds no model
and sends its titles and summaries to Daphne's address (SERVE_URL), which is
known only then (`--port 0`). Shutdown runs in reverse.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from chatapp import embedded, runtime
from conversations import turns
from conversations.services import reap_orphaned_replies


class Command(BaseCommand):
    help = "Start embedded Postgres/Redis (if not configured), migrate, load models, run Daphne and a Celery worker."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--no-worker", action="store_true", help="do not start the Celery worker")

    def handle(self, *args, host, port, no_worker, **options):
        lock = self._lock_data_dir()
        self._worker = None
        try:
            self._start_services()
            call_command("migrate", interactive=False, verbosity=0)
            self._reap()
            if settings.LOAD_MODELS:
                runtime.start_engines(progress=lambda msg: self.stdout.write(msg))
            self._run_daphne(host, port, with_worker=not no_worker)
        finally:
            self.stdout.write("shutting down ...")
            self._stop_worker(self._worker)
            runtime.shutdown_engines()
            embedded.stop_configured()
            lock.close()
            self.stdout.write("stopped.")

    # ------------------------------------------------------------ steps

    def _lock_data_dir(self):
        """One serve per DATA_DIR: a second one would share (and corrupt) the cluster."""
        path = Path(settings.DATA_DIR) / "serve.lock"
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "?"
            handle.close()
            raise CommandError(
                f"another `serve` (pid {other}) is already running on DATA_DIR={settings.DATA_DIR}; "
                "stop it first or use another DATA_DIR"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _start_services(self):
        if settings.EMBEDDED_REDIS:
            self.stdout.write("starting embedded Redis ...")
            embedded.start_redis(settings.EMBEDDED_REDIS_DIR)
        pgdata = settings.DATABASES["default"].get("EMBEDDED_PGDATA")
        if pgdata:
            self.stdout.write("starting embedded PostgreSQL ...")
            embedded.postgres_server(Path(pgdata))

    def _reap(self):
        count = reap_orphaned_replies()
        if count:
            self.stdout.write(f"marked {count} orphaned streaming replies as interrupted")

    def _start_worker(self, serve_url: str):
        schedule = Path(settings.DATA_DIR) / "celerybeat-schedule"
        args = [sys.executable, "-m", "celery", "-A", "chatapp", "worker", "--beat",
                "--concurrency", "1", "--loglevel", "WARNING", "--schedule", str(schedule)]
        # Own session: Ctrl-C reaches serve, which then stops the worker in order.
        return subprocess.Popen(args, start_new_session=True, cwd=settings.BASE_DIR,
                                env={**os.environ, "SERVE_URL": serve_url})

    def _stop_worker(self, worker, timeout_s: float = 15.0):
        if worker is None or worker.poll() is not None:
            return
        # Celery's warm shutdown on SIGTERM: finish the current task, then exit.
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()

    def _run_daphne(self, host: str, port: int, *, with_worker: bool):
        # Imported here, not at the top: daphne.server installs Twisted's
        # asyncio reactor on import, and chatapp.asgi builds the application;
        # neither belongs in a process that only runs `manage.py help`.
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server

        from chatapp.asgi import application

        def ready():
            # Daphne's loop runs once the reactor does: the reply keeper
            # (heartbeats, the reaper of dead processes' replies) runs on it.
            asyncio.get_event_loop().call_soon(turns.start_keeper)
            if not server.listening_addresses:
                return  # listen_error already stopped the reactor; reported below
            bound_host, bound_port = server.listening_addresses[0]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            if with_worker and self._worker is None:
                self._worker = self._start_worker(f"http://{_loopback_if_any(shown)}:{bound_port}")
            self.stdout.write(self.style.SUCCESS(f"ready: http://{shown}:{bound_port}  (Ctrl-C to stop)"))
            self.stdout.flush()

        # Twisted's own handlers turn SIGINT/SIGTERM into a reactor stop, after
        # which run() returns and the caller's finally block shuts the rest down.
        server = Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=host, port=port),
            signal_handlers=True,
            http_timeout=None,  # SSE replies are long-lived by design
            application_close_timeout=10,
            ready_callable=ready,
        )
        server.run()
        if not server.listening_addresses:
            raise CommandError(f"could not listen on {host}:{port} (is the port already in use?)")


def _loopback_if_any(host: str) -> str:
    """Where the worker on this box reaches a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
