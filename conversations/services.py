"""Writes for conversations and messages.

Verb grammar: `conversation_*` and `message_*` mutate; `reply_*` move an
assistant reply through its lifecycle
(pending → streaming → complete | stopped | interrupted | error | blocked).
Validation errors are ValidationError with a message meant for the user.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Q
from django.db.models.sql import InsertQuery
from django.utils import timezone

from conversations import streams
from conversations.models import ChatPreferences, Conversation, Message
from conversations.selectors import default_model, models_for, newest_leaf
from gateway.types import Usage

log = logging.getLogger(__name__)

FALLBACK_TITLE_WORDS = 8


def fallback_title(text: str) -> str:
    words = " ".join(text.split()).split(" ")
    title = " ".join(words[:FALLBACK_TITLE_WORDS])
    if len(words) > FALLBACK_TITLE_WORDS:
        title += "…"
    return title[:200] or "New chat"


# An automatic title names the topic in a few words. A small model often
# answers the message instead (SmolLM2-135M titled "Give me three tips for
# growing tomatoes." as "1. Use a tomato skin to protect your plants from
# pests"): a list item, a sentence, or words the message never used are an
# answer, not a title, and the job names the topic from the message itself.
TITLE_MAX_WORDS = 6
_LIST_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*•]|step \d+)\s", re.IGNORECASE)
_TITLE_LABEL = re.compile(r"^\s*(?:title|topic|subject)\s*:\s*", re.IGNORECASE)
# Openings that ask rather than name: "What is the capital of France?" is
# about "Capital of France". Stripped one after another from the first sentence.
_ASKING = re.compile(
    r"^(?:please|hi|hello|hey|so|ok(?:ay)?|(?:can|could|would|will) you|i(?:'d| would) like(?: you)? to|"
    r"i (?:want|need)(?: you)? to|help me(?: to| with)?|"
    r"what(?:'s| is) (?:a|the) (?:good|best|easiest|right) way to|how (?:do|can|should|would|to) (?:i|we|you)?|"
    r"(?:what|who|where|when|which|why|how)(?:'s| is| are| was| were| do| does| did)?(?: the| a| an)?|"
    r"give me|tell me(?: about)?|show me|explain(?: to me)?|describe|summari[sz]e|suggest|list)[\s,!]+",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_STOPWORDS = frozenset("the a an and or of to in on for with at by from is are be do does how what why who you your "
                       "my me i when if that which where our their this these those some any about as so but".split())


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in _STOPWORDS}


def clean_title(raw: str, message: str) -> str | None:
    """The model's title made tidy, or None when it is an answer, not a title."""
    line = next((ln for ln in (raw or "").splitlines() if ln.strip()), "")
    if _LIST_MARKER.match(line):
        return None
    title = _TITLE_LABEL.sub("", " ".join(line.split())).strip(" \"'`#*.:")
    if not title or len(title) > 80 or len(title.split()) > TITLE_MAX_WORDS or not (_stems(title) & _stems(message)):
        return None
    return title


def topic_title(message: str) -> str:
    """A title from the message's own words, without its asking: the job's
    fallback when the model gives no usable title."""
    text = " ".join(message.split())
    topic = _SENTENCE_END.split(text, maxsplit=1)[0]
    while (shorter := _ASKING.sub("", topic, count=1)) != topic:
        topic = shorter
    topic = topic.strip(" ?.!:;,") or text
    first_clause = re.split(r"\s+(?:and|but|so)\s+", topic, maxsplit=1)[0]
    if len(first_clause.split()) >= 3:  # "review my resume and make it shine": the first part names it
        topic = first_clause
    words = topic.split(" ")[:TITLE_MAX_WORDS]
    while len(words) > 1 and words[-1].lower().strip(",;:") in _STOPWORDS:
        words.pop()  # "... at home with" ends on a dangling word
    title = " ".join(words).rstrip(" ?.!:;,")
    return (title[:1].upper() + title[1:])[:200] or fallback_title(message)


def title_for(raw: str, message: str) -> str:
    """The automatic title of a chat whose first message is `message`, given the model's answer `raw`."""
    return clean_title(raw, message) or topic_title(message)


def check_message_text(text) -> str:
    text = (text or "").strip()
    if not text:
        raise ValidationError("Write a message first.")
    limit = settings.CHAT_MAX_MESSAGE_CHARS
    if len(text) > limit:
        raise ValidationError(f"The message is {len(text):,} characters long; the limit is {limit:,}.")
    return text


def check_model(model: str, *, user=None) -> str:
    model = (model or "").strip()
    if model and model not in models_for(user=user):
        raise ValidationError(f"Unknown model '{model}'.")
    return model


def check_system_prompt(system_prompt) -> str:
    system_prompt = system_prompt or ""
    if len(system_prompt) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise ValidationError("The system prompt is too long.")
    return system_prompt


def conversation_create(*, user, model: str = "", system_prompt: str = "", temporary: bool = False) -> Conversation:
    conversation = _new_conversation(user=user, model=model, system_prompt=system_prompt, temporary=temporary)
    conversation.save()
    return conversation


def _new_conversation(*, user, model: str, system_prompt: str, temporary: bool) -> Conversation:
    """Checked, not saved."""
    conversation = Conversation(
        user=user, model=check_model(model, user=user), system_prompt=check_system_prompt(system_prompt),
        temporary=temporary,
    )
    # Not the user (the signed-in one) nor the uuid's uniqueness: both checks are
    # queries that cannot fail, on the path of every new chat.
    conversation.full_clean(exclude=["user", "current_leaf", "summary_through"], validate_unique=False)
    return conversation


def conversation_start(*, user, text: str, model: str = "", system_prompt: str = "", temporary: bool = False) -> Message:
    """A new chat with its first message and the reply's placeholder, in one
    statement: a bad message leaves no empty conversation behind. Returns the
    placeholder (the reply)."""
    text = check_message_text(text)
    conversation = _new_conversation(user=user, model=model, system_prompt=system_prompt, temporary=temporary)
    conversation.title, conversation.title_source = fallback_title(text), Conversation.TitleSource.FALLBACK
    user_message = Message(conversation=conversation, role=Message.Role.USER, content=text)
    reply = _new_placeholder(conversation, user_message)
    # The leaf is set before the reply exists: Django's foreign keys are
    # checked at commit on PostgreSQL (DEFERRABLE INITIALLY DEFERRED), which
    # saves the UPDATE that a new chat's first turn otherwise needs.
    conversation.current_leaf_id = reply.id
    _insert_in_one_statement((Conversation, [conversation]), (Message, [user_message, reply]))
    return reply


def _insert_in_one_statement(*batches: tuple[type, list]) -> None:
    """New rows of several models as one statement, each model's INSERT (as
    bulk_create compiles it) a data-modifying CTE of the last one's.

    One statement is atomic without a transaction around it, whose BEGIN and
    COMMIT psycopg sends as round trips of their own: a new chat's rows went
    in four round trips (BEGIN, two INSERTs, COMMIT), each of which waits for
    a core beside a busy engine. Deferred foreign keys are checked at the
    statement's end, when every row exists; inside an outer transaction it is
    one statement of it."""
    parts, params = [], []
    for model, objs in batches:
        for obj in objs:
            obj._prepare_related_fields_for_save(operation_name="bulk_create")
        query = InsertQuery(model)
        query.insert_values(model._meta.local_concrete_fields, objs)
        ((sql, values),) = query.get_compiler(connection=connection).as_sql()
        parts.append(sql)
        params.extend(values)
    *ctes, last = parts
    statement = "WITH " + ", ".join(f"rows_{i} AS ({sql})" for i, sql in enumerate(ctes)) + " " + last
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
    for _, objs in batches:
        for obj in objs:
            obj._state.adding, obj._state.db = False, connection.alias


@transaction.atomic
def conversation_import(*, user, title: str, turns: list[tuple[str, str, str]]) -> Conversation:
    """A new chat holding `turns` (role, content, model) as one finished
    branch: a shared chat continued in the viewer's account."""
    conversation = conversation_create(user=user)
    parent = None
    for role, content, model in turns:
        parent = Message.objects.create(conversation=conversation, parent=parent, role=role, content=content,
                                        model=model, status=Message.Status.COMPLETE)
    conversation.title = (title or "Shared chat")[:200]
    conversation.title_source = Conversation.TitleSource.AUTO
    conversation.current_leaf = parent
    conversation.save(update_fields=["title", "title_source", "current_leaf", "updated_at"])
    return conversation


def temporary_chats_purge(*, idle_s: float | None = None) -> int:
    """Delete the temporary chats untouched for TEMPORARY_CHAT_TTL_S (their
    replies have long ended: a reply touches its chat when it ends)."""
    idle_s = settings.TEMPORARY_CHAT_TTL_S if idle_s is None else idle_s
    cutoff = timezone.now() - timedelta(seconds=idle_s)
    deleted = 0
    for conversation in Conversation.objects.filter(temporary=True, updated_at__lt=cutoff):
        conversation_delete(conversation=conversation)
        deleted += 1
    return deleted


def conversation_update(
    *, conversation: Conversation, title: str | None = None, model: str | None = None,
    system_prompt: str | None = None, archived: bool | None = None,
) -> Conversation:
    fields = ["updated_at"]
    if title is not None:
        title = " ".join(title.split())
        if not title:
            raise ValidationError("A title cannot be empty.")
        conversation.title = title[:200]
        conversation.title_source = Conversation.TitleSource.USER
        fields += ["title", "title_source"]
    if model is not None:
        conversation.model = check_model(model, user=conversation.user)
        fields.append("model")
    if system_prompt is not None:
        conversation.system_prompt = check_system_prompt(system_prompt)
        fields.append("system_prompt")
    if archived is not None:
        conversation.archived = archived
        fields.append("archived")
    conversation.save(update_fields=fields)
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    # Abort anything still generating first, so no task writes into a deleted row.
    for reply in conversation.messages.filter(status__in=Message.UNFINISHED):
        async_to_sync(streams.request_stop)(reply.id)
    conversation.delete()


def preferences_update(*, user, custom_instructions: str) -> ChatPreferences:
    if len(custom_instructions) > settings.CHAT_MAX_MESSAGE_CHARS:
        raise ValidationError("Custom instructions are too long.")
    prefs, _ = ChatPreferences.objects.update_or_create(
        user=user, defaults={"custom_instructions": custom_instructions}
    )
    return prefs


def _save_turn(user_message: Message, reply: Message) -> None:
    """The user's message and the reply's placeholder in one INSERT: beside a
    busy engine each statement is a round trip that waits for a core
    (Message has no save() of its own nor signals that bulk_create skips)."""
    Message.objects.bulk_create([user_message, reply])


def _placeholder(conversation: Conversation, parent: Message) -> Message:
    reply = _new_placeholder(conversation, parent)
    reply.save()
    return reply


def _new_placeholder(conversation: Conversation, parent: Message) -> Message:
    return Message(
        conversation=conversation,
        parent=parent,
        role=Message.Role.ASSISTANT,
        status=Message.Status.PENDING,
        model=conversation.model or default_model(),
    )


def _set_leaf(conversation: Conversation, leaf: Message) -> None:
    conversation.current_leaf = leaf
    conversation.save(update_fields=["current_leaf", "updated_at"])


def _check_idle(conversation: Conversation) -> None:
    if conversation.messages.filter(status__in=Message.UNFINISHED).exists():
        raise ValidationError("Wait for the current reply to finish, or stop it.")


@transaction.atomic
def message_send(*, conversation: Conversation, text: str, parent: Message | None = None) -> Message:
    """Save the user's message and an assistant placeholder together, so a crash
    never loses what the user typed; returns the placeholder (the reply)."""
    text = check_message_text(text)
    # The leaf (the new message's parent) comes with the locked row: one round trip, not two.
    conversation = Conversation.objects.select_for_update(of=("self",)).select_related("current_leaf").get(
        pk=conversation.pk)
    _check_idle(conversation)
    if parent is None and conversation.current_leaf_id:
        parent = conversation.current_leaf
    return _append_turn(conversation, text, parent=parent)


def _append_turn(conversation: Conversation, text: str, *, parent: Message | None) -> Message:
    """The user's message under `parent` and the reply's placeholder under it;
    the conversation's leaf (and, on its first message, its fallback title) in
    one update."""
    user_message = Message(conversation=conversation, parent=parent, role=Message.Role.USER, content=text)
    reply = _new_placeholder(conversation, user_message)
    _save_turn(user_message, reply)
    fields = ["current_leaf", "updated_at"]
    if not conversation.title:
        conversation.title = fallback_title(text)
        conversation.title_source = Conversation.TitleSource.FALLBACK
        fields += ["title", "title_source"]
    conversation.current_leaf = reply
    conversation.save(update_fields=fields)
    return reply


@transaction.atomic
def message_edit(*, message: Message, text: str) -> Message:
    """A sibling of the user message with the new text, and a new reply under it."""
    if message.role != Message.Role.USER:
        raise ValidationError("Only your own messages can be edited.")
    text = check_message_text(text)
    conversation = Conversation.objects.select_for_update().get(pk=message.conversation_id)
    _check_idle(conversation)
    edited = Message(conversation=conversation, parent=message.parent, role=Message.Role.USER, content=text)
    reply = _new_placeholder(conversation, edited)
    _save_turn(edited, reply)
    _set_leaf(conversation, reply)
    return reply


@transaction.atomic
def message_regenerate(*, message: Message) -> Message:
    """A new assistant reply beside `message` (same parent)."""
    if message.role != Message.Role.ASSISTANT or message.parent_id is None:
        raise ValidationError("Only a reply can be regenerated.")
    conversation = Conversation.objects.select_for_update().get(pk=message.conversation_id)
    _check_idle(conversation)
    reply = _placeholder(conversation, message.parent)
    _set_leaf(conversation, reply)
    return reply


def branch_switch(*, message: Message) -> Message:
    """Show the branch through `message`, down to its newest leaf."""
    conversation = message.conversation
    leaf = newest_leaf(list(conversation.messages.all()), message)
    conversation.current_leaf = leaf
    conversation.save(update_fields=["current_leaf"])  # switching is not activity: keep sidebar order
    return leaf


# ------------------------------------------------------------ reply lifecycle

def reply_start(*, reply_id, request_id: str) -> bool:
    """pending → streaming. False when the reply is gone or already finished
    (deleted, or stopped before the task got to run)."""
    now = timezone.now()
    return bool(
        Message.objects.filter(id=reply_id, status=Message.Status.PENDING).update(
            status=Message.Status.STREAMING, request_id=request_id, updated_at=now, heartbeat_at=now,
        )
    )


def replies_materialize(*, checkpoints: dict) -> int:
    """Partial texts while streaming (a heartbeat too), `checkpoints` mapping
    a reply id to (content, stream_seq): one statement for many replies, as
    each process writes all its streaming replies' together (conversations.
    turns). Only touches replies still streaming. Returns the rows changed.

    The rows come as three arrays joined by position (`unnest`), not as the
    ORM's CASE WHEN per reply: building and compiling 32 replies' two CASEs
    was a fifth of the chat database threads' samples through 32 chats at
    once (py-spy, 2026-12-06), and the arrays cost three parameters whatever
    the count."""
    if not checkpoints:
        return 0
    now = timezone.now()
    ids, contents, seqs = [], [], []
    for reply_id, (content, seq) in checkpoints.items():
        ids.append(reply_id)
        contents.append(content)
        seqs.append(seq)
    meta = Message._meta
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {meta.db_table} AS m SET content = v.content, stream_seq = v.seq, updated_at = %s,"
            " heartbeat_at = %s FROM unnest(%s::uuid[], %s::text[], %s::integer[]) AS v(id, content, seq)"
            " WHERE m.id = v.id AND m.status = %s",
            [now, now, ids, contents, seqs, Message.Status.STREAMING],
        )
        return cursor.rowcount


def reply_finish(
    *, reply_id, status: str, content: str, stream_seq: int, error: str = "", model: str = "",
    usage: Usage | None = None,
) -> bool:
    """Record the end of a reply exactly once: the first terminal status wins
    (the task and the stop fallback may race). Returns whether this call won."""
    assert status in Message.TERMINAL, status
    now = timezone.now()
    usage = usage or Usage()
    fields = dict(
        status=status, content=content, stream_seq=stream_seq, error=error[:2000],
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens, finished_at=now, updated_at=now,
    )
    if model:
        fields["model"] = model
    won = bool(
        Message.objects.filter(id=reply_id, status__in=Message.UNFINISHED).update(
            **fields
        )
    )
    if won:
        Conversation.objects.filter(messages__id=reply_id).update(updated_at=now)
    return won


def reply_heartbeat(*, reply_ids) -> int:
    """This process is still generating these replies: one UPDATE for all of
    them, every REPLY_HEARTBEAT_S. Ended ones are left as they are."""
    if not reply_ids:
        return 0
    return Message.objects.filter(id__in=list(reply_ids), status__in=Message.UNFINISHED).update(
        heartbeat_at=timezone.now()
    )


@dataclass(frozen=True)
class Reaped:
    """A reply the reaper ended: what its stream's end event needs."""
    id: object
    content: str
    stream_seq: int
    error: str


REAPED_ERROR = "The server stopped while this reply was being written."


def _stale(stale_s: float | None):
    cutoff = timezone.now() - timedelta(seconds=settings.REPLY_STALE_S if stale_s is None else stale_s)
    return Message.objects.filter(status__in=Message.UNFINISHED, role=Message.Role.ASSISTANT).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, updated_at__lt=cutoff)
    )


def stale_replies(*, stale_s: float | None = None) -> list[tuple]:
    """(id, stream_seq) of the unfinished replies whose heartbeat is older
    than `stale_s` (REPLY_STALE_S): what the reaper will end. Read only."""
    return list(_stale(stale_s).values_list("id", "stream_seq"))


async def streamed_since(replies: list[tuple]) -> dict:
    """For each (id, stream_seq): (stream_seq, the text its Redis log holds
    after that checkpoint, the last seq read). A dead process may have
    streamed tokens after its last materialization. Best effort: a reply
    whose log cannot be read is left out."""
    streamed = {}
    for reply_id, stored_seq in replies:
        try:
            extra, seq = await streams.text_after(reply_id, stored_seq)
        except Exception:
            log.warning("reaper: could not read the streamed text of %s", reply_id, exc_info=True)
            continue
        streamed[reply_id] = (stored_seq, extra, seq)
    return streamed


@transaction.atomic
def reap_stale_replies(*, stale_s: float | None = None, streamed: dict | None = None) -> list[Reaped]:
    """End as `interrupted`, keeping their text, the unfinished replies whose
    heartbeat is older than `stale_s` (REPLY_STALE_S): their process died.

    `streamed` (from `streamed_since`) is what each one's log held after its
    stored text; it joins the text in the same update that ends the reply,
    so nobody reads the ended reply without it. It is used only where the
    row still stands at the checkpoint the log was read from.

    Safe with several processes on one database: a live reply is beaten by
    its own process well within `stale_s`, and rows are locked (skipping
    those another reaper holds) before they are ended, so a heartbeat
    landing meanwhile finds the reply already ended and two reapers never
    end one reply twice. A reply never beaten (pending) counts from its
    last update."""
    rows = list(_stale(stale_s).select_for_update(skip_locked=True).values_list("id", "content", "stream_seq"))
    now, reaped = timezone.now(), []
    for id_, content, seq in rows:
        read_at, extra, last = (streamed or {}).get(id_, (None, "", seq))
        if read_at == seq and extra:
            content, seq = content + extra, last
        Message.objects.filter(id=id_).update(status=Message.Status.INTERRUPTED, error=REAPED_ERROR,
                                              content=content, stream_seq=seq, finished_at=now, updated_at=now)
        reaped.append(Reaped(id=id_, content=content, stream_seq=seq, error=REAPED_ERROR))
    if reaped:
        log.info("reaper: marked %d stale replies interrupted", len(reaped))
    return reaped


def reply_recover_text(*, reply_id, stored_seq: int, extra: str, seq: int) -> str | None:
    """Add to a reaped reply the text its log streamed after the last
    materialization (`stored_seq`), for a reply that went stale after
    `streamed_since` read the logs: a process killed mid-reply loses at most
    what never reached Redis. Only while the row is as the reaper left it.
    Returns the new text, or None when the row moved on."""
    reply = Message.objects.filter(id=reply_id, status=Message.Status.INTERRUPTED, stream_seq=stored_seq)
    content = reply.values_list("content", flat=True).first()
    if content is None:
        return None
    reply.update(content=content + extra, stream_seq=seq, updated_at=timezone.now())
    return content + extra


async def reaped_publish(reaped: list[Reaped]) -> None:
    """Each reaped reply's terminal event, for readers still tailing its log
    (best effort: a reader also finds the status in the database)."""
    for reply in reaped:
        try:
            await streams.publish_end(reply.id, reply.stream_seq, Message.Status.INTERRUPTED, reply.content,
                                      error=reply.error)
        except Exception:
            log.warning("reaper: could not publish the end of %s", reply.id, exc_info=True)


def reap_orphaned_replies() -> int:
    """`serve`'s pass before it accepts requests: the same staleness rule as
    the periodic reaper (`turns.reap_stale_replies`), not "everything
    unfinished", since another `serve` on the same database may be
    generating right now. Returns how many were ended."""
    streamed = async_to_sync(streamed_since)(stale_replies())
    reaped = reap_stale_replies(streamed=streamed)
    async_to_sync(reaped_publish)(reaped)
    return len(reaped)


def summary_update(*, conversation_id, summary: str, through_id) -> None:
    Conversation.objects.filter(id=conversation_id).update(summary=summary, summary_through_id=through_id)


def title_update_auto(*, conversation_id, title: str) -> bool:
    """An automatic title never replaces one the user chose."""
    title = " ".join(title.split()).strip(" \"'`#*.")[:200]
    if not title:
        return False
    return bool(
        Conversation.objects.filter(id=conversation_id)
        .exclude(title_source=Conversation.TitleSource.USER)
        .update(title=title, title_source=Conversation.TitleSource.AUTO)
    )
