"""Reads for conversations and messages. `access_*` is the only way a request
fetches an object it names: another user's id is indistinguishable from a
missing one (404), so ids cannot be probed."""
from __future__ import annotations

from dataclasses import dataclass

from django.contrib.postgres.search import SearchHeadline, SearchQuery, SearchRank, SearchVector
from django.db.models import Q
from django.http import Http404

from conversations.models import ChatPreferences, Conversation, Message
from gateway import client as gateway_client


def access_conversation(*, user, conversation_id) -> Conversation:
    if not getattr(user, "is_authenticated", False):
        raise Http404("No such conversation")
    try:
        return Conversation.objects.get(id=conversation_id, user=user)
    except (Conversation.DoesNotExist, ValueError, TypeError):
        raise Http404("No such conversation") from None


def access_message(*, user, message_id) -> Message:
    if not getattr(user, "is_authenticated", False):
        raise Http404("No such message")
    try:
        return Message.objects.select_related("conversation").get(id=message_id, conversation__user=user)
    except (Message.DoesNotExist, ValueError, TypeError):
        raise Http404("No such message") from None


def conversation_list(*, user, archived: bool = False, query: str = ""):
    qs = Conversation.objects.filter(user=user, archived=archived, temporary=False).order_by("-updated_at")
    if query:
        qs = qs.filter(title__icontains=query)
    return qs


def models_for(*, user=None) -> list[str]:
    """The models this user may pick, as the gateway lists them."""
    return gateway_client.current().available_models(getattr(user, "id", None))


def default_model() -> str:
    """The model a chat gets when it names none, as the gateway resolves it
    ("" when none is configured: the reply then fails with the gateway's error)."""
    return gateway_client.current().default_model() or ""


def preferences_get(*, user) -> ChatPreferences:
    prefs = ChatPreferences.objects.filter(user=user).first()
    return prefs or ChatPreferences(user=user)


def custom_instructions_query(*, user_id) -> tuple[str, tuple]:
    """What the user asked every chat to know, as (sql, params) of one
    column and at most one row (by id: the context builder need not load the
    user), which conversations.context.turn_facts reads with memory's and
    the documents' questions in one round trip."""
    return (ChatPreferences.objects.filter(user_id=user_id).values_list("custom_instructions", flat=True)
            .order_by("id")[:1].query.sql_with_params())


# ------------------------------------------------------------ the tree

@dataclass
class BranchItem:
    message: Message
    index: int  # 1-based position among its siblings
    count: int  # number of siblings (itself included)
    prev_id: object = None
    next_id: object = None


def _children_map(messages) -> dict:
    children: dict = {}
    for m in messages:
        children.setdefault(m.parent_id, []).append(m)
    for siblings in children.values():
        siblings.sort(key=lambda m: m.created_at)
    return children


def newest_leaf(messages, start: Message) -> Message:
    """Follow the newest child down from `start`: what a branch switch shows."""
    children = _children_map(messages)
    node = start
    while children.get(node.id):
        node = children[node.id][-1]
    return node


def branch_path(*, conversation: Conversation, messages=None) -> list[Message]:
    """Root → current leaf (or the newest leaf when none is recorded)."""
    if messages is None:
        messages = list(conversation.messages.all())
    if not messages:
        return []
    by_id = {m.id: m for m in messages}
    leaf = by_id.get(conversation.current_leaf_id)
    if leaf is None:
        leaf = max(messages, key=lambda m: m.created_at)
    path = []
    node = leaf
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id)
    path.reverse()
    return path


def branch_with_siblings(*, conversation: Conversation) -> list[BranchItem]:
    messages = list(conversation.messages.all())
    children = _children_map(messages)
    items = []
    for m in branch_path(conversation=conversation, messages=messages):
        siblings = children.get(m.parent_id, [m])
        i = next(k for k, s in enumerate(siblings) if s.id == m.id)
        items.append(
            BranchItem(
                message=m,
                index=i + 1,
                count=len(siblings),
                prev_id=siblings[i - 1].id if i > 0 else None,
                next_id=siblings[i + 1].id if i + 1 < len(siblings) else None,
            )
        )
    return items


def ancestors(message: Message) -> list[Message]:
    """Root → message (inclusive), following parent pointers. A chain whose
    parents are all in memory (a turn just saved by a service) costs no query."""
    path = [message]
    while path[-1].parent_id is not None and Message.parent.is_cached(path[-1]):
        path.append(path[-1].parent)
    if path[-1].parent_id is None:
        path.reverse()
        return path
    by_id = {m.id: m for m in message.conversation.messages.all()}
    path = []
    node = by_id.get(message.id, message)
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id)
    path.reverse()
    return path


# ------------------------------------------------------------ search

@dataclass
class SearchHit:
    conversation: Conversation
    snippet: str
    message_id: object = None


def search(*, user, query: str, limit: int = 50) -> list[SearchHit]:
    """Postgres full-text search over titles and message content, best first.
    Snippets come from SearchHeadline with <mark> around matches; the rest of
    the snippet is escaped by the template filter `safe_snippet`."""
    query = (query or "").strip()
    if not query:
        return []
    sq = SearchQuery(query, config="english", search_type="websearch")
    hits: dict = {}
    titles = (
        Conversation.objects.filter(user=user, temporary=False)
        .annotate(rank=SearchRank(SearchVector("title", config="english"), sq))
        .filter(Q(rank__gt=0) | Q(title__icontains=query))
        .order_by("-rank", "-updated_at")[:limit]
    )
    for c in titles:
        hits[c.id] = SearchHit(conversation=c, snippet="")
    messages = (
        Message.objects.filter(conversation__user=user, conversation__temporary=False)
        .annotate(search=SearchVector("content", config="english"))
        .filter(search=sq)
        .annotate(
            rank=SearchRank(SearchVector("content", config="english"), sq),
            snippet=SearchHeadline(
                "content", sq, config="english", start_sel="\x02", stop_sel="\x03", max_words=30, min_words=10
            ),
        )
        .select_related("conversation")
        .order_by("-rank", "-created_at")[:limit]
    )
    for m in messages:
        hit = hits.get(m.conversation_id)
        if hit is None:
            hits[m.conversation_id] = SearchHit(conversation=m.conversation, snippet=m.snippet, message_id=m.id)
        elif not hit.snippet:
            hit.snippet, hit.message_id = m.snippet, m.id
    return list(hits.values())[:limit]


# ------------------------------------------------------------ export

def export_json(*, conversation: Conversation) -> dict:
    messages = list(conversation.messages.all())
    return {
        "id": str(conversation.id),
        "title": conversation.title,
        "model": conversation.model or default_model(),
        "system_prompt": conversation.system_prompt,
        "created_at": conversation.created_at.isoformat(),
        "current_branch": [str(m.id) for m in branch_path(conversation=conversation, messages=messages)],
        "messages": [
            {
                "id": str(m.id),
                "parent_id": str(m.parent_id) if m.parent_id else None,
                "role": m.role,
                "content": m.content,
                "status": m.status,
                "model": m.model,
                "error": m.error,
                "usage": {
                    "prompt_tokens": m.prompt_tokens,
                    "completion_tokens": m.completion_tokens,
                    "cached_tokens": m.cached_tokens,
                },
                "created_at": m.created_at.isoformat(),
            }
            for m in messages
        ],
    }


def export_markdown(*, conversation: Conversation) -> str:
    """The current branch as a Markdown document."""
    lines = [f"# {conversation.title or 'Untitled chat'}", ""]
    if conversation.system_prompt:
        lines += ["> System: " + conversation.system_prompt.replace("\n", "\n> "), ""]
    for m in branch_path(conversation=conversation):
        who = "You" if m.role == "user" else m.role.capitalize()
        note = "" if m.status == Message.Status.COMPLETE or m.status in Message.UNFINISHED else f" _({m.status})_"
        lines += [f"## {who}{note}", "", m.content, ""]
    return "\n".join(lines).rstrip() + "\n"
