"""The one entry point for every generation in the product.

`stream_chat(request)` runs the policy the model cannot: moderation of the
prompt, routing, the token quota (reserve before, reconcile after), the exact
and semantic caches, the backend with its fallback chain and circuit breakers,
moderation of the reply while it streams, and a ledger row. Events: TokenEvents
then exactly one FinalEvent; a GatewayError is raised before the first token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, suppress

from dataclasses import dataclass

from asgiref.sync import async_to_sync
from django.conf import settings

from chatapp import runtime
from gateway import admission, backends, cache, concurrency, pricing, quotas, registry, router
from gateway.backends import BackendFailure, BackendFinal
from gateway.models import Backend, UsageRecord
from gateway.registry import BackendSpec, Limits
from gateway.types import (
    MAX_MODEL_NAME_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    SEED_LIMIT,
    BadRequest,
    Blocked,
    ChatRequest,
    FinalEvent,
    ModelInfo,
    ModelNotFound,
    ModerationUnavailable,
    Overloaded,
    TokenEvent,
    Unavailable,
    Usage,
)
from observability import metrics
from retrieval import services as retrieval_services
from safety.services import OutputWindow, amoderate_cached, amoderate_messages, load_checkers

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant", "tool"}
JUDGE_SOURCE = "judge"  # the safety judge's own requests (safety.judge), not moderated again
UNLIMITED = Limits(plan="internal", tier="pro", requests_per_minute=0, tokens_per_minute=0,
                   tokens_per_day=0, tokens_per_month=0)

# request_id -> (backend spec, AbortSignal | None), for abort() from any thread.
_inflight: dict[str, tuple[BackendSpec, backends.AbortSignal | None]] = {}
# Stop can arrive before a backend has the request (during the quota or cache
# step); remembered briefly so the backend is stopped as soon as it starts.
_early_aborts: dict[str, float] = {}
EARLY_ABORT_TTL_S = 120
# request_id -> the x-ratelimit-* headers its admission computed (the windows
# with its own reservation counted), while it is in flight: a streamed API
# reply sends them before its first chunk without reading the windows again.
_admitted_headers: dict[str, dict[str, str]] = {}


# ------------------------------------------------------------------ helpers

def _validate(request: ChatRequest) -> None:
    """Every bound, for every caller (API, chat, tasks), before any work is
    done on the request: nothing out of range reaches a tokenizer, the quota
    or an engine, where one bad request could fail other users' replies."""
    _check_messages(request.messages)
    _check_sampling(request)
    model = request.model
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL_NAME_CHARS):
        raise BadRequest(f"the model name must be a string of at most {MAX_MODEL_NAME_CHARS} characters")


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    if len(messages) > settings.GATEWAY_MAX_MESSAGES:
        raise BadRequest(f"{len(messages):,} messages; the limit is {settings.GATEWAY_MAX_MESSAGES:,} per request")
    chars = 0
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"each message needs a role among {sorted(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise BadRequest("each message needs text content")
        if "\x00" in content:
            raise BadRequest("message content must not contain NUL characters (\\u0000)")
        chars += len(content)
    # Checked before anything tokenizes the prompt: the tokenizer's time grows with it.
    if chars > settings.GATEWAY_MAX_REQUEST_CHARS:
        raise BadRequest(
            f"the messages are {chars:,} characters long; the limit is {settings.GATEWAY_MAX_REQUEST_CHARS:,}"
        )


def _between(value, low, high, *, open_low: bool = False) -> bool:
    """A real number in range. Ints compare exactly (float(10**400) would
    overflow); NaN and infinities are never in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (low < value if open_low else low <= value) and value <= high


def _check_sampling(request: ChatRequest) -> None:
    max_tokens = request.max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= settings.GATEWAY_MAX_TOKENS:
        raise BadRequest(f"max_tokens must be an integer between 1 and {settings.GATEWAY_MAX_TOKENS}")
    if not _between(request.temperature, 0, 2):
        raise BadRequest("temperature must be between 0 and 2")
    if not _between(request.top_p, 0, 1, open_low=True):
        raise BadRequest("top_p must be in (0, 1]")
    seed = request.seed
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT):
        raise BadRequest(f"seed must be an integer between 0 and {SEED_LIMIT - 1}")
    stop = request.stop
    if (not isinstance(stop, (tuple, list)) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop)):
        raise BadRequest(f"stop must be up to {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")


def _pieces(text: str) -> list[str]:
    """A cached reply streams word by word, like a generated one."""
    return re.findall(r"\s*\S+|\s+", text) or [text]


async def _limits_for(request: ChatRequest) -> Limits:
    return await registry.alimits(request.user_id) if request.user_id else UNLIMITED


# -------------------------------------------------------------------- a run

class _Run:
    """The bookkeeping of one request: what the ledger row and reconciliation need."""

    def __init__(self, request: ChatRequest, reservation):
        self.request = request
        self.reservation = reservation
        self.started = time.monotonic()
        self.ttft_ms: int | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.generation_started: float | None = None  # the serving backend was asked (hardware-time cost)
        # The plan (`_plan`): every backend, the fallback chain, why its head was chosen.
        self.specs: dict[str, BackendSpec] = {}
        self.candidates: list[str] = []
        self.reason = ""
        self.prompt_ids: list[int] | None = None  # the primary's tokens, when it is a local pool
        self.backend = ""
        self.route = ""
        self.prompt_tokens = 0
        self.started_generating = False  # a backend accepted the request: its prompt is paid for
        self.completion_tokens = 0  # counted while streaming, for a reply cut short
        self.settled = False
        self.lease: concurrency.Lease | None = None  # the user's slot in flight (abuse limits)
        self.input_check: _InputCheck | None = None  # the input's moderation, in flight beside the stages

    def usage_so_far(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)

    def first_token(self) -> None:
        """Called for every token event: TTFT once, the last one for ITL."""
        now = time.monotonic()
        if self.ttft_ms is None:
            self.ttft_ms = int((now - self.started) * 1000)
            self.first_token_at = now
        self.last_token_at = now

    async def _measures(self, usage: Usage, cache_hit: str) -> dict:
        """The ledger row's cost, savings, ITL and generation time (issue 15)."""
        generation_s = None
        if self.generation_started is not None and not cache_hit:
            generation_s = time.monotonic() - self.generation_started
        itl_ms = None
        if not cache_hit and self.first_token_at is not None and usage.completion_tokens > 1:
            itl_ms = (self.last_token_at - self.first_token_at) * 1000 / (usage.completion_tokens - 1)
        costs = pricing.costs(
            await registry.aprices(), backend=self.backend, usage=usage, cache_hit=cache_hit,
            generation_s=generation_s, routed_from=registry.LARGE if self.reason == "default" else None,
        )
        generation_ms = int(generation_s * 1000) if generation_s is not None else None
        return {**costs.as_fields(), "itl_ms": itl_ms, "generation_ms": generation_ms}

    def settle(self, *, status: str, usage: Usage, cache_hit: str = "", error: str = "",
               charge: bool = True) -> Awaitable[None]:
        """Reconcile the quota and write the ledger row, once, whatever happened.

        The run counts as settled from this call, not from when the awaitable
        runs: a consumer that leaves right after the final event (whose
        settling `_serve` started before yielding it) is not settled again as
        an abort. A cache hit, or a request no model started on, is charged nothing."""
        if self.settled:
            return asyncio.sleep(0)
        self.settled = True
        metrics.gateway_request(backend=self.backend, source=self.request.source, status=status)
        charged = 0 if cache_hit or not charge else usage.prompt_tokens + usage.completion_tokens
        # Redis and Postgres in parallel.
        return asyncio.gather(
            self._reconcile(charged), self._write_ledger(status, usage, cache_hit, error, charged)
        )

    async def _reconcile(self, charged: int) -> None:
        if self.reservation is not None:
            await quotas.reconcile(self.reservation, charged_tokens=charged)

    async def _write_ledger(self, status, usage, cache_hit, error, charged) -> None:
        try:
            measures = await self._measures(usage, cache_hit)
        except Exception:
            # Unpriced is better than unrecorded: the row is still written.
            log.exception("could not price %s", self.request.request_id)
            measures = {}
        try:
            await runtime.on_db_thread(UsageRecord.objects.create, runtime.LEDGER_DB)(
                user_id=self.request.user_id,
                api_key_id=self.request.api_key_id,
                request_id=self.request.request_id,
                source=self.request.source,
                model=self.request.model or "",
                backend=self.backend,
                route=self.route[:200],
                status=status,
                cache_hit=cache_hit,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                charged_tokens=charged,
                reserved_tokens=self.reservation.tokens if self.reservation else 0,
                ttft_ms=self.ttft_ms,
                duration_ms=int((time.monotonic() - self.started) * 1000),
                error=error or "",
                **measures,
            )
        except Exception:
            # The reply matters more than its ledger row; never fail the user for it.
            log.exception("could not write the usage ledger for %s", self.request.request_id)


async def _open(spec: BackendSpec, request: ChatRequest, prompt_ids):
    """Start a backend and wait for its first event (BackendFailure before it)."""
    if spec.kind == Backend.KIND_LOCAL:
        ids = prompt_ids if prompt_ids is not None else await backends.local_prompt_ids(spec, request.messages)
        _inflight[request.request_id] = (spec, None)
        stream = backends.local_stream(spec, request, ids)
    else:
        signal = backends.AbortSignal()
        _inflight[request.request_id] = (spec, signal)
        stream = backends.remote_stream(spec, request, signal)
    try:
        first = await stream.__anext__()
        if isinstance(first, BackendFinal) and first.finish_reason == "error":
            raise BackendFailure(f"backend '{spec.name}' failed before its first token: {first.error}")
        if _early_aborts.pop(request.request_id, None) is not None:
            _abort_backend(spec, request.request_id)
    except StopAsyncIteration:
        raise BackendFailure(f"backend '{spec.name}' ended without a reply") from None
    except BackendFailure:
        await stream.aclose()
        raise
    except Exception as exc:
        if isinstance(exc, BadRequest):
            raise
        await stream.aclose()
        raise BackendFailure(f"backend '{spec.name}' failed: {type(exc).__name__}: {exc}") from None
    return stream, first


# -------------------------------------------------------------- entry point

async def stream_chat(request: ChatRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
    """The gateway's stages, in order: check the request → moderate the input
    → route and reserve the quota → cache → open a backend (fallback chain,
    circuits) → relay its tokens through the output window → settle (bill,
    ledger, cache the reply). The input's moderation runs beside the stages
    after it, and the first event waits for its verdict (_InputCheck)."""
    _validate(request)
    check = _InputCheck(request)
    run = await _planned(request, check)
    if run.reservation is not None:
        _admitted_headers[request.request_id] = run.reservation.headers
    try:
        async with aclosing(_serve(run)) as events:
            async for event in events:
                await check.passed()
                yield event
    except BaseException as exc:
        outcome = await _settle_early_end(run, exc)
        if outcome is not exc:
            raise outcome from None
        raise
    finally:
        check.cancel()
        _inflight.pop(request.request_id, None)
        _early_aborts.pop(request.request_id, None)
        _admitted_headers.pop(request.request_id, None)
        # Shielded: a cancelled consumer must not leave the slot taken until its lease expires.
        await asyncio.shield(concurrency.release(run.lease))


async def _planned(request: ChatRequest, check: _InputCheck) -> _Run:
    """`_plan`, with the input's check attached; when planning refuses the
    request (quota, capacity, unknown model), a block of its input outranks that."""
    try:
        run = await _plan(request)
    except BaseException as exc:
        outcome = await check.instead_of(exc)
        check.cancel()
        if outcome is exc:
            raise
        # Nothing generated or charged, but the refusal is on the record.
        await _Run(request, None).settle(status="blocked", usage=Usage(), error=outcome.message, charge=False)
        raise outcome from None
    run.input_check = check
    return run


async def _settle_early_end(run: _Run, exc: BaseException) -> BaseException:
    """A request that ended by an exception: refused before the first token
    (all backends down, the input blocked) or its consumer went away
    (generator closed, task cancelled). Refund what was not used, keep the
    ledger row; returns what to raise (a block outranks other refusals)."""
    outcome = await run.input_check.instead_of(exc)
    held = isinstance(outcome, (Blocked, ModerationUnavailable))  # the prompt never passed: nothing was shown
    if held:
        abort(run.request.request_id)  # a local generation started beside the check: free its slot now
        status, usage = ("blocked" if isinstance(outcome, Blocked) else "error"), Usage()
    else:
        status = "abort" if isinstance(exc, (GeneratorExit, asyncio.CancelledError)) else "error"
        usage = Usage(prompt_tokens=run.prompt_tokens, completion_tokens=run.completion_tokens)
    await run.settle(status=status, usage=usage, error=getattr(outcome, "message", "") or str(outcome),
                     charge=run.started_generating and not held)
    return outcome


class _InputCheck:
    """The input's moderation, started before routing and awaited only before
    the first event is yielded: routing, the quota, the cache lookup and the
    backend's prefill run meanwhile, so the checkers' time (mostly the
    embedding head's) overlaps them instead of preceding them. Nothing is
    shown before the verdict; a block ends the request as a refusal before
    the first token (Blocked), the generation aborted and charged nothing.
    Every message is checked, whatever its role (a forged assistant turn or a
    tool result can carry an attack too). The judge's own request is the one
    exception: it is moderation (safety.judge), and checking it would recurse."""

    def __init__(self, request: ChatRequest):
        self.task, self.task_request_id = None, request.request_id
        if request.source != JUDGE_SOURCE:
            self.task = asyncio.ensure_future(amoderate_messages(request.messages, user_id=request.user_id))

    async def passed(self) -> None:
        """Return once the input is allowed (at once after the first call);
        raise Blocked, or ModerationUnavailable when it could not be checked."""
        if self.task is not None:
            task, self.task = self.task, None
            verdict = await task
            if verdict.unchecked:
                raise ModerationUnavailable(verdict.reason)
            if verdict.blocked:
                raise Blocked(verdict.reason)

    async def instead_of(self, exc: BaseException) -> BaseException:
        """What to raise for `exc`, which ended the request before the verdict
        was awaited: a block outranks any refusal (quota, capacity, backends
        down). A consumer that went away needs no verdict."""
        if self.task is None or isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
            return exc
        try:
            await self.passed()
        except Blocked as blocked:
            return blocked
        except ModerationUnavailable:
            return exc  # not a verdict on the input: the refusal in hand stands
        except Exception:
            log.exception("moderating the input of %s", self.task_request_id)
        return exc

    def cancel(self) -> None:
        """Drop a verdict nobody will read (the consumer went away)."""
        if self.task is None:
            return
        if self.task.done() and not self.task.cancelled():
            self.task.exception()  # read, so asyncio does not log it as never retrieved
        self.task.cancel()


async def _plan(request: ChatRequest) -> _Run:
    """Route, count the prompt with the primary model's tokenizer, reserve the quota."""
    specs = await registry.abackends()
    limits = await _limits_for(request)
    estimate = backends.estimate_tokens(request.messages)
    name, reason = router.choose(request, specs, limits, estimate)
    prompt_ids = None
    prompt_tokens = estimate
    if specs[name].kind == Backend.KIND_LOCAL:
        try:
            prompt_ids = await backends.local_prompt_ids(specs[name], request.messages)
            prompt_tokens = len(prompt_ids)
        except BackendFailure:
            pass  # the fallback chain will deal with it; reserve on the estimate
    request, reservation, lease = await _admit(request, limits, prompt_tokens + request.max_tokens)
    run = _Run(request, reservation)
    run.lease = lease
    run.specs, run.candidates, run.reason = specs, router.chain(name, specs, limits), reason
    run.route = f"{reason}:{name}"
    run.prompt_ids, run.prompt_tokens = prompt_ids, prompt_tokens
    return run


async def _admit(request: ChatRequest, limits: Limits, tokens: int):
    """(request, quota reservation, lease): a slot in flight first (per-user
    cap, capacity shedding, bans; gateway.concurrency), then the tokens, in
    one Redis round trip (gateway.admission). Background work (titles,
    summaries) is the product's, not the user's: ledgered, never refused for
    quota or slots."""
    if request.user_id is None or request.source == "task":
        return request, None, None
    lease, reservation = await admission.admit(user_id=request.user_id, request_id=request.request_id,
                                               limits=limits, tokens=tokens, on_revoked=abort)
    # The fair queue: a user's extra requests wait behind other users' first ones.
    return dataclasses.replace(request, priority=lease.fair_priority(request.priority)), reservation, lease


async def _serve(run: _Run):
    lookup = _CacheLookup()
    if cache.cacheable(run.request):
        hit = await _cache_get(run, lookup)
        # A cached reply is checked again before it is replayed (the rules may
        # have changed since); one that fails is a miss, and generating again
        # goes through the output window.
        if hit is not None and (await amoderate_cached(hit.text, user_id=run.request.user_id)).blocked:
            hit = None
        if hit is not None:
            async for event in _replay(run, hit):
                yield event
            return
    stream, first = await _open_with_fallback(run)
    final = None
    text: list[str] = []
    async for event in _relay(run, stream, first, text):
        if isinstance(event, BackendFinal):
            final = event
        else:
            yield event
    final_event, settling = _finish(run, final, "".join(text), lookup)
    try:
        yield final_event
    finally:
        # The reply is whole once its final event is out: the bill, the ledger
        # row and the cache entry are written beside its delivery (the API's
        # [DONE], the chat's end event), not before it, and a consumer that
        # goes away or is cancelled meanwhile does not stop them (shield).
        # Delivered already: a failed cache write is not the reply's failure
        # (_settled logs it, whether anyone still waits here or not).
        with suppress(Exception):
            await asyncio.shield(settling)


@dataclass
class _CacheLookup:
    """What a cache miss learned, reused to store the reply (no second embedding)."""
    done: bool = False  # the request was cacheable and looked up
    question: str | None = None
    vector: list[float] | None = None


async def _cache_get(run: _Run, lookup: _CacheLookup) -> cache.CachedReply | None:
    request, model = run.request, run.candidates[0]
    lookup.done = True
    hit = await cache.exact_get(request, model) if settings.GATEWAY_EXACT_CACHE else None
    if hit is None and settings.GATEWAY_SEMANTIC_CACHE:
        lookup.question = cache.semantic_question(request)
        if lookup.question is not None:
            try:
                hit, lookup.vector = await cache.semantic_get(request, model, lookup.question)
            except Exception:
                # A cache is an optimisation: when it fails, generate.
                log.exception("semantic cache lookup failed for %s", request.request_id)
    if hit is None:
        metrics.cache_miss()
    else:
        metrics.cache_hit(hit.kind)
    return hit


async def _open_with_fallback(run: _Run):
    """The first backend of the chain that accepts the request and produces a
    first event; saturation is tried around, never counted as a failure."""
    hops: list[str] = []
    saturated = False
    last_error = ""
    for name in run.candidates:
        breaker = backends.circuit(name)
        if not breaker.allow():
            hops.append(f"{name}(circuit-open)")
            metrics.fallback(name, "circuit_open")
            continue
        if not run.specs[name].opens_before_verdict and run.input_check is not None:
            # A prompt leaves the deployment only once it passed: a blocked one
            # must not reach (nor be billed by, nor flag our key at) a hosted provider.
            await run.input_check.passed()
        run.generation_started = time.monotonic()
        try:
            opened = await _open(run.specs[name], run.request, run.prompt_ids if name == run.candidates[0] else None)
        except BackendFailure as exc:
            saturated = saturated or exc.saturated
            if exc.saturated:
                breaker.success()  # busy is alive: saturation never opens a circuit
            else:
                breaker.failure()
            hops.append(f"{name}({'saturated' if exc.saturated else 'failed'})")
            metrics.fallback(name, "saturated" if exc.saturated else "failed")
            last_error = str(exc)
            log.warning("backend %s refused %s: %s", name, run.request.request_id, exc)
            continue
        run.backend, run.started_generating = name, True
        run.route = f"{run.reason}:" + " > ".join([*hops, name])
        return opened
    run.route = f"{run.reason}:" + " > ".join([*hops, "none"])
    if saturated:
        raise Overloaded("Every model that could answer is at capacity.", retry_after_s=2, headers={"Retry-After": "2"})
    raise Unavailable(f"No model could answer: {last_error or 'all circuits are open'}")


async def _relay(run: _Run, stream, item, text: list[str]):
    """The backend's tokens through the output moderation window; ends with
    one BackendFinal. After the first token a failure ends the reply, never
    raises: the caller keeps the partial text and marks it as an error."""
    request = run.request
    window = OutputWindow(user_id=request.user_id)
    try:
        while not isinstance(item, BackendFinal):
            run.first_token()
            text.append(item.text)
            run.completion_tokens += max(item.pieces, len(item.token_ids))
            shown = await window.apush(item.text) if request.source != JUDGE_SOURCE else item.text
            if window.verdict.blocked:
                abort(request.request_id)
                item = BackendFinal("content_filter", run.usage_so_far(), error=window.verdict.reason)
                break
            if shown:
                yield TokenEvent(text=shown, token_ids=() if window.active else item.token_ids, pieces=item.pieces)
            item = await _next_event(run, stream)
    except BaseException:
        # Stop or disconnect while streaming: free the engine slot / remote stream now.
        _abort_backend(run.specs[run.backend], request.request_id)
        raise
    finally:
        await stream.aclose()
    # The whole-message check: a reply whose parts passed can still fail as a whole.
    tail = await window.aflush() if request.source != JUDGE_SOURCE else ""
    if window.verdict.blocked and item.finish_reason != "content_filter":
        item = BackendFinal("content_filter", item.usage, error=window.verdict.reason)
    if tail:
        yield TokenEvent(text=tail)
    yield item


async def _next_event(run: _Run, stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return BackendFinal("error", run.usage_so_far(), error="the backend ended early")
    except Exception as exc:
        log.warning("backend %s failed mid-reply %s: %r", run.backend, run.request.request_id, exc)
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return BackendFinal("error", run.usage_so_far(), error=message)


# Settlements in flight: the loop keeps only weak references to tasks.
_settling: set[asyncio.Future] = set()


def _settled(request_id: str, settling: asyncio.Future) -> None:
    _settling.discard(settling)
    if not settling.cancelled() and settling.exception() is not None:
        log.error("settling %s after its final event failed", request_id, exc_info=settling.exception())


def _finish(run: _Run, final: BackendFinal, text: str, lookup: _CacheLookup) -> tuple[FinalEvent, asyncio.Future]:
    """Circuit bookkeeping; the final event, and the task that bills and
    caches the reply (in parallel), started now."""
    breaker = backends.circuit(run.backend)
    if final.finish_reason == "error":
        breaker.failure()
    else:
        breaker.success()
    settle = run.settle(status=final.finish_reason, usage=final.usage, error=final.error or "")
    if lookup.done and final.finish_reason in ("stop", "length") and not final.error:
        settling = asyncio.gather(_store(run.request, run.backend, lookup, text, final), settle)
    else:
        settling = asyncio.ensure_future(settle)
    _settling.add(settling)
    settling.add_done_callback(functools.partial(_settled, run.request.request_id))
    event = FinalEvent(
        finish_reason=final.finish_reason, usage=final.usage, model=run.backend, route=run.route, error=final.error
    )
    return event, settling


async def _replay(run: _Run, hit: cache.CachedReply):
    model = run.candidates[0]
    run.backend = model
    run.route = f"{run.route} (cache:{hit.kind})"
    for piece in _pieces(hit.text):
        run.first_token()
        yield TokenEvent(text=piece)
    usage = Usage(
        prompt_tokens=hit.prompt_tokens,
        completion_tokens=hit.completion_tokens,
        cached_tokens=hit.prompt_tokens + hit.completion_tokens,
    )
    await run.settle(status=hit.finish_reason, usage=usage, cache_hit=hit.kind)
    yield FinalEvent(finish_reason=hit.finish_reason, usage=usage, model=model, route=run.route, cache_hit=hit.kind)


async def _store(request, model, lookup: _CacheLookup, text, final: BackendFinal) -> None:
    fields = dict(
        text=text, finish_reason=final.finish_reason,
        prompt_tokens=final.usage.prompt_tokens, completion_tokens=final.usage.completion_tokens,
    )
    if settings.GATEWAY_EXACT_CACHE:
        await cache.exact_put(request, model, **fields)
    if settings.GATEWAY_SEMANTIC_CACHE:
        question = lookup.question if lookup.question is not None else cache.semantic_question(request)
        if question is None:
            return
        try:
            vector = lookup.vector if lookup.vector is not None else await cache.embed_question(question)
            await cache.semantic_put(request, model, question, vector, **fields)
        except Exception:
            log.exception("could not store a semantic cache entry")


def _abort_backend(spec: BackendSpec, request_id: str) -> None:
    entry = _inflight.get(request_id)
    if entry is not None and entry[1] is not None:
        entry[1].set()
    if spec.kind == Backend.KIND_LOCAL:
        backends.local_abort(spec, request_id)


def quota_headers(request_id: str) -> dict[str, str] | None:
    """The x-ratelimit-* headers of a request in flight in this process, as
    its admission counted the windows (its own reservation included); None
    when it reserved nothing (no user, background work) or is not in flight."""
    headers = _admitted_headers.get(request_id)
    return dict(headers) if headers is not None else None


def abort(request_id: str) -> None:
    """Stop a generation running in this process (no-op when unknown); the
    stream then ends with FinalEvent(finish_reason="abort")."""
    entry = _inflight.get(request_id)
    if entry is not None:
        _abort_backend(entry[0], request_id)
        return
    now = time.monotonic()
    for stale in [rid for rid, at in _early_aborts.items() if now - at > EARLY_ABORT_TTL_S]:
        _early_aborts.pop(stale, None)
    _early_aborts[request_id] = now
    for engine in runtime.loaded_engines():
        engine.abort(request_id)


# ------------------------------------------------------------- model facts

def load_stage_models() -> list[str]:
    """Load now what the turn's stages would otherwise load on the first
    request (seconds on a CPU, which that chat would wait for): moderation's
    checkers (by default the cascade's two MiniLMs) and, with the semantic
    cache on, the embedding model. `serve` calls it under LOAD_MODELS, after
    the engines, so that no "auto" format timing runs beside another.
    Returns what loaded, a line each, for the start-up log."""
    lines = []
    if settings.GATEWAY_SEMANTIC_CACHE:
        started = time.monotonic()
        embedding = retrieval_services.load()
        lines.append(f"embedding model ready in {time.monotonic() - started:.1f} s "
                     f"({embedding['dtype']}, {embedding['runner']})")
    started = time.monotonic()
    checkers = load_checkers()
    shown = ", ".join(f"{name} {state}" for name, state in checkers.items())
    lines.append(f"moderation ready in {time.monotonic() - started:.1f} s ({shown})")
    return lines


def _spec(model: str | None) -> BackendSpec:
    specs = registry.backends()
    name = model if model and model != router.AUTO else router.default_name(specs)
    if name is None:
        raise ModelNotFound("No model is configured.")
    if name not in specs:
        raise ModelNotFound(f"The model '{name}' does not exist")
    return specs[name]


def default_model() -> str | None:
    """What serves a chat or request that names no model (router.default_name)."""
    return router.default_name(registry.backends())


def background_model() -> str | None:
    """Titles, summaries and memory: the small model when one is served (they
    need no large one), else the default."""
    specs = registry.backends()
    return registry.SMALL if registry.SMALL in specs else router.default_name(specs)


def model_info(model: str | None = None) -> ModelInfo:
    spec = _spec(model)
    if spec.kind == Backend.KIND_LOCAL:
        return ModelInfo(name=spec.name, context_window=runtime.engine(spec.pool).max_model_len)
    return ModelInfo(name=spec.name, context_window=spec.context_window)


def count_prompt_tokens(messages: list[dict], model: str | None = None) -> int:
    """Tokens of the rendered chat prompt, with the model's own template
    (an estimate for remote models, whose tokenizer is not here)."""
    spec = _spec(model)
    if spec.kind == Backend.KIND_LOCAL:
        return len(runtime.engine(spec.pool).apply_chat_template(messages))
    return backends.estimate_tokens(messages)


def available_models(user_id: int | None = None) -> list[str]:
    """The models a user may choose (the API's /v1/models, the model picker)."""
    specs = registry.backends()
    limits = registry.limits(user_id) if user_id else UNLIMITED
    return [name for name, spec in specs.items() if spec.listed and limits.allows(name)]


async def aavailable_models(user_id: int | None = None) -> list[str]:
    specs = await registry.abackends()
    limits = await _limits_for(ChatRequest(messages=[], user_id=user_id))
    return [name for name, spec in specs.items() if spec.listed and limits.allows(name)]


async def _collect(request: ChatRequest) -> tuple[str, FinalEvent]:
    parts: list[str] = []
    final = None
    async for event in stream_chat(request):
        if isinstance(event, TokenEvent):
            parts.append(event.text)
        else:
            final = event
    return "".join(parts), final


def complete(request: ChatRequest) -> tuple[str, FinalEvent]:
    """Blocking whole-reply generation, for Celery tasks (titles, summaries)."""
    return async_to_sync(_collect)(request)
