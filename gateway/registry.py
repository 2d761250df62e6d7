"""What the gateway routes to and under which limits: backends, plans and prices.

They are read on every request, so each process keeps them. A saved or deleted
Backend, Plan, PlanAssignment or ModelPrice drops them in this process at once
and, once its transaction commits, bumps a generation counter in Redis
(`changed`, connected in gateway.apps); every process reads the counter at most
once every GENERATION_CHECK_S and drops what it kept when the counter moved.
GATEWAY_REGISTRY_TTL_S bounds what is kept when the counter cannot be read or
the tables were written outside the ORM.

Before the counter, the TTL (5 s) was the only way edits spread, and it cost a
database query on the ledger threads for nearly every API request: a user
seldom comes back within 5 s (4.4% of the relay's py-spy samples at 32
streams, bench.relay).
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings

from chatapp import runtime

from gateway.models import Backend, ModelPrice, Plan, PlanAssignment
from gateway.pricing import Price

LARGE = "large"  # the pool name the router sends hard prompts to, when it exists
SMALL = "small"  # the model background tasks use, when it exists (services.background_model)
# How stale another process's edit may be here, at most, while Redis answers.
GENERATION_CHECK_S = 1.0
# Users' limits kept at most; past it the oldest half is dropped.
MAX_ENTRIES = 50_000


@dataclass(frozen=True)
class BackendSpec:
    name: str
    kind: str  # "local" | "openai"
    pool: str = ""
    base_url: str = ""
    remote_model: str = ""
    api_key: str = ""
    context_window: int = 8192
    fallbacks: tuple[str, ...] = ()
    listed: bool = True
    self_hosted: bool = False  # remote: may be sent a prompt before its verdict (Backend.self_hosted)

    @property
    def opens_before_verdict(self) -> bool:
        """Whether a prompt may reach this backend while its moderation is
        still running: the local engine, or a server the operator runs."""
        return self.kind == Backend.KIND_LOCAL or self.self_hosted


@dataclass(frozen=True)
class Limits:
    plan: str
    tier: str
    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_day: int
    tokens_per_month: int
    allowed_models: frozenset = field(default_factory=frozenset)  # empty: all
    max_concurrent: int = 0  # generations in flight per user; 0 = no cap
    priority: int = 0  # 0-100: lower plans are shed first in a capacity spike

    def allows(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


def _split(names: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in names.split(",") if n.strip())


def _load_backends() -> dict[str, BackendSpec]:
    specs: dict[str, BackendSpec] = {}
    for name in settings.MODEL_POOLS:
        specs[name] = BackendSpec(
            name=name, kind=Backend.KIND_LOCAL, pool=name, fallbacks=tuple(settings.GATEWAY_FALLBACKS.get(name, ()))
        )
    for name, cfg in settings.GATEWAY_BACKENDS.items():
        specs[name] = BackendSpec(
            name=name,
            kind=Backend.KIND_OPENAI,
            base_url=cfg["base_url"],
            remote_model=cfg.get("model", ""),
            api_key=cfg.get("api_key", ""),
            context_window=int(cfg.get("context_window", 8192)),
            fallbacks=tuple(cfg.get("fallbacks", settings.GATEWAY_FALLBACKS.get(name, ()))),
            self_hosted=cfg.get("self_hosted") is True,
        )
    for row in Backend.objects.all():
        if not row.enabled:
            specs.pop(row.name, None)
            continue
        specs[row.name] = BackendSpec(
            name=row.name,
            kind=row.kind,
            pool=row.pool or row.name,
            base_url=row.base_url,
            remote_model=row.remote_model,
            api_key=row.api_key,
            context_window=row.context_window,
            fallbacks=_split(row.fallbacks) or tuple(settings.GATEWAY_FALLBACKS.get(row.name, ())),
            listed=row.listed,
            self_hosted=row.self_hosted,
        )
    return specs


def _default_limits() -> Limits:
    plan = Plan.objects.filter(is_default=True).first()
    if plan is not None:
        return _limits(plan)
    return Limits(
        plan="default",
        tier=Plan.TIER_STANDARD,
        requests_per_minute=settings.GATEWAY_DEFAULT_RPM,
        tokens_per_minute=settings.GATEWAY_DEFAULT_TPM,
        tokens_per_day=settings.GATEWAY_DEFAULT_TPD,
        tokens_per_month=settings.GATEWAY_DEFAULT_TPMONTH,
        max_concurrent=settings.ABUSE_DEFAULT_MAX_CONCURRENT,
    )


def _limits(plan: Plan) -> Limits:
    return Limits(
        plan=plan.name,
        tier=plan.tier,
        requests_per_minute=plan.requests_per_minute,
        tokens_per_minute=plan.tokens_per_minute,
        tokens_per_day=plan.tokens_per_day,
        tokens_per_month=plan.tokens_per_month,
        allowed_models=frozenset(_split(plan.allowed_models)),
        max_concurrent=plan.max_concurrent,
        priority=plan.priority,
    )


def _load_limits(user_id: int) -> Limits:
    assignment = PlanAssignment.objects.select_related("plan").filter(user_id=user_id).first()
    return _limits(assignment.plan) if assignment else _default_limits()


def _load_prices() -> dict[str, Price]:
    return {
        row.model: Price(
            basis=row.basis,
            prompt_per_1k=row.prompt_per_1k,
            cached_prompt_per_1k=row.cached_prompt_per_1k,
            completion_per_1k=row.completion_per_1k,
            hardware_per_hour=row.hardware_per_hour,
        )
        for row in ModelPrice.objects.all()
    }


_lock = threading.Lock()
_cache: dict[object, tuple[float, object]] = {}
_epoch = 0  # moves at every invalidation: a load that straddles one is not kept
_UNSEEN = object()
_MISS = object()
_generation: object = _UNSEEN  # the Redis counter's value when last read
_checked_at = float("-inf")


def _generation_key() -> str:
    return f"{settings.CACHES['default']['KEY_PREFIX']}:gw-registry-generation"


def _lookup(key) -> tuple[object, float, int]:
    """(the kept value or _MISS, and the time and epoch a load is to be kept under)."""
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and now - hit[0] < settings.GATEWAY_REGISTRY_TTL_S:
        return hit[1], now, _epoch
    return _MISS, now, _epoch


def _keep(key, stamp: float, value, epoch: int) -> None:
    with _lock:
        if epoch != _epoch:
            return  # invalidated while it loaded: it may predate the edit
        if len(_cache) >= MAX_ENTRIES:
            for old in sorted(_cache, key=lambda k: _cache[k][0])[:MAX_ENTRIES // 2]:
                del _cache[old]
        _cache[key] = (stamp, value)


def _observe(generation) -> None:
    global _generation
    if generation != _generation:
        moved = _generation is not _UNSEEN
        _generation = generation
        if moved:
            _forget()


def _due() -> bool:
    """Whether to read the counter now; claims the read, so a burst reads it once."""
    global _checked_at
    now = time.monotonic()
    if now - _checked_at < GENERATION_CHECK_S:
        return False
    _checked_at = now
    return True


def _cached(key, loader):
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    # On a loop's thread a blocking Redis read could hold the loop (a dead
    # Redis: its connect timeout); the async callers there read the counter.
    if not in_loop and _due():
        try:
            _observe(runtime.redis_sync().get(_generation_key()))
        except runtime.REDIS_ERRORS:
            pass  # the TTL still bounds what is kept
    value, now, epoch = _lookup(key)
    if value is _MISS:
        # The ORM refuses to run on an event loop's thread: a sync caller there
        # (model_info from async code) gets the gateway's DB thread.
        value = runtime.run_on_db_thread_sync(loader) if in_loop else loader()
        _keep(key, now, value, epoch)
    return value


async def _acached(key, loader):
    if _due():
        try:
            _observe(await runtime.redis_async().get(_generation_key()))
        except runtime.REDIS_ERRORS:
            pass  # the TTL still bounds what is kept
    value, now, epoch = _lookup(key)
    if value is _MISS:
        value = await runtime.on_db_thread(loader, runtime.LEDGER_DB)()
        _keep(key, now, value, epoch)
    return value


def backends() -> dict[str, BackendSpec]:
    return _cached("backends", _load_backends)


async def abackends() -> dict[str, BackendSpec]:
    return await _acached("backends", _load_backends)


async def alimits(user_id: int) -> Limits:
    return await _acached(("limits", user_id), lambda: _load_limits(user_id))


def limits(user_id: int) -> Limits:
    return _cached(("limits", user_id), lambda: _load_limits(user_id))


async def aprices() -> dict[str, Price]:
    """Every model's price (ModelPrice rows, by model name): the finish stage's bill."""
    return await _acached("prices", _load_prices)


def _forget() -> None:
    global _epoch
    with _lock:
        _cache.clear()
        _epoch += 1


@runtime.on_reset
def invalidate() -> None:
    """Forget the cached backends, plans and prices in this process (tests; `changed`)."""
    global _checked_at
    _forget()
    _checked_at = float("-inf")  # the next lookup reads the counter again


def changed() -> None:
    """A backend, plan, assignment or price was saved or deleted: this process
    forgets them now, every other one within GENERATION_CHECK_S once the
    transaction commits."""
    invalidate()
    runtime.redis_after_commit(lambda redis: redis.incr(_generation_key()),
                               "could not tell other processes of a registry change; "
                               "they see it within GATEWAY_REGISTRY_TTL_S")
