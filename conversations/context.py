"""The context builder: what the model sees on each turn.

system prompt (custom instructions + the conversation's own) + the running
summary of older turns + remembered facts (memory, its own share of the
window) + passages retrieved from the chat's documents (in their own share of
the window: `documents.context`) + the newest messages of the current branch that fit
the model's context window minus the reply budget, counted with the model's
own tokenizer and chat template (the gateway client's `count_prompt_tokens`).
When older messages fall out of the window a Celery task folds them into the
summary, at low priority, for the next turn.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection

from conversations import tasks
from conversations.models import Conversation, Message
from conversations.selectors import ancestors, custom_instructions_query
from documents import context as documents_context
from documents import selectors as documents_selectors
from documents import services as documents_services
from gateway import client as gateway_client
from gateway.types import ChatRequest
from memory import selectors as memory_selectors
from memory import services as memory_services

log = logging.getLogger(__name__)

SUMMARY_PREAMBLE = "Summary of the earlier part of this conversation:\n"


@dataclass
class Context:
    messages: list[dict]  # what goes to the model
    window: list[Message]  # the branch messages included verbatim
    dropped: list[Message]  # older branch messages that did not fit
    prompt_tokens: int
    budget_tokens: int
    passages: documents_context.Passages = field(default_factory=documents_context.Passages)


@dataclass(frozen=True)
class TurnFacts:
    """What a turn's context reads of the user's settings, besides the chat."""
    instructions: str  # custom instructions
    memory_state: tuple[bool, bool]  # memory.selectors.turn_state_query: (enabled, any active)
    scope: documents_selectors.Scope | None  # documents.selectors.turn_scope: None when nothing to search


def turn_facts(*, user_id, conversation_id) -> TurnFacts:
    """The custom instructions, memory's state and the documents' scope in
    one query. Read one after another they were three round trips on the
    path of every reply, each a wait for Postgres to get a core beside a busy
    engine (bench.stages: 8 ms p50 from a new chat's rows saved to its
    request built, one chat every 250 ms on the 2-core Zen 5 EPYC). Each app
    owns its query and how its row reads; they are only joined here."""
    instructions_sql, instructions_params = custom_instructions_query(user_id=user_id)
    memory_sql, memory_params = memory_selectors.turn_state_query(user_id=user_id)
    scope_sql, scope_params = documents_selectors.turn_scope_query(user_id=user_id, conversation_id=conversation_id)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT ({instructions_sql}), memory.*, scope.* FROM (SELECT 1) one"
            f" LEFT JOIN LATERAL ({memory_sql}) memory ON true LEFT JOIN LATERAL ({scope_sql}) scope ON true",
            [*instructions_params, *memory_params, *scope_params])
        row = cursor.fetchone()
    return TurnFacts(instructions=row[0] or "", memory_state=memory_selectors.turn_state_from(row[1:3]),
                     scope=documents_selectors.turn_scope_from(row[3:7], user_id=user_id,
                                                               conversation_id=conversation_id))


def system_text(conversation: Conversation, instructions: str) -> str:
    """The user's custom instructions (`TurnFacts.instructions`), then the chat's own system prompt."""
    parts = [instructions.strip(), conversation.system_prompt.strip()]
    return "\n\n".join(p for p in parts if p)


def _as_chat(m: Message) -> dict:
    return {"role": m.role if m.role in ("user", "assistant", "system") else "user", "content": m.content}


def build_context(*, conversation: Conversation, history: list[Message], reply_tokens: int, reply_id=None) -> Context:
    """`history` is the branch root → the newest user message (the reply excluded);
    `reply_id`: the reply being prepared (memory is recorded on it; none without).
    The user's settings for the turn are read once, in one query (`turn_facts`)."""
    gateway = gateway_client.current()
    model = conversation.model or None
    window = gateway.model_info(model).context_window
    budget = window - reply_tokens
    facts = turn_facts(user_id=conversation.user_id, conversation_id=conversation.id)
    passages = _passages(conversation, history, budget, gateway, model, facts)
    head, candidates = _head_and_candidates(conversation, history, facts.instructions, passages.text)
    head = _with_system(head, _memory_block(conversation, history, reply_id, model, window, facts))
    counted: dict[int, int] = {}

    def count(k: int) -> int:
        # Each count renders the chat template and tokenizes: never twice for one k.
        if k not in counted:
            counted[k] = gateway.count_prompt_tokens(head + [_as_chat(m) for m in candidates[len(candidates) - k:]], model)
        return counted[k]

    kept = _newest_that_fit(count, len(candidates), budget)
    # A window must start with a user turn (chat templates and models expect it).
    while kept > 0 and candidates[len(candidates) - kept].role != "user":
        kept -= 1
    if kept == 0 and candidates:
        raise ValidationError(
            "This message is too long for the model's context window. Shorten it or start a new chat."
        )
    window = candidates[len(candidates) - kept:]
    dropped = candidates[: len(candidates) - kept]
    messages = head + [_as_chat(m) for m in window]
    return Context(messages=messages, window=window, dropped=dropped, prompt_tokens=count(kept), budget_tokens=budget,
                   passages=passages)


def _passages(conversation: Conversation, history: list[Message], budget: int, gateway, model, facts: TurnFacts):
    """Passages retrieved from the chat's documents (the documents app), in
    their own share of the budget, never crowding out the newest message."""
    if not history or history[-1].role != "user":
        return documents_context.Passages()

    def needed() -> int:
        head, _ = _head_and_candidates(conversation, history, facts.instructions)
        return gateway.count_prompt_tokens(head + [_as_chat(history[-1])], model)

    return documents_context.passages_for_turn(
        user_id=conversation.user_id, conversation_id=conversation.id, query=history[-1].content,
        prompt_budget_tokens=budget, needed_tokens=needed, scope=facts.scope,
        count_tokens=lambda text: gateway.count_prompt_tokens([{"role": "system", "content": text}], model))


def _head_and_candidates(conversation: Conversation, history: list[Message], instructions: str,
                         passages: str = "") -> tuple[list[dict], list[Message]]:
    """The system message (instructions, prompt, running summary, retrieved
    passages) and the branch messages the summary does not already stand in for."""
    history = [m for m in history if m.content or m.role == "user"]  # empty failed replies say nothing
    system = system_text(conversation, instructions)
    candidates = history
    if conversation.summary and conversation.summary_through_id in {m.id for m in history}:
        # The summary stands in for everything up to summary_through.
        cut = next(i for i, m in enumerate(history) if m.id == conversation.summary_through_id)
        candidates = history[cut + 1:]
        system = (system + "\n\n" if system else "") + SUMMARY_PREAMBLE + conversation.summary
    if passages:
        system = (system + "\n\n" if system else "") + passages
    return ([{"role": "system", "content": system}] if system else []), candidates


def _memory_block(conversation: Conversation, history: list[Message], reply_id, model, window: int,
                  facts: TurnFacts) -> str:
    """Remembered facts nearest to the user's message, within memory's own
    share of the window (`memory.services.budget_tokens`); they count
    against the prompt budget like the rest of the system message, so the
    history gets what is left. A temporary chat uses and saves none."""
    if reply_id is None or conversation.temporary or not history or history[-1].role != Message.Role.USER:
        return ""

    def count(text: str) -> int:
        return gateway_client.current().count_prompt_tokens([{"role": "system", "content": text}], model)

    try:
        return memory_services.turn_memory(
            user_id=conversation.user_id, reply_id=reply_id, message=history[-1].content,
            budget=memory_services.budget_tokens(window), count_tokens=count, state=facts.memory_state,
        ).text
    except Exception:  # memory is a help: a failing lookup must not cost the user the reply
        log.exception("memory for reply %s", reply_id)
        return ""


def _with_system(head: list[dict], text: str) -> list[dict]:
    if not text:
        return head
    if head:
        return [{"role": "system", "content": head[0]["content"] + "\n\n" + text}]
    return [{"role": "system", "content": text}]


def _newest_that_fit(count, total: int, budget: int) -> int:
    """How many of the newest messages fit: a binary search, since token
    counts grow with every message added (log2(n) renders instead of n)."""
    if count(total) <= budget:
        return total
    lo, hi = 0, total
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def build_request(*, reply_id=None, reply: Message | None = None):
    """The ChatRequest for a placeholder reply, or None when it is gone/finished.
    Enqueues a summary update when older turns fell out of the window.

    `reply`: the placeholder a service has just saved, in this thread, with
    its conversation and parents in memory; it is not read back (a new chat's
    whole branch is the message and the reply)."""
    if reply is None:
        reply = Message.objects.select_related("conversation").filter(id=reply_id).first()
    if reply is None or reply.status != Message.Status.PENDING:
        return None
    conversation = reply.conversation
    history = ancestors(reply)[:-1]
    ctx = build_context(conversation=conversation, history=history, reply_tokens=settings.CHAT_REPLY_MAX_TOKENS,
                        reply_id=reply.id)
    documents_services.record_sources(reply=reply, conversation=conversation, passages=ctx.passages)
    if ctx.dropped:
        tasks.enqueue_summary(conversation_id=conversation.id, through_id=ctx.dropped[-1].id)
    return ChatRequest(
        messages=ctx.messages,
        user_id=conversation.user_id,
        model=conversation.model or None,
        max_tokens=settings.CHAT_REPLY_MAX_TOKENS,
        temperature=settings.CHAT_TEMPERATURE,
        source="chat",
    )
