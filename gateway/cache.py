"""Exact and semantic reply caches.

Exact: Redis, keyed by a hash of the model, the full message list, the
sampling parameters and the scope. Semantic: pgvector, for first questions only
(no earlier turns), keyed by model + system prompt + sampling parameters +
scope and matched by the cosine similarity of the question's embedding.

Scope is per user unless GATEWAY_CACHE_SCOPE=deployment: another user's
entries are never even compared (the leak other gateways shipped).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from pgvector.django import CosineDistance

from chatapp import runtime
from chatapp.runtime import REDIS_ERRORS
from gateway.models import SemanticCacheEntry
from gateway.types import ChatRequest
from retrieval.services import aembed

PURGE_PROBABILITY = 0.01


@dataclass(frozen=True)
class CachedReply:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    kind: str  # "exact" | "semantic"


def scope(user_id: int | None) -> str:
    if settings.GATEWAY_CACHE_SCOPE == "deployment" or user_id is None:
        return "deployment"
    return f"user:{user_id}"


def cacheable(request: ChatRequest) -> bool:
    return request.use_cache and (request.temperature == 0 or settings.GATEWAY_CACHE_SAMPLED)


def _params(request: ChatRequest) -> dict:
    return {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": list(request.stop),
    }


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def exact_key(request: ChatRequest, model: str) -> str:
    payload = {"model": model, "messages": request.messages, "params": _params(request), "scope": scope(request.user_id)}
    return f"gw:exact:{_digest(payload)}"


async def exact_get(request: ChatRequest, model: str) -> CachedReply | None:
    try:
        raw = await runtime.redis_async().get(exact_key(request, model))
    except REDIS_ERRORS:
        return None  # a cache is an optimisation: without Redis, just miss
    if raw is None:
        return None
    data = json.loads(raw)
    return CachedReply(kind="exact", **data)


async def exact_put(request: ChatRequest, model: str, *, text, finish_reason, prompt_tokens, completion_tokens) -> None:
    value = json.dumps(
        {"text": text, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
         "completion_tokens": completion_tokens}
    )
    try:
        await runtime.redis_async().set(exact_key(request, model), value, ex=settings.GATEWAY_CACHE_TTL_S)
    except REDIS_ERRORS:
        pass


# ---------------------------------------------------------------- semantic

def semantic_question(request: ChatRequest) -> str | None:
    """The question to compare by meaning, or None when the request does not qualify."""
    if request.has_history:
        return None
    users = [m for m in request.messages if m["role"] == "user"]
    if len(users) != 1 or any(m["role"] not in ("system", "user") for m in request.messages):
        return None
    question = users[0]["content"]
    if not isinstance(question, str) or not question.strip() or len(question) > settings.GATEWAY_SEMANTIC_MAX_CHARS:
        return None
    return question


def semantic_key(request: ChatRequest, model: str) -> str:
    system = [m["content"] for m in request.messages if m["role"] == "system"]
    return _digest({"model": model, "system": system, "params": _params(request)})


async def embed_question(text: str) -> list[float]:
    return (await aembed([text]))[0]


async def semantic_get(request: ChatRequest, model: str, question: str) -> tuple[CachedReply | None, list[float]]:
    vector = await embed_question(question)
    max_distance = 1.0 - settings.GATEWAY_SEMANTIC_THRESHOLD
    nearest = (
        SemanticCacheEntry.objects.filter(
            scope=scope(request.user_id), key_hash=semantic_key(request, model), expires_at__gt=timezone.now()
        )
        .annotate(distance=CosineDistance("embedding", vector))
        .filter(distance__lte=max_distance)
        .order_by("distance")
    )
    entry = await runtime.on_db_thread(nearest.first, runtime.LEDGER_DB)()
    if entry is None:
        return None, vector
    reply = CachedReply(
        text=entry.response,
        finish_reason=entry.finish_reason,
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        kind="semantic",
    )
    return reply, vector


async def semantic_put(request, model, question, vector, *, text, finish_reason, prompt_tokens, completion_tokens):
    if random.random() < PURGE_PROBABILITY:
        # Expired entries are never read; sweep them now and then instead of a scheduled job.
        expired = SemanticCacheEntry.objects.filter(expires_at__lte=timezone.now())
        await runtime.on_db_thread(expired.delete, runtime.LEDGER_DB)()
    await runtime.on_db_thread(SemanticCacheEntry.objects.create, runtime.LEDGER_DB)(
        scope=scope(request.user_id),
        key_hash=semantic_key(request, model),
        prompt=question,
        embedding=vector,
        response=text,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=model,
        expires_at=timezone.now() + timedelta(seconds=settings.GATEWAY_CACHE_TTL_S),
    )
