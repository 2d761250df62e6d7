"""`manage.py serve`: the one command that runs the whole product on one box.

Order matters: embedded services first (everything else needs them), then
migrations, the reaper (before any new reply can stream), models, and Daphne
last, in this process, so the engines live beside the SSE consumers that read
their tokens. The Celery worker starts once Daphne listens: it holds no model
and sends its titles and summaries to Daphne's address (SERVE_URL), which is
known only then (`--port 0`). So do a relay node's extra web processes
(WEB_PROCESSES, `manage.py serve_web`), which bind the same port
(chatapp.web). Shutdown runs in reverse.

Every way out ends with nothing left running (docs/RELIABILITY.md):
- Ctrl-C or SIGTERM shuts down in order, and a watchdog kills whatever is
  still there SHUTDOWN_TIMEOUT_S later; a second Ctrl-C kills it at once;
- the worker and the extra web processes get SIGTERM from the kernel when
  `serve` dies, however it dies (chatapp.celery.exit_with_parent), and one
  that dies on its own is started again;
- after a `serve` that was killed, the next one stops the worker it left and
  adopts its Postgres and Redis (chatapp.embedded).
"""
from __future__ import annotations

import atexit
import faulthandler
import fcntl
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from accounts import setup
from chatapp import embedded, runtime, web
from chatapp.celery import exit_with_parent
from conversations.services import reap_orphaned_replies
from gateway import services as gateway_services
from observability import multiprocess

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A worker that died on its own is started again at most this often.
WORKER_RESTART_INTERVAL_S = 10.0


class Command(BaseCommand):
    help = "Start embedded Postgres/Redis (if not configured), migrate, load models, run Daphne and a Celery worker."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--no-worker", action="store_true", help="do not start the Celery worker")

    def handle(self, *args, host, port, no_worker, **options):
        lock = self._lock_data_dir()
        self._worker = None
        self._worker_started_at = 0.0
        self._web: list[subprocess.Popen] = []  # the extra web processes (WEB_PROCESSES)
        self._web_started_at: list[float] = []
        self._reactor = None
        self._watchdog = None
        self._exit_lock = threading.Lock()
        self._stop_asked = False
        self._shutting_down = False
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop_signal)
        try:
            self._stop_stale_workers()
            if settings.METRICS_ENABLED:
                # Under the DATA_DIR lock, before the worker starts: the earlier
                # serve's and worker's values go, this process's own stay.
                multiprocess.clear_stale_files()
            self._start_services()
            call_command("migrate", interactive=False, verbosity=0)
            self._reap()
            if settings.LOAD_MODELS:
                runtime.start_engines(progress=lambda msg: self.stdout.write(msg))
                for line in gateway_services.load_stage_models():
                    self.stdout.write(line)
            self._first_admin(host)
            runtime.freeze_long_lived()
            self._run_daphne(host, port, with_worker=not no_worker)
        except KeyboardInterrupt:
            pass  # stopped during start-up: what did start is shut down below
        finally:
            self._shutting_down = True
            self._arm_watchdog()
            self.stdout.write("shutting down ...")
            # The web processes first: they use the worker's queue, Postgres and Redis.
            self._stop_sessions(self._web)
            self._stop_sessions([self._worker])
            runtime.shutdown_engines()
            embedded.stop_configured()
            lock.close()
            # Not while the watchdog kills what is left: it exits with 1.
            self._exit_lock.acquire()
            self.stdout.write("stopped.")
            self.stdout.flush()
        _exit_without_waiting_for_stray_threads()

    def _first_admin(self, host: str):
        """Off loopback, the first admin comes from a token printed here, not
        from whoever signs up first (accounts.setup)."""
        token = setup.configure_for_bind(host)
        if token:
            self.stdout.write(self.style.WARNING(
                f"no admin yet: open /accounts/setup/ and enter this one-time setup token: {token}\n"
                "(or run `manage.py createsuperuser`)"
            ))

    # ------------------------------------------------------------ stopping

    def _on_stop_signal(self, signum, frame):
        """First Ctrl-C/SIGTERM: stop in order, within SHUTDOWN_TIMEOUT_S.
        Second: stop now."""
        if self._stop_asked:
            self._force_stop(f"second {signal.Signals(signum).name}")
        self._stop_asked = True
        self._arm_watchdog()
        if self._reactor is not None and self._reactor.running:
            self._reactor.callFromThread(self._reactor.stop)
        elif not self._shutting_down:
            raise KeyboardInterrupt  # abandon the start-up step in progress

    def _arm_watchdog(self):
        if self._watchdog is not None:
            return
        timeout_s = settings.SHUTDOWN_TIMEOUT_S
        # A daemon thread: it outlives a main thread stuck anywhere, even in
        # the interpreter's exit joining a thread that never ends.
        self._watchdog = threading.Timer(timeout_s, self._force_stop, args=(f"shutdown took over {timeout_s:g} s",))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _force_stop(self, why: str):
        """Kill what is left and exit. Runs in a signal handler or on the
        watchdog's thread, so it writes with os.write (no buffered stream,
        which the main thread may hold), and holds the exit lock, if the main
        thread has not taken it, so that the main thread cannot end the
        process with status 0 meanwhile."""
        self._exit_lock.acquire(blocking=False)
        os.write(2, f"serve: {why}: killing what is left\n".encode())
        if not why.startswith("second"):
            # Where it was stuck, for the bug report: a shutdown that overran
            # is a bug (a second Ctrl-C is only impatience).
            faulthandler.dump_traceback(all_threads=True)
        for proc in [self._worker, *self._web]:
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: all of it
            except OSError:
                pass  # already gone
        embedded.kill_configured()
        # Then whatever else this process started and still waits on: a
        # `pg_ctl stop` that polls a killed postmaster's pid file would run
        # on for a minute after we are gone.
        embedded.kill_children_of(os.getpid())
        os._exit(1)

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

    def _schedule_path(self) -> str:
        # Its beat schedule under DATA_DIR is also how a worker of this
        # DATA_DIR is recognized (`_stop_stale_workers`).
        return str(Path(settings.DATA_DIR) / "celerybeat-schedule")

    def _start_worker(self, serve_url: str):
        args = [sys.executable, "-m", "celery", "-A", "chatapp", "worker", "--beat",
                "--concurrency", "1", "--loglevel", "WARNING", "--schedule", self._schedule_path()]
        self._worker_started_at = time.monotonic()
        # Own session: Ctrl-C reaches serve, which then stops the worker in
        # order. SIGTERM from the kernel when serve dies: its warm shutdown.
        return subprocess.Popen(args, start_new_session=True, cwd=settings.BASE_DIR,
                                env={**os.environ, "SERVE_URL": serve_url},
                                preexec_fn=functools.partial(exit_with_parent, signal.SIGTERM))

    def _stop_sessions(self, procs):
        """SIGTERM to each process's session (the worker's: Celery's warm
        shutdown, the current task finished; a web process's: its reactor
        stops), then SIGKILL to what is left after half the shutdown's time."""
        live = [proc for proc in procs if proc is not None and proc.poll() is None]
        for proc in live:
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.SHUTDOWN_TIMEOUT_S / 2
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _stop_stale_workers(self):
        """Workers of this DATA_DIR that a killed `serve` left (where the
        kernel could not stop them with it): we hold the DATA_DIR lock, so no
        live `serve` owns them, and a second worker would run every beat job
        twice."""
        schedule = self._schedule_path()
        stale = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "celery" in " ".join(cmdline) and schedule in cmdline and proc.pid != os.getpid():
                stale.append(proc)
        if stale:
            self.stdout.write(f"stopping a Celery worker left by a previous serve (pids {[p.pid for p in stale]}) ...")
            for proc in stale:
                embedded.kill_tree(proc, signal.SIGTERM, grace_s=settings.SHUTDOWN_TIMEOUT_S / 2)

    def _due_restart(self, proc, started_at: float) -> bool:
        """A child that died on its own (killed, out of memory) is started
        again, at most every WORKER_RESTART_INTERVAL_S."""
        return (proc is not None and proc.poll() is not None and not self._shutting_down
                and time.monotonic() - started_at >= WORKER_RESTART_INTERVAL_S)

    def _watch_worker(self, serve_url: str):
        if not self._due_restart(self._worker, self._worker_started_at):
            return
        self.stderr.write(f"the Celery worker exited ({self._worker.returncode}); starting it again")
        self._worker = self._start_worker(serve_url)

    def _run_daphne(self, host: str, port: int, *, with_worker: bool):
        from twisted.internet import task

        # With WEB_PROCESSES, this process listens on a socket of its own that
        # the extra web processes bind too (chatapp.web); bound now, so that
        # `--port 0` is resolved before they start.
        sock = None
        if settings.WEB_PROCESSES > 1:
            try:
                sock = web.reuse_port_socket(host, port, first=True)
            except OSError as exc:
                raise CommandError(f"could not listen on {host}:{port} ({exc.strerror or exc}: is the port "
                                   "already in use?)") from exc

        def on_reactor(reactor):
            self._reactor = reactor

        def ready(server):
            if not server.listening_addresses:
                return  # listen_error already stopped the reactor; reported below
            bound_host, bound_port = server.listening_addresses[0]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            if sock is not None:
                self._web = [self._start_web(host, bound_port) for _ in range(settings.WEB_PROCESSES - 1)]
                self._web_started_at = [time.monotonic()] * len(self._web)
                task.LoopingCall(self._watch_web, host, bound_port).start(1.0, now=False)
            if with_worker and self._worker is None:
                serve_url = f"http://{_loopback_if_any(shown)}:{bound_port}"
                self._worker = self._start_worker(serve_url)
                task.LoopingCall(self._watch_worker, serve_url).start(1.0, now=False)
            extra = f", {settings.WEB_PROCESSES} web processes" if sock is not None else ""
            self.stdout.write(self.style.SUCCESS(f"ready: http://{shown}:{bound_port}  (Ctrl-C to stop{extra})"))
            self.stdout.flush()

        # Our handlers (handle()), not Twisted's, turn SIGINT/SIGTERM into a
        # reactor stop: a second one must force the stop, and the watchdog
        # must run from the first. Then run() returns and the caller's
        # finally block shuts the rest down.
        if not web.run_daphne(host, port, sock=sock, on_ready=ready, on_reactor=on_reactor):
            raise CommandError(f"could not listen on {host}:{port} (is the port already in use?)")

    # ------------------------------------------------------------ web processes

    def _start_web(self, host: str, port: int) -> subprocess.Popen:
        """One more Daphne process on this port (`manage.py serve_web`): it
        loads moderation's models, then binds its own socket. Its own session,
        as the worker's: Ctrl-C reaches serve, which stops it in order; the
        kernel sends it SIGTERM when serve dies, however it dies."""
        args = [sys.executable, "manage.py", "serve_web", "--host", host, "--port", str(port)]
        return subprocess.Popen(args, start_new_session=True, cwd=settings.BASE_DIR,
                                preexec_fn=functools.partial(exit_with_parent, signal.SIGTERM))

    def _watch_web(self, host: str, port: int):
        """As `_watch_worker`; meanwhile the other processes take the port's connections."""
        for i, proc in enumerate(self._web):
            if not self._due_restart(proc, self._web_started_at[i]):
                continue
            self.stderr.write(f"web process {proc.pid} exited ({proc.returncode}); starting it again")
            self._web[i] = self._start_web(host, port)
            self._web_started_at[i] = time.monotonic()



def _exit_without_waiting_for_stray_threads() -> None:
    """Exit 0 now that everything is stopped, without the interpreter's join
    of executor threads. A request that Daphne cancelled at shutdown can leave
    asgiref's thread blocked for good in `async_to_sync`, waiting for the
    event loop that has stopped, and Python's exit would wait on it forever
    (seen on busy boxes: the watchdog then killed a clean shutdown with
    status 1). Whatever those threads could touch, Postgres and Redis
    included, is stopped by now. The exit handlers still run."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _loopback_if_any(host: str) -> str:
    """Where the worker on this box reaches a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
