"""Automatic memory: after a reply, the model lists facts about the user worth
keeping, and they wait on the Memory page as suggestions.

Like titles and summaries (conversations.tasks, which says why at length),
the Celery worker holds no model: it asks the serving process's own /v1 API
with the internal credential, and the gateway runs the request as the
product's own (source "task", no quota) at background priority in the engine
that serves the chats, so it yields to people waiting on a reply. Suggestions
are stored without an embedding (the worker cannot load one); accepting one
embeds it, in the web process.

The task gets the turn's texts as arguments: memory sits below the chat's
app and reads none of its tables.
"""
from __future__ import annotations

import logging

import httpx
from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.http.request import split_domain_port, validate_host

from gateway import client as gateway_client
from gateway.keys import internal_api_key
from memory import detection, selectors, services

log = logging.getLogger(__name__)

EXTRACT_SYSTEM = (
    "You pick out lasting facts about the user from their message: who they are, where they live, "
    "their work, projects, preferences and plans. Ignore questions, requests and anything about the "
    "assistant. Write each fact as one short line starting with '- ', in the user's own words "
    "(first person). If there is no such fact, answer: none"
)
EXTRACT_MAX_TOKENS = 128
# The user's message as the model sees it here; facts are near the start.
MESSAGE_MAX_CHARS = 4000
MAX_RETRIES = 4
RETRY_FIRST_WAIT_S = 10
CONNECT_TIMEOUT_S = 5
REPLY_TIMEOUT_S = 600  # waits behind every chat in the engine


class ServingUnavailable(Exception):
    """The serving process cannot answer now (down, 5xx, 429): retry later."""


def serving_api(**options) -> httpx.Client:
    """The serving process's /v1 API as the product's background jobs
    (`options` go to httpx: tests pass a transport). The same request as
    conversations.tasks.serving_api, which this app sits below and cannot import."""
    headers = {"Authorization": f"Bearer {internal_api_key()}"}
    host = httpx.URL(settings.SERVE_URL).netloc.decode()
    if not validate_host(split_domain_port(host)[0], settings.ALLOWED_HOSTS):
        headers["Host"] = next((h.lstrip(".") for h in settings.ALLOWED_HOSTS if h != "*"), host)
    if settings.HTTPS:
        headers["X-Forwarded-Proto"] = "https"
    return httpx.Client(
        base_url=settings.SERVE_URL, headers=headers,
        timeout=httpx.Timeout(REPLY_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), **options,
    )


def _background_model() -> str:
    return gateway_client.current().background_model() or ""


def _ask_for_facts(message: str) -> str:
    body = {
        "model": _background_model(), "max_tokens": EXTRACT_MAX_TOKENS, "temperature": 0.0,
        "messages": [{"role": "system", "content": EXTRACT_SYSTEM},
                     {"role": "user", "content": message[:MESSAGE_MAX_CHARS]}],
    }
    try:
        with serving_api() as api:
            response = api.post("/v1/chat/completions", json=body)
    except httpx.TransportError as exc:
        raise ServingUnavailable(f"{type(exc).__name__}: {exc}") from exc
    if response.status_code == 429 or response.status_code >= 500:
        raise ServingUnavailable(f"{response.status_code}: {response.text[:200]}")
    response.raise_for_status()  # a refusal (moderation, context): retrying changes nothing
    return response.json()["choices"][0]["message"]["content"] or ""


# ------------------------------------------------------------ enqueue

def enqueue_extraction(*, user_id, reply_id, message: str) -> None:
    """After a complete reply of a (non-temporary) chat; `message` is the
    user's. Skipped when memory is off, or the message was an explicit
    "remember that …" (already saved)."""
    if not settings.MEMORY_AUTO_EXTRACT or not selectors.memory_enabled(user_id=user_id):
        return
    if not message.strip() or detection.explicit_fact(message) is not None:
        return
    transaction.on_commit(lambda: _delay(user_id, str(reply_id), message))


def _delay(*args) -> None:
    try:
        extract_memories.delay(*args)
    except Exception:  # a broker outage must not fail the turn that triggered it
        log.exception("enqueueing memory extraction")


# ------------------------------------------------------------ the task

@shared_task(bind=True, ignore_result=True, acks_late=True, max_retries=MAX_RETRIES)
def extract_memories(self, user_id: int, reply_id: str, message: str) -> int:
    """Suggest the facts of `message`; returns how many were new."""
    try:
        answer = _ask_for_facts(message)
    except ServingUnavailable as exc:
        if self.request.retries >= self.max_retries:
            log.warning("memory extraction for %s: giving up: %s", reply_id, exc)
            return 0
        raise self.retry(exc=exc, countdown=RETRY_FIRST_WAIT_S * 2 ** self.request.retries)
    except (httpx.HTTPStatusError, KeyError, IndexError, TypeError, ValueError) as exc:
        log.warning("memory extraction for %s refused: %s", reply_id, exc)
        return 0
    facts = detection.parse_fact_list(answer, limit=settings.MEMORY_SUGGESTIONS_PER_REPLY,
                                      max_chars=settings.MEMORY_MAX_CHARS)
    return len(services.suggestions_create(user_id=user_id, reply_id=reply_id, facts=facts))
