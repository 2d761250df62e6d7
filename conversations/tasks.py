"""Background jobs: conversation titles and running summaries.

Both call the small pool through the gateway at background priority, so they
yield to people waiting on a reply. Enqueued after commit; with
CELERY_TASK_ALWAYS_EAGER they run inline.
"""
from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings
from django.db import transaction

from gateway import client as gateway_client

log = logging.getLogger(__name__)

TITLE_PROMPT = (
    "Write a short title (at most six words) for a conversation that starts with the message below. "
    "Answer with the title only, no quotes.\n\nMessage:\n"
)
SUMMARY_SYSTEM = (
    "You maintain a running summary of a conversation between a user and an assistant. "
    "Keep every fact, name, number, decision and open question. Be concise. Answer with the summary only."
)
SUMMARY_MAX_TOKENS = 256


def _background_model() -> str | None:
    # The small pool when there is one: summaries and titles need no large model.
    return "small" if "small" in settings.MODEL_POOLS else None


def _complete(messages: list[dict], max_tokens: int) -> str:
    from gateway.types import PRIORITY_BACKGROUND, ChatRequest

    text, final = gateway_client.current().complete(
        ChatRequest(
            messages=messages, model=_background_model(), max_tokens=max_tokens, temperature=0.0,
            priority=PRIORITY_BACKGROUND, source="task",
        )
    )
    if final is None or final.finish_reason == "error":
        raise RuntimeError(final.error if final else "no reply")
    return text.strip()


def enqueue_after_reply(*, reply_id) -> None:
    from conversations.models import Conversation, Message

    reply = Message.objects.filter(id=reply_id).select_related("conversation").first()
    if reply is None:
        return
    if reply.conversation.title_source == Conversation.TitleSource.FALLBACK:
        transaction.on_commit(lambda: _delay(title_conversation, str(reply.conversation_id)))


def enqueue_summary(*, conversation_id, through_id) -> None:
    from conversations.models import Conversation

    conversation = Conversation.objects.filter(id=conversation_id).first()
    if conversation is None or conversation.summary_through_id == through_id:
        return
    transaction.on_commit(lambda: _delay(summarize_conversation, str(conversation_id), str(through_id)))


def _delay(task, *args) -> None:
    try:
        task.delay(*args)
    except Exception:  # a broker outage must not fail the reply that triggered it
        log.exception("enqueueing %s", task.name)


@shared_task(ignore_result=True, acks_late=True)
def title_conversation(conversation_id: str) -> str | None:
    from conversations import services
    from conversations.models import Conversation, Message

    conversation = Conversation.objects.filter(id=conversation_id).first()
    if conversation is None or conversation.title_source != Conversation.TitleSource.FALLBACK:
        return None
    first = conversation.messages.filter(role=Message.Role.USER).order_by("created_at").first()
    if first is None:
        return None
    try:
        title = _complete([{"role": "user", "content": TITLE_PROMPT + first.content[:2000]}], max_tokens=24)
    except Exception:
        log.exception("titling %s; keeping the first words", conversation_id)
        return None
    title = title.splitlines()[0] if title else ""
    # A model that rambles gives no title: the first words stay.
    if not title or len(title) > 80:
        return None
    services.title_update_auto(conversation_id=conversation_id, title=title)
    return title


@shared_task(ignore_result=True, acks_late=True)
def summarize_conversation(conversation_id: str, through_id: str) -> str | None:
    """Fold the branch messages up to `through_id` into the running summary.

    Starts from the existing summary when it covers an ancestor of
    `through_id`, and feeds the rest in chunks that fit the model's window.
    """
    gateway = gateway_client.current()
    from conversations import services
    from conversations.models import Conversation, Message
    from conversations.selectors import ancestors

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

    model = _background_model()
    window = gateway.model_info(model).context_window - SUMMARY_MAX_TOKENS - 64

    def prompt(text_summary: str, chunk: list[Message]) -> list[dict]:
        transcript = "\n\n".join(f"{m.role.upper()}: {m.content}" for m in chunk)
        body = (f"Summary so far:\n{text_summary}\n\n" if text_summary else "") + "New messages:\n" + transcript
        return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": body}]

    chunk: list[Message] = []
    for m in path:
        if chunk and gateway.count_prompt_tokens(prompt(summary, chunk + [m]), model) > window:
            summary = _complete(prompt(summary, chunk), SUMMARY_MAX_TOKENS)
            chunk = []
        chunk.append(m)
    if chunk:
        # A single message longer than the window is cut to what fits.
        while len(chunk) == 1 and gateway.count_prompt_tokens(prompt(summary, chunk), model) > window:
            m = chunk[0]
            m.content = m.content[: max(200, len(m.content) * 2 // 3)]
            if len(m.content) <= 200:
                break
        summary = _complete(prompt(summary, chunk), SUMMARY_MAX_TOKENS)
    services.summary_update(conversation_id=conversation_id, summary=summary, through_id=through.id)
    return summary
