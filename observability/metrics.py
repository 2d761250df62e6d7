"""Every metric the product exposes, and the one-line helpers that move them.

Names follow Prometheus conventions: one prefix, `chatapp_` (vLLM's
`vllm:` is the model for what is measured, but colons are reserved for
recording rules), base units (`_seconds`, `_tokens`), `_total` on counters,
labels for the dimensions (pool, backend, view, ...), never for unbounded
values (users, raw paths, request ids).

Values live in per-process memory-mapped files (`exposition` says why), so
they are correct whichever process moves them: the serving process (engines,
gateway, web), the Celery worker and its pool processes.

Every helper returns at once when METRICS_ENABLED is off, so call sites need
no check of their own. The engine pools' series are in `observability.engine`.

Ingestion (another subsystem) increments these when it lands:
    chatapp_ingestion_jobs_total{outcome}   a document ingestion job ended:
        outcome = "ok" | "failed" | "rejected" (bad or oversized input)
        -> ingestion_job_finished(outcome)
    chatapp_ingestion_pages_total           pages (or page-like chunks) ingested
        -> ingestion_pages(count)
"""
from __future__ import annotations

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

from observability import multiprocess

PREFIX = "chatapp"

# Before the first definition below: each metric picks its value class when defined.
multiprocess.use_files()

# Latency buckets after vLLM's, extended down for a CPU box's fast paths.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS_S = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                     120.0, 240.0, 480.0, 960.0)
QUEUE_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _name(name: str) -> str:
    return f"{PREFIX}_{name}"


# ------------------------------------------------------------ engine pools
# Observed once per finished request, on the engine's thread (observability.engine).
ENGINE_TTFT = Histogram(_name("engine_time_to_first_token_seconds"),
                        "Time from a request's arrival in the engine to its first token.",
                        ["pool"], buckets=TTFT_BUCKETS_S)
ENGINE_ITL = Histogram(_name("engine_inter_token_latency_seconds"),
                       "Time between two tokens of one request.", ["pool"], buckets=ITL_BUCKETS_S)
ENGINE_E2E = Histogram(_name("engine_e2e_request_latency_seconds"),
                       "Time from a request's arrival in the engine to its end.", ["pool"],
                       buckets=REQUEST_BUCKETS_S)
ENGINE_QUEUE = Histogram(_name("engine_request_queue_time_seconds"),
                         "Time a request waited before it was first scheduled.", ["pool"],
                         buckets=QUEUE_BUCKETS_S)
ENGINE_PROMPT_TOKENS = Histogram(_name("engine_request_prompt_tokens"), "Prompt tokens of each request.",
                                 ["pool"], buckets=TOKEN_BUCKETS)
ENGINE_GENERATION_TOKENS = Histogram(_name("engine_request_generation_tokens"),
                                     "Generated tokens of each request.", ["pool"], buckets=TOKEN_BUCKETS)

# ------------------------------------------------------------------ gateway
GATEWAY_REQUESTS = Counter(_name("gateway_requests_total"),
                           "Requests the gateway settled, by backend, source and final status.",
                           ["backend", "source", "status"])
CACHE_HITS = Counter(_name("gateway_cache_hits_total"), "Replies served from a cache, by kind.", ["kind"])
CACHE_MISSES = Counter(_name("gateway_cache_misses_total"), "Cacheable requests no cache could answer.")
QUOTA_REJECTIONS = Counter(_name("gateway_quota_rejections_total"),
                           "Requests refused for quota, by the window that refused them.", ["window"])
FALLBACKS = Counter(_name("gateway_fallbacks_total"),
                    "Backends of a fallback chain passed over, by backend and why.", ["backend", "reason"])
# "mostrecent": a circuit lives in the serving process; the newest write wins.
CIRCUIT_STATE = Gauge(_name("gateway_circuit_state"),
                      "A backend's circuit breaker: 0 closed, 1 open, 2 half-open (probing).", ["backend"],
                      multiprocess_mode="mostrecent")
REMOTE_ERRORS = Counter(_name("gateway_remote_errors_total"),
                        "Failures of remote OpenAI-compatible backends, by backend and kind.", ["backend", "kind"])
CIRCUIT_STATES = {"closed": 0, "open": 1, "half_open": 2}

# ---------------------------------------------------------------------- web
HTTP_REQUESTS = Counter(_name("http_requests_total"),
                        "HTTP requests by resolved view name (never the raw path), method and status.",
                        ["view", "method", "status"])
HTTP_DURATION = Histogram(_name("http_request_duration_seconds"),
                          "Time to the response's headers, by view (SSE streams stay open longer).",
                          ["view"], buckets=HTTP_BUCKETS_S)
# "livesum": the open streams of the processes alive now.
SSE_OPEN = Gauge(_name("sse_streams_open"), "Reply streams (SSE) open now.", multiprocess_mode="livesum")
SSE_RECONNECTS = Counter(_name("sse_reconnects_total"),
                         "Reply streams opened with a Last-Event-ID (a reconnect that resumes).")
CHAT_REPLIES = Counter(_name("chat_replies_total"), "Chat replies ended, by final status.", ["status"])

# ------------------------------------------------------------------- safety
SAFETY_BLOCKS = Counter(_name("safety_blocks_total"),
                        "Texts a moderation checker blocked, by category, checker and source.",
                        ["category", "checker", "source"])

# ---------------------------------------------------------------- ingestion
INGESTION_JOBS = Counter(_name("ingestion_jobs_total"), "Document ingestion jobs ended, by outcome.", ["outcome"])
INGESTION_PAGES = Counter(_name("ingestion_pages_total"), "Pages ingested.")

# ------------------------------------------------------------------- worker
CELERY_TASKS = Counter(_name("celery_tasks_total"), "Celery tasks ended in the worker, by task and outcome.",
                       ["task", "outcome"])
# "livesum": each live process counts 1; a process that exited stops counting
# at the next scrape (exposition forgets dead processes' live gauges), so 0
# means no worker is running.
CELERY_WORKER_PROCESSES = Gauge(_name("celery_worker_processes"),
                                "Celery worker processes alive now: the main process once ready, and each pool "
                                "process.", multiprocess_mode="livesum")


# ------------------------------------------------------------------ helpers

def gateway_request(*, backend: str, source: str, status: str) -> None:
    if settings.METRICS_ENABLED:
        GATEWAY_REQUESTS.labels(backend or "none", source, status).inc()


def cache_hit(kind: str) -> None:
    if settings.METRICS_ENABLED:
        CACHE_HITS.labels(kind).inc()


def cache_miss() -> None:
    if settings.METRICS_ENABLED:
        CACHE_MISSES.inc()


def quota_rejected(window: str) -> None:
    if settings.METRICS_ENABLED:
        QUOTA_REJECTIONS.labels(window).inc()


def fallback(backend: str, reason: str) -> None:
    """`backend` was passed over: "circuit_open", "saturated" or "failed"."""
    if settings.METRICS_ENABLED:
        FALLBACKS.labels(backend, reason).inc()


def circuit_state(backend: str, state: str) -> None:
    if settings.METRICS_ENABLED:
        CIRCUIT_STATE.labels(backend).set(CIRCUIT_STATES[state])


def remote_error(backend: str, kind: str) -> None:
    """kind: "unreachable", "http_<status>", "timeout", "stream_broken", "bad_stream"."""
    if settings.METRICS_ENABLED:
        REMOTE_ERRORS.labels(backend, kind).inc()


def http_request(*, view: str, method: str, status: int, duration_s: float | None = None) -> None:
    if settings.METRICS_ENABLED:
        HTTP_REQUESTS.labels(view, method, str(status)).inc()
        if duration_s is not None:
            HTTP_DURATION.labels(view).observe(duration_s)


def sse_opened(*, resumed: bool) -> None:
    if settings.METRICS_ENABLED:
        SSE_OPEN.inc()
        if resumed:
            SSE_RECONNECTS.inc()


def sse_closed() -> None:
    if settings.METRICS_ENABLED:
        SSE_OPEN.dec()


def chat_reply(status: str) -> None:
    if settings.METRICS_ENABLED:
        CHAT_REPLIES.labels(status).inc()


def content_blocked(*, category: str, checker: str, source: str) -> None:
    if settings.METRICS_ENABLED:
        SAFETY_BLOCKS.labels(category or "unknown", checker or "unknown", source or "unknown").inc()


def ingestion_job_finished(outcome: str) -> None:
    if settings.METRICS_ENABLED:
        INGESTION_JOBS.labels(outcome).inc()


def ingestion_pages(count: int = 1) -> None:
    if settings.METRICS_ENABLED:
        INGESTION_PAGES.inc(count)


def celery_task(*, task: str, outcome: str) -> None:
    if settings.METRICS_ENABLED:
        CELERY_TASKS.labels(task, outcome).inc()


def celery_worker_process_started() -> None:
    """Called once in each worker process; its value goes with the process."""
    if settings.METRICS_ENABLED:
        CELERY_WORKER_PROCESSES.set(1)
