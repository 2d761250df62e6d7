"""Background jobs: conversation titles and running summaries.

The Celery worker never loads a model. Its titles and summaries are requests
to the serving process's own OpenAI-compatible API (`POST {SERVE_URL}/v1/chat/
completions`), authenticated with the internal credential
(`gateway.keys.internal_api_key`, an HMAC of SECRET_KEY). The gateway runs
them like any request (routing, fallbacks, moderation, ledger) but as the
product's own: source "task", no user, no quota, and at background priority
in the engine that already serves the chats, so they yield to people waiting
on a reply. A worker that loaded the weights itself held a second copy of
them and of the KV cache (about 1 GiB with the bundled model), and ran beside
the engines instead of yielding to them.

HTTP rather than a queue that the serving process consumes: the API already is
the gateway's whole surface, it needs no second consumer loop inside Daphne,
and it works the same when the worker runs on another host. `serve` tells the
worker it starts its address (SERVE_URL); chatapp.celery makes the engine
package and torch unimportable in a worker, so a regression fails loudly.

When the serving process is down, restarting or overloaded (connection
refused, 5xx, 429), a task retries with growing waits and then gives up with
a log line: a chat keeps its fallback title, a summary is retried by the next
turn that needs it. Enqueued after commit; with CELERY_TASK_ALWAYS_EAGER they
run inline, still through SERVE_URL.
"""
from __future__ import annotations

import logging

import httpx
from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.http.request import split_domain_port, validate_host

from conversations import services
from conversations.models import Conversation, Message
from conversations.selectors import ancestors
from gateway import client as gateway_client
from gateway.keys import internal_api_key
from memory import tasks as memory_tasks
from observability import logs

log = logging.getLogger(__name__)

# The title job's request (the evals' "titles" suite sends the same one and
# scores what services.title_for makes of the answer). A few examples as
# earlier turns: the bundled 135M model copies their shape, where an
# instruction alone got it answering the message.
TITLE_SYSTEM = (
    "You name conversations. Reply with a short title (two to five words) that names the topic of the "
    "user's message. Do not answer the message."
)
TITLE_EXAMPLES = (
    ("How do I bake bread at home without a mixer?", "Baking Bread by Hand"),
    ("Give me five ideas for a rainy weekend with kids.", "Rainy Weekend Ideas for Kids"),
    ("What's the difference between TCP and UDP?", "TCP vs UDP"),
)
TITLE_MAX_TOKENS = 24


def title_messages(text: str) -> list[dict]:
    messages = [{"role": "system", "content": TITLE_SYSTEM}]
    for example, title in TITLE_EXAMPLES:
        messages += [{"role": "user", "content": f"Message: {example}"}, {"role": "assistant", "content": title}]
    return messages + [{"role": "user", "content": f"Message: {text[:2000]}"}]


SUMMARY_SYSTEM = (
    "You maintain a running summary of a conversation between a user and an assistant. "
    "Keep every fact, name, number, decision and open question. Be concise. Answer with the summary only."
)
SUMMARY_MAX_TOKENS = 256
# A message cut to fit the window is never cut below this.
MIN_CUT_CHARS = 200
# Tries while the serving process cannot answer: 7, with waits of 10, 20, 40,
# 80, 160 and 300 s between them, about 10 minutes in all (a restart takes seconds).
MAX_RETRIES = 6
RETRY_FIRST_WAIT_S = 10
RETRY_MAX_WAIT_S = 300
CONNECT_TIMEOUT_S = 5
# A background request waits behind every chat in the engine.
REPLY_TIMEOUT_S = 600


class ServingUnavailable(Exception):
    """The serving process cannot take the request now: worth a retry later."""


class PromptTooLong(Exception):
    """The model refused the prompt as longer than its context window."""


class Refused(Exception):
    """Any other refusal (moderation, a bad credential, an unknown model): retrying changes nothing."""


# ------------------------------------------------------------ the serving API

def serving_api(**options) -> httpx.Client:
    """A client of the serving process's /v1 API, signed in as the product's
    background jobs (`options` go to httpx: tests pass a transport)."""
    headers = {"Authorization": f"Bearer {internal_api_key()}"}
    request_id = logs.current_request_id()
    if request_id:  # the serving process logs the task's model call under the same request id
        headers[logs.REQUEST_ID_HEADER] = request_id
    host = httpx.URL(settings.SERVE_URL).netloc.decode()
    if not validate_host(split_domain_port(host)[0], settings.ALLOWED_HOSTS):
        # Behind a proxy ALLOWED_HOSTS names the public host, not loopback.
        headers["Host"] = next((h.lstrip(".") for h in settings.ALLOWED_HOSTS if h != "*"), host)
    if settings.HTTPS:
        # TLS ends at the proxy; without this, SECURE_SSL_REDIRECT answers with a redirect.
        headers["X-Forwarded-Proto"] = "https"
    return httpx.Client(
        base_url=settings.SERVE_URL, headers=headers, timeout=httpx.Timeout(REPLY_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        **options,
    )


def _call(method: str, path: str, **kwargs) -> dict:
    try:
        with serving_api() as api:
            response = api.request(method, path, **kwargs)
    except httpx.TransportError as exc:  # refused, reset, timed out
        raise ServingUnavailable(f"{settings.SERVE_URL}{path}: {type(exc).__name__}: {exc}") from exc
    if response.status_code == 200:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    if response.status_code == 429 or response.status_code >= 500:
        raise ServingUnavailable(f"{response.status_code}: {message}")
    # The engine's PromptTooLong and OpenAI's context_length_exceeded both name the context.
    if response.status_code == 400 and "context" in message.lower():
        raise PromptTooLong(message)
    raise Refused(f"{response.status_code}: {message}")


def background_model() -> str:
    # The small model when there is one: summaries and titles need no large model.
    return gateway_client.current().background_model() or ""


def _complete(messages: list[dict], max_tokens: int) -> str:
    body = {"model": background_model(), "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
    reply = _call("POST", "/v1/chat/completions", json=body)
    return (reply["choices"][0]["message"]["content"] or "").strip()


def _context_window() -> int:
    return int(_call("GET", f"/v1/models/{background_model()}")["context_window"])


def _retry_or_give_up(task, exc: Exception, what: str) -> None:
    if task.request.retries >= task.max_retries:
        log.warning("%s: giving up after %d tries, the serving process did not answer: %s",
                    what, task.request.retries + 1, exc)
        return None
    wait_s = min(RETRY_MAX_WAIT_S, RETRY_FIRST_WAIT_S * 2 ** task.request.retries)
    raise task.retry(exc=exc, countdown=wait_s)


# ------------------------------------------------------------------- enqueue

def enqueue_after_reply(*, reply_id) -> None:
    reply = Message.objects.filter(id=reply_id).select_related("conversation", "parent").first()
    if reply is None or reply.conversation.temporary:  # a temporary chat: no title, no memory
        return
    if reply.conversation.title_source == Conversation.TitleSource.FALLBACK:
        transaction.on_commit(lambda: _delay(title_conversation, str(reply.conversation_id)))
    if reply.parent is not None and reply.parent.role == Message.Role.USER:
        memory_tasks.enqueue_extraction(user_id=reply.conversation.user_id, reply_id=reply.id,
                                        message=reply.parent.content)


def enqueue_summary(*, conversation_id, through_id) -> None:
    conversation = Conversation.objects.filter(id=conversation_id).first()
    if conversation is None or conversation.summary_through_id == through_id:
        return
    transaction.on_commit(lambda: _delay(summarize_conversation, str(conversation_id), str(through_id)))


def _delay(task, *args) -> None:
    try:
        task.delay(*args)
    except Exception:  # a broker outage must not fail the reply that triggered it
        log.exception("enqueueing %s", task.name)


# --------------------------------------------------------------------- tasks

@shared_task(bind=True, ignore_result=True, acks_late=True, max_retries=MAX_RETRIES)
def title_conversation(self, conversation_id: str) -> str | None:
    conversation = Conversation.objects.filter(id=conversation_id).first()
    if conversation is None or conversation.title_source != Conversation.TitleSource.FALLBACK:
        return None
    first = conversation.messages.filter(role=Message.Role.USER).order_by("created_at").first()
    if first is None:
        return None
    try:
        answer = _complete(title_messages(first.content), max_tokens=TITLE_MAX_TOKENS)
    except ServingUnavailable as exc:
        return _retry_or_give_up(self, exc, f"titling {conversation_id}")
    except (PromptTooLong, Refused) as exc:
        log.warning("titling %s: %s; keeping the first words", conversation_id, exc)
        return None
    # An answer instead of a title names the topic from the message's own words.
    title = services.title_for(answer, first.content)
    services.title_update_auto(conversation_id=conversation_id, title=title)
    return title


@shared_task(bind=True, ignore_result=True, acks_late=True, max_retries=MAX_RETRIES)
def summarize_conversation(self, conversation_id: str, through_id: str) -> str | None:
    """Fold the branch messages up to `through_id` into the running summary.

    Starts from the existing summary when it covers an ancestor of
    `through_id`, and feeds the rest in chunks that fit the model's window.
    """
    conversation = Conversation.objects.filter(id=conversation_id).first()
    through = Message.objects.filter(id=through_id, conversation_id=conversation_id).select_related("conversation").first()
    if conversation is None or through is None:
        return None
    path = ancestors(through)
    summary = ""
    if conversation.summary and conversation.summary_through_id in {m.id for m in path}:
        cut = next(i for i, m in enumerate(path) if m.id == conversation.summary_through_id)
        if cut == len(path) - 1:
            return conversation.summary  # already there
        summary, path = conversation.summary, path[cut + 1:]
    try:
        summary = _summarize(summary, path, budget_tokens=_context_window() - SUMMARY_MAX_TOKENS - 64)
    except ServingUnavailable as exc:
        return _retry_or_give_up(self, exc, f"summarizing {conversation_id}")
    except (PromptTooLong, Refused) as exc:
        log.warning("summarizing %s: %s; the context builder keeps dropping the oldest turns", conversation_id, exc)
        return None
    services.summary_update(conversation_id=conversation_id, summary=summary, through_id=through.id)
    return summary


@shared_task(ignore_result=True)
def purge_temporary_chats() -> int:
    """Run by beat (CELERY_BEAT_SCHEDULE): temporary chats are deleted after use."""
    return services.temporary_chats_purge()


# ----------------------------------------------------------------- summaries

def _summary_prompt(summary: str, chunk: list[Message]) -> list[dict]:
    transcript = "\n\n".join(f"{m.role.upper()}: {m.content}" for m in chunk)
    body = (f"Summary so far:\n{summary}\n\n" if summary else "") + "New messages:\n" + transcript
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": body}]


def _estimate_tokens(messages: list[dict]) -> int:
    # The tokenizer lives in the serving process. Three characters a token
    # over-counts English (about four with these models), so a chunk rarely
    # overflows; one that does is refused before any generation and split.
    return sum(len(m["content"]) for m in messages) // 3 + 8 * len(messages)


def _summarize(summary: str, path: list[Message], *, budget_tokens: int) -> str:
    chunk: list[Message] = []
    for m in path:
        if chunk and _estimate_tokens(_summary_prompt(summary, chunk + [m])) > budget_tokens:
            summary = _fold(summary, chunk, budget_tokens)
            chunk = []
        chunk.append(m)
    return _fold(summary, chunk, budget_tokens) if chunk else summary


def _fold(summary: str, chunk: list[Message], budget_tokens: int) -> str:
    """The summary with `chunk` folded in. A lone message longer than the
    window is cut to what fits; a chunk the model still refuses as too long
    is folded in halves."""
    while len(chunk) == 1 and _estimate_tokens(_summary_prompt(summary, chunk)) > budget_tokens:
        if not _cut(chunk[0]):
            break
    try:
        return _complete(_summary_prompt(summary, chunk), SUMMARY_MAX_TOKENS)
    except PromptTooLong:
        if len(chunk) > 1:
            half = len(chunk) // 2
            return _fold(_fold(summary, chunk[:half], budget_tokens), chunk[half:], budget_tokens)
        if not _cut(chunk[0]):
            raise
        return _fold(summary, chunk, budget_tokens)


def _cut(message: Message) -> bool:
    """Shorten the in-memory copy of a message by a third; False when it is already short."""
    if len(message.content) <= MIN_CUT_CHARS:
        return False
    message.content = message.content[: max(MIN_CUT_CHARS, len(message.content) * 2 // 3)]
    return True
