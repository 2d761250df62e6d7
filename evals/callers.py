"""How an eval reaches the models: like any other caller of the gateway.

`GatewayCaller` goes through `gateway.client.current()` in this process
(`manage.py run_evals`: the same path as the API and the chat pages, the
pools load on first use). `ServingApiCaller` is for the Celery worker, which
holds no model (chatapp.celery): it sends the same requests to the serving
process's /v1 API with the internal credential, as titles and summaries do
(conversations.tasks).

Eval requests skip the gateway's reply caches: a cached reply would measure
what a model said yesterday, or what it said to a similar question.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx

from conversations import tasks as conversation_tasks
from gateway import client
from gateway.types import PRIORITY_BACKGROUND, Blocked, ChatRequest, GatewayError
from retrieval import services as retrieval


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # the gateway's: stop | length | content_filter | error
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    blocked: bool = False  # the prompt was refused by moderation before any token
    error: str = ""
    raw_text: str = ""  # the model's own text when `text` is the product's rework of it (titles)


@dataclass(frozen=True)
class Params:
    model: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class GatewayCaller:
    """In this process, through the gateway's client."""

    def complete(self, messages: list[dict], params: Params) -> Reply:
        request = ChatRequest(
            messages=messages, model=params.model, max_tokens=params.max_tokens, temperature=params.temperature,
            seed=params.seed, stop=params.stop, priority=PRIORITY_BACKGROUND, source="task", use_cache=False,
            request_id=f"eval-{uuid.uuid4().hex}",
        )
        try:
            text, final = client.current().complete(request)
        except Blocked as exc:
            return Reply("", "content_filter", blocked=True, error=exc.message)
        except GatewayError as exc:
            return Reply("", "error", error=exc.message)
        usage = final.usage
        return Reply(text, final.finish_reason, final.model, usage.prompt_tokens, usage.completion_tokens,
                     error=final.error or "")

    def embed(self, texts: list[str]) -> list[list[float]]:
        return retrieval.embed(texts)


class ServingApiCaller:
    """Over HTTP to the serving process's /v1 API (the Celery worker)."""

    def _post(self, path: str, body: dict, extra_headers: dict | None = None) -> httpx.Response:
        with conversation_tasks.serving_api() as api:
            return api.post(path, json=body, headers=extra_headers or {})

    def complete(self, messages: list[dict], params: Params) -> Reply:
        body = {"model": params.model or "auto", "messages": messages, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "stop": list(params.stop) or None}
        if params.seed is not None:
            body["seed"] = params.seed
        try:
            response = self._post("/v1/chat/completions", body, {"Cache-Control": "no-cache"})
        except httpx.TransportError as exc:
            return Reply("", "error", error=f"{type(exc).__name__}: {exc}")
        data = _json(response)
        if response.status_code != 200:
            error = (data.get("error") or {}) if isinstance(data, dict) else {}
            message = error.get("message") or response.text[:200]
            blocked = error.get("code") == Blocked.code
            return Reply("", "content_filter" if blocked else "error", blocked=blocked, error=message)
        choice, usage = data["choices"][0], data.get("usage") or {}
        return Reply(choice["message"]["content"] or "", choice["finish_reason"], data.get("model", ""),
                     usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    def embed(self, texts: list[str]) -> list[list[float]]:
        response = self._post("/v1/embeddings", {"model": "embedding", "input": list(texts)})
        response.raise_for_status()
        return [row["embedding"] for row in sorted(response.json()["data"], key=lambda row: row["index"])]


def _json(response: httpx.Response):
    try:
        return response.json()
    except ValueError:
        return {}
