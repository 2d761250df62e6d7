"""Process-wide resources, in one home.

Everything a process holds for its whole life and shares between requests
lives here, and nowhere else:

- the database worker threads (`on_db_thread`): each holds a connection of
  its own, outside the request pool, and drops a dead one and retries once;
- the clients of each event loop (`redis_async`, `http`): asyncio clients belong to
  the loop that opened them, and one process runs several (Daphne's,
  async_to_sync's, one per test);
- the engine pools (`engine`, `start_engines`, ...): the Django-side adapter
  that builds `inference.Engine`s from settings; the engine core imports no
  Django.

`reset()` puts all of it back to a fresh process's state (tests); apps whose
own caches must go with it register them through `on_reset`.
"""
from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import queue
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, Future

import aiohttp
import redis
import redis.asyncio as aredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, connections, transaction

from chatapp.redis_connections import pool_options
from inference import EngineConfig
from observability import engine as engine_metrics

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# Short enough that a dead Redis turns into a quick error, never a hung
# request; long enough for a pipelined batch of 32 streams' appends.
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_SOCKET_TIMEOUT_S = 5.0

_reset_hooks: list[Callable[[], None]] = []


def freeze_long_lived() -> None:
    """Take every object alive now out of the garbage collector's walks.

    After start-up (Django, the engines, the moderation models) a process
    holds about 600,000 objects that live as long as it does; a full
    collection walked them all and held the event loop, and every stream on
    it, for 140-430 ms (measured beside bench.relay's load). Frozen, the
    same collection took 14 ms. Called when big loads finish: serve's start,
    the moderation checkers' first build."""
    gc.collect()
    gc.freeze()


def on_reset(hook: Callable[[], None]) -> Callable[[], None]:
    """Register a process-wide cache of an app to be cleared by `reset()`."""
    _reset_hooks.append(hook)
    return hook


# ------------------------------------------------------- database threads

CHAT_DB = "chat"  # a reply's reads and writes, the chat's POSTs
LEDGER_DB = "ledger"  # the gateway's records: ledger rows, cache entries, key use
LEDGER_THREADS = 2


def own_connection(alias: str = "default") -> None:
    """Give the calling thread a connection of its own, outside the pool.

    For the long-lived worker threads, which hold one connection each. They
    must not borrow from the request pool: a request keeps its pooled
    connection (taken by the auth lookup) until it ends, while it awaits those
    workers, so a burst of requests larger than the pool would take every
    connection and then wait on workers that wait for one, until
    DB_POOL_TIMEOUT_S fails them all. Call it first thing in the thread."""
    conn = connections[alias]
    options = conn.settings_dict.get("OPTIONS") or {}
    if "pool" not in options:
        return
    conn.close()  # a connection borrowed before this call goes back
    # This thread's wrapper gets its own settings (the dict is shared by every
    # thread's wrapper of the alias): connect directly, and keep it.
    conn.settings_dict = {
        **conn.settings_dict,
        "OPTIONS": {key: value for key, value in options.items() if key != "pool"},
        "CONN_MAX_AGE": None,
    }


def _unsynced_commit() -> None:
    """The ledger's sessions commit without waiting for the WAL flush: what
    they write is a record or disposable (a crash may lose the last fraction
    of a second of rows, never corrupt anything), and a reply must not wait
    on an fsync. Quota enforcement itself lives in Redis."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO OFF")


_pool_check_lock = threading.Lock()


def check_request_pool(alias: str = "default") -> None:
    """Replace every dead idle connection of the request pool now.

    After a database restart all of them are dead. The pool's own check on
    borrowing (chatapp.db_pool) discards them one per attempt, with a
    back-off that doubles from one second, so a pool of 20 would outlast
    DB_POOL_TIMEOUT_S. Called by the database threads when they find their
    connection dead, and by the reply keeper every REPLY_HEARTBEAT_S; one
    check at a time, each a round trip per idle connection."""
    # Django keeps the pools on its backend class, keyed by alias; this
    # thread's own wrapper may have no `pool` (`own_connection`).
    pool = getattr(type(connections[alias]), "_connection_pools", {}).get(alias)
    if pool is None or pool.closed or not _pool_check_lock.acquire(blocking=False):
        return
    try:
        pool.check()
    except Exception:
        log.warning("checking the request pool failed", exc_info=True)
    finally:
        _pool_check_lock.release()


def _dead(conn) -> bool:
    """Whether a psycopg connection was lost (the server ended it, or the socket broke)."""
    return conn.closed or getattr(conn, "broken", False)


class DbThreads(Executor):
    """A fixed pool of threads, each with a database connection of its own.

    Not asgiref's single "sync thread": under Daphne every sync view queues on
    that one thread, and a reply's writes must not wait behind page renders
    (nor page renders behind 32 replies' writes). Connections are closed by
    the threads that opened them (Django connections are thread-bound)."""

    def __init__(self, name: str, size: int, on_connect: Callable[[], None] | None = None):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._on_connect = on_connect
        self._threads = [threading.Thread(target=self._work, name=f"{name}-db-{i}", daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        own_connection()
        session = [None]  # the DB-API connection `on_connect` last ran on
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._call(session, fn, args, kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
        connections.close_all()

    def _call(self, session: list, fn, args, kwargs):
        started_on = None  # the DB-API connection the job ran on
        try:
            self._connect(session)
            started_on = connection.connection
            return fn(*args, **kwargs)
        except (OperationalError, InterfaceError):
            # Asked of the connection the job started on, not of the thread's
            # current one: a failed `atomic` block has already reconnected
            # (its exit restores autocommit), and the new one looks healthy.
            if started_on is not None and not _dead(started_on):
                raise  # a real error of this statement, not a dead connection
            # The connection died (a database restart): Postgres rolled back
            # whatever of this job was in flight, and the jobs given to these
            # threads are transactions or idempotent updates, so it is safe to
            # reconnect and run it once more.
            log.warning("database connection lost; reconnecting", exc_info=True)
            connections.close_all()
            check_request_pool()  # a restart killed the pool's idle connections too
            self._connect(session)
            return fn(*args, **kwargs)

    def _connect(self, session: list) -> None:
        connection.ensure_connection()
        if self._on_connect is not None and session[0] is not connection.connection:
            self._on_connect()
            session[0] = connection.connection

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join(30)


_db_threads: dict[str, DbThreads] = {}
_db_lock = threading.Lock()


def db_threads(kind: str = CHAT_DB) -> DbThreads:
    with _db_lock:
        pool = _db_threads.get(kind)
        if pool is None:
            if kind == CHAT_DB:
                pool = DbThreads(kind, settings.CHAT_DB_THREADS)
            else:
                pool = DbThreads(kind, LEDGER_THREADS, on_connect=_unsynced_commit)
            _db_threads[kind] = pool
        return pool


def on_db_thread(fn, kind: str = CHAT_DB):
    """`fn` (sync, database work) as a coroutine function run on `kind`'s threads."""
    return sync_to_async(fn, thread_sensitive=False, executor=db_threads(kind))


def run_on_db_thread_sync(fn, /, *args, kind: str = LEDGER_DB, **kwargs):
    """From sync code that may be on an event loop's thread (where the ORM refuses to run)."""
    return db_threads(kind).submit(fn, *args, **kwargs).result()


def close_db_threads() -> None:
    """Stop every database thread, closing its connection (tests, shutdown);
    the next call starts fresh ones."""
    with _db_lock:
        pools = list(_db_threads.values())
        _db_threads.clear()
    for pool in pools:
        pool.shutdown(wait=True)


# ------------------------------------------------------ per event loop

_per_loop: dict = {}  # event loop -> {name: object}
# name -> what releases that object once its loop is no longer running
_closers: dict[str, Callable[[object, asyncio.AbstractEventLoop], None]] = {}


def loop_local(name: str, factory: Callable[[], object],
               closer: Callable[[object, asyncio.AbstractEventLoop], None] | None = None):
    """The `name` object of the running event loop, made by `factory` once.

    Keyed by the loop itself (not its id, which a new loop may reuse); the
    objects of closed loops are dropped so tests do not accumulate them. An
    object with a `closer` is released through it when its loop's objects are
    dropped, and at exit."""
    loop = asyncio.get_running_loop()
    objects = _per_loop.get(loop)
    if objects is None:
        for old in [lp for lp in _per_loop if lp.is_closed()]:
            _release(old, _per_loop.pop(old))
        objects = _per_loop[loop] = {}
    obj = objects.get(name)
    if obj is None:
        obj = objects[name] = factory()
        if closer is not None:
            _closers[name] = closer
    return obj


def _release(loop: asyncio.AbstractEventLoop, objects: dict) -> None:
    if loop.is_running():  # its objects may be in use on its thread: not ours to close
        return
    for name, obj in objects.items():
        closer = _closers.get(name)
        if closer is not None:
            try:
                closer(obj, loop)
            except Exception:  # pragma: no cover - a stopped loop's object; nothing to save
                log.debug("closing the %s of a stopped loop failed", name, exc_info=True)


@atexit.register
def _release_all() -> None:
    for loop, objects in list(_per_loop.items()):
        _release(loop, objects)


def _new_redis() -> aredis.Redis:
    # A blocking pool: a burst of streams queues for a connection instead of
    # failing with "Too many connections".
    pool = aredis.BlockingConnectionPool(**pool_options(
        settings.REDIS_URL, max_connections=settings.STREAM_REDIS_CONNECTIONS, timeout=10,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
    ))
    return aredis.Redis(connection_pool=pool)


def redis_async() -> aredis.Redis:
    """This loop's Redis client: reply streams, quotas, the exact cache."""
    return loop_local("redis", _new_redis)


def lua_script(client, source: str):
    """`source` registered with this client (sync or async) once, then run
    by SHA: the script objects are kept on the client, by source."""
    scripts = getattr(client, "_chatapp_lua_scripts", None)
    if scripts is None:
        scripts = client._chatapp_lua_scripts = {}
    if source not in scripts:
        scripts[source] = client.register_script(source)
    return scripts[source]


def redis_pubsub_connection() -> aredis.Redis:
    """A client for one long-lived subscription: no socket timeout (it waits
    for messages), its own connection."""
    return aredis.Redis(connection_pool=aredis.ConnectionPool(**pool_options(
        settings.REDIS_URL, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=None)))


_sync_redis: redis.Redis | None = None


def redis_sync() -> redis.Redis:
    """For sync code (pages, admin): thread-safe, one pool per process."""
    global _sync_redis
    if _sync_redis is None:
        _sync_redis = redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=REDIS_SOCKET_TIMEOUT_S
        )
    return _sync_redis


def http() -> aiohttp.ClientSession:
    """This loop's HTTP client for remote model backends (keep-alive pool).

    aiohttp, not httpx: relaying 32 streams at once, httpx spent about 1 ms of
    CPU a request and 150-190 µs a read against aiohttp's 0.2 ms and 60-70 µs
    on the same stub, and httpcore hands a burst's requests one idle
    connection, all but one going back to wait (encode/httpcore#822;
    docs/BENCHMARKS.md, bench.relay)."""
    return loop_local("http", _new_http, _close_http)


def _new_http() -> aiohttp.ClientSession:
    # trust_env: HTTP(S)_PROXY and NO_PROXY apply, as they did with httpx.
    # limit_per_host=0: the overall limit is the only cap (one backend may
    # take every connection). An idle connection is kept 4 s, under the 5 s
    # after which uvicorn (vLLM's server) closes it: a POST is not retried
    # on a connection the server closed as it was sent.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=200, limit_per_host=0, keepalive_timeout=4),
        trust_env=True,
    )


def _close_http(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop) -> None:
    """Close a stopped loop's session, so that its finalizer (and its
    connector's) does not report it as leaked: on a loop that is still open
    as aiohttp intends; on a closed one, whose sockets went with it, by
    marking both closed."""
    if not loop.is_closed():
        loop.run_until_complete(session.close())
        return
    connector = session.connector
    session.detach()
    if connector is not None:
        with warnings.catch_warnings():
            # On a closed loop close() only flags the connector; the awaitable
            # it returns has nothing to wait for and is dropped here.
            warnings.simplefilter("ignore")
            connector.close()


def redis_after_commit(command: Callable[[redis.Redis], object], failure: str) -> None:
    """`command(redis_sync())` once the current transaction commits (at once
    outside one): what Redis tells other processes must not announce a change
    that was rolled back. A Redis that cannot be reached is logged as `failure`."""
    def run() -> None:
        try:
            command(redis_sync())
        except REDIS_ERRORS:
            log.exception("%s", failure)

    transaction.on_commit(run)


# ---------------------------------------------------------- engine pools

class PoolUnavailable(RuntimeError):
    pass


_engines: dict = {}
_engine_errors: dict[str, str] = {}
_engine_lock = threading.Lock()
# /metrics reads the running pools' state at each scrape.
engine_metrics.watch_pools(lambda: list(_engines.items()))


def engine_config(spec: dict):
    """A pool's settings (ENGINE_* defaults + its MODEL_POOLS entry) as the
    engine's one config dataclass."""
    return EngineConfig(
        device=settings.ENGINE_DEVICE,
        dtype=settings.ENGINE_DTYPE,
        quantization=settings.ENGINE_QUANTIZATION,
        bf16_prompts=settings.ENGINE_BF16_PROMPTS,
        kv_cache_bytes=int(spec["kv_cache_mb"]) * 2**20,
        max_num_seqs=int(spec["max_num_seqs"]),
        max_num_batched_tokens=int(spec["max_num_batched_tokens"]),
        max_waiting=int(spec["max_waiting"]),
        num_threads=int(spec["num_threads"]) or None,
        one_thread_rows=settings.ENGINE_ONE_THREAD_ROWS,
        follow_cpu_load=settings.ENGINE_FOLLOW_CPU_LOAD,
        arrival_hold_ms=settings.ENGINE_ARRIVAL_HOLD_MS,
        stream_pace_ms=settings.ENGINE_STREAM_PACE_MS,
        pack_weights=settings.ENGINE_PACK_WEIGHTS,
        pack_backend=settings.ENGINE_PACK_BACKEND,
        attention_kernel=settings.ENGINE_ATTENTION_KERNEL,
        small_linear_rows=settings.ENGINE_SMALL_LINEAR_ROWS,
        fused_ops=settings.ENGINE_FUSED_OPS,
        kernel_dir=str(settings.ENGINE_KERNEL_DIR),
    )


def share_the_gil_with_engines() -> None:
    """Shorten the interpreter's switch interval (ENGINE_GIL_SWITCH_INTERVAL_MS)
    in a process that runs an engine beside other Python threads; never
    lengthen it."""
    interval_s = settings.ENGINE_GIL_SWITCH_INTERVAL_MS / 1000
    if 0 < interval_s < sys.getswitchinterval():
        sys.setswitchinterval(interval_s)


def on_engine_thread(fn: Callable[[], object]):
    """fn(), run on a CPU engine's thread between two of its steps when one
    takes it within EMBEDDING_ENGINE_THREAD_WAIT_MS (inference.lending), on
    the calling thread otherwise (no CPU engine in this process, a long step
    in flight, or the setting at 0)."""
    wait_s = settings.EMBEDDING_ENGINE_THREAD_WAIT_MS / 1000
    if wait_s > 0:
        from inference.lending import LENDERS

        if LENDERS:
            ran, result = LENDERS.run(fn, wait_s=wait_s)
            if ran:
                return result
    return fn()


def lending_report() -> dict:
    """How many forwards `on_engine_thread` ran on an engine's thread (`lent`)
    and how many an engine did not take in time (`refused`, run on the
    caller's thread); both 0 in a process without a CPU engine."""
    from inference.lending import LENDERS

    return {"lent": LENDERS.lent, "refused": LENDERS.refused}


def start_engine(name: str, progress=print):
    # Imported here: these bring torch and transformers, which processes that
    # never build an engine (the Celery worker, manage.py commands) must not load.
    from inference import Engine
    from inference.bootstrap import resolve_model

    share_the_gil_with_engines()
    spec = {**settings.ENGINE_DEFAULTS, **settings.MODEL_POOLS[name]}
    with _engine_lock:
        if name in _engines:
            return _engines[name]
        try:
            path = resolve_model(spec["model"], settings.MODELS_DIR, progress=progress)
            engine = Engine.from_pretrained(path, engine_config(spec))
        except Exception as exc:
            _engine_errors[name] = f"{type(exc).__name__}: {exc}"
            raise
        engine_metrics.instrument(name, engine)
        _engines[name] = engine
        _engine_errors.pop(name, None)
        progress(f"model pool {name!r} ready: {spec['model']}")
        return engine


def start_engines(progress=print) -> None:
    for name in settings.MODEL_POOLS:
        start_engine(name, progress=progress)


def engine(name: str | None = None):
    """The running engine of a pool; started on first use in processes that
    did not start it at boot (tests, LOAD_MODELS=0)."""
    name = name or settings.DEFAULT_POOL
    if name not in settings.MODEL_POOLS:
        raise PoolUnavailable(f"unknown model pool {name!r}")
    running = _engines.get(name)
    if running is None:
        running = start_engine(name, progress=log.info)
    return running


def engine_loaded(name: str) -> bool:
    return name in _engines


def loaded_engines() -> list:
    return list(_engines.values())


def register_engine(name: str, built) -> None:
    """Install an already-built engine (tests, embedding callers)."""
    engine_metrics.instrument(name, built)
    with _engine_lock:
        _engines[name] = built


def unregister_engine(name: str):
    """Take a registered engine out (without shutting it down); returns it, or None."""
    with _engine_lock:
        return _engines.pop(name, None)


def engines_health() -> dict:
    report = {}
    for name, spec in settings.MODEL_POOLS.items():
        running = _engines.get(name)
        if running is not None:
            try:
                report[name] = {"status": "ok", "model": spec["model"], "stats": running.stats()}
                if running.format_report is not None:  # how dtype "auto" was chosen on this CPU
                    report[name]["number_format"] = running.format_report.as_dict()
                report[name]["step_threads"] = running.step_threads.as_dict()  # inference.threads
            except Exception as exc:
                report[name] = {"status": "down", "model": spec["model"], "detail": str(exc)}
        elif name in _engine_errors:
            report[name] = {"status": "down", "model": spec["model"], "detail": _engine_errors[name]}
        elif settings.LOAD_MODELS:
            report[name] = {"status": "down", "model": spec["model"], "detail": "not loaded"}
        else:
            report[name] = {"status": "ok", "model": spec["model"], "detail": "lazy: loads on first use"}
    return report


def shutdown_engines() -> None:
    with _engine_lock:
        for name, running in list(_engines.items()):
            try:
                running.shutdown()
            except Exception:
                log.exception("shutting down pool %s", name)
        _engines.clear()


# ------------------------------------------------------------------ reset

def reset() -> None:
    """Back to a fresh process's state, engines excepted (tests register and
    unregister theirs): database threads closed, per-loop clients and every
    registered app cache dropped."""
    global _sync_redis
    close_db_threads()
    for loop, objects in _per_loop.items():
        _release(loop, objects)
    _per_loop.clear()
    _sync_redis = None
    for hook in _reset_hooks:
        hook()
