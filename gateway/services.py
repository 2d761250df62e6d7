"""The one entry point for every generation in the product.

First version: straight to the local engine pool. The gateway issue adds
routing, quotas, caching, fallback and remote backends behind the same
functions (`stream_chat`, `abort`, `complete`, `model_info`, `count_prompt_tokens`).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from asgiref.sync import async_to_sync
from django.conf import settings

from gateway.types import (
    BadRequest,
    ChatRequest,
    FinalEvent,
    ModelInfo,
    ModelNotFound,
    Overloaded,
    TokenEvent,
    Usage,
)


def _pool_name(model: str | None) -> str:
    name = model or settings.DEFAULT_POOL
    if name not in settings.MODEL_POOLS:
        raise ModelNotFound(f"The model '{name}' does not exist")
    return name


def _engine(model: str | None):
    from inference import pools

    return pools.get(_pool_name(model))


def model_info(model: str | None = None) -> ModelInfo:
    engine = _engine(model)
    return ModelInfo(name=_pool_name(model), context_window=engine.max_model_len)


def count_prompt_tokens(messages: list[dict], model: str | None = None) -> int:
    """Tokens of the rendered chat prompt, with the model's own template."""
    return len(_engine(model).apply_chat_template(messages))


def _sampling_params(request: ChatRequest):
    from inference import SamplingParams

    try:
        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop),
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


async def stream_chat(request: ChatRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
    from inference import EngineSaturated, PromptTooLong

    pool = _pool_name(request.model)
    engine = await asyncio.to_thread(_engine, pool)  # may load the model on first use
    prompt = engine.apply_chat_template(request.messages)
    params = _sampling_params(request)
    try:
        handle = engine.submit(prompt, params, request_id=request.request_id, priority=request.priority)
    except EngineSaturated as exc:
        raise Overloaded(f"The model '{pool}' is at capacity; try again shortly ({exc})", retry_after_s=1) from None
    except PromptTooLong as exc:
        raise BadRequest(str(exc)) from None
    async for event in handle:
        if event.finished:
            usage = event.usage
            yield FinalEvent(
                finish_reason=event.finish_reason,
                usage=Usage(
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_tokens=usage.cached_tokens,
                ),
                model=pool,
                route=f"local:{pool}",
            )
            return
        if event.text or event.token_ids:
            yield TokenEvent(text=event.text, token_ids=tuple(event.token_ids))


def abort(request_id: str) -> None:
    """Abort a generation in this process's engines (no-op when unknown)."""
    from inference import pools

    for name in settings.MODEL_POOLS:
        if pools.loaded(name):
            pools.get(name).abort(request_id)


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
