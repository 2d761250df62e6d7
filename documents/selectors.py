"""Reads. Every function takes the owner and filters on it: no path here
returns another user's document, chunk or sources (tests/documents/test_scoping.py).

Search is hybrid: the nearest chunks by cosine distance (pgvector HNSW) and
the best full-text matches (the chunk's tsvector, GIN), each over the same
scope, merged by reciprocal rank fusion (score = sum of 1 / (60 + rank)).
"""
from __future__ import annotations

from dataclasses import dataclass

from django.db import connection, transaction
from django.db.models import Sum
from django.http import Http404

from documents.models import ChatSources, Chunk, Document, DocumentPage, ReplySources

RRF_K = 60  # the constant of Cormack et al. (2009)
CANDIDATES = 20  # per ranking, before fusion
HNSW_EF_SEARCH = 100  # pgvector's default of 40 leaves filtered searches short


# ------------------------------------------------------------ access

def access_document(*, user, document_id) -> Document:
    document = Document.objects.filter(id=document_id, user=user).first()
    if document is None:
        raise Http404("No such document.")
    return document


def access_chunk(*, user, chunk_id) -> Chunk:
    chunk = Chunk.objects.select_related("document").filter(id=chunk_id, user=user).first()
    if chunk is None:
        raise Http404("No such passage.")
    return chunk


def access_conversation_id(*, user, conversation_id):
    """The chat's id when the user owns it. Through the model Document points
    at, so that this app needs no import of the conversations app above it."""
    conversations = Document._meta.get_field("conversation").related_model.objects
    if not conversations.filter(id=conversation_id, user=user).exists():
        raise Http404("No such conversation.")
    return conversation_id


# ------------------------------------------------------------ lists

def library(*, user):
    return Document.objects.filter(user=user, conversation__isnull=True)


def attachments(*, user, conversation_id):
    return Document.objects.filter(user=user, conversation_id=conversation_id)


def use_library(*, conversation_id) -> bool:
    """(The caller has checked the chat is the user's: `access_conversation_id`.)"""
    return ChatSources.objects.filter(conversation_id=conversation_id, use_library=True).exists()


def storage_used_bytes(*, user) -> int:
    return Document.objects.filter(user=user).aggregate(total=Sum("size_bytes"))["total"] or 0


def page_text(*, chunk: Chunk) -> str:
    page = DocumentPage.objects.filter(document_id=chunk.document_id, page=chunk.page).first()
    return page.text if page else chunk.text


def reply_sources(*, user, conversation_id) -> list[ReplySources]:
    return list(ReplySources.objects.filter(user=user, conversation_id=conversation_id))


# ------------------------------------------------------------ a turn's scope

@dataclass(frozen=True)
class Scope:
    user_id: int
    conversation_id: object
    use_library: bool

    @property
    def library_sql(self) -> str:
        return "OR d.conversation_id IS NULL" if self.use_library else ""


def turn_scope(*, user_id, conversation_id) -> Scope | None:
    """What a turn searches, or None when there is nothing to search: one query."""
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT EXISTS(SELECT 1 FROM documents_chatsources WHERE conversation_id = %s AND use_library),
                      EXISTS(SELECT 1 FROM documents_document WHERE user_id = %s AND status = 'ready'
                             AND conversation_id = %s),
                      EXISTS(SELECT 1 FROM documents_document WHERE user_id = %s AND status = 'ready'
                             AND conversation_id IS NULL)""",
            [conversation_id, user_id, conversation_id, user_id])
        library_on, has_attachments, has_library = cursor.fetchone()
    if not has_attachments and not (library_on and has_library):
        return None
    return Scope(user_id=user_id, conversation_id=conversation_id, use_library=library_on)


# ------------------------------------------------------------ search

@dataclass(frozen=True)
class Hit:
    chunk_id: int
    document_id: object
    document: str
    page: int
    heading: str
    text: str
    score: float


_SCOPE = """FROM documents_chunk c JOIN documents_document d ON d.id = c.document_id
            WHERE c.user_id = %s AND d.user_id = %s AND d.status = 'ready'
              AND (d.conversation_id = %s {library})"""


def _vector_ids(scope: Scope, vector: list[float], limit: int) -> list[int]:
    params = [scope.user_id, scope.user_id, scope.conversation_id]
    order = "c.embedding <=> %s::vector"
    sql = f"SELECT c.id {_SCOPE.format(library=scope.library_sql)} AND c.embedding IS NOT NULL ORDER BY {{}} LIMIT %s"
    literal = "[" + ",".join(f"{x:.7g}" for x in vector) + "]"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL hnsw.ef_search = {HNSW_EF_SEARCH}")
        cursor.execute(sql.format(order), params + [literal, limit])
        ids = [r[0] for r in cursor.fetchall()]
        if len(ids) < limit:
            # HNSW filters after it walks the graph: a scope that is a small
            # part of the table can come back short. Such a scope is small,
            # so the exact scan ("+ 0" keeps the planner off the index) is cheap.
            cursor.execute(sql.format(f"({order}) + 0"), params + [literal, limit])
            ids = [r[0] for r in cursor.fetchall()]
    return ids


def _text_ids(scope: Scope, query: str, limit: int) -> list[int]:
    # Any of the question's words (plainto_tsquery ANDs them all, and a
    # question rarely shares every word with the passage that answers it),
    # ranked by cover density.
    sql = f"""WITH q AS (SELECT replace(plainto_tsquery('english', %s)::text, '&', '|')::tsquery AS q)
              SELECT c.id {_SCOPE.format(library=scope.library_sql)} AND c.search @@ (SELECT q FROM q)
              ORDER BY ts_rank_cd(c.search, (SELECT q FROM q)) DESC, c.id LIMIT %s"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [query, scope.user_id, scope.user_id, scope.conversation_id, limit])
        return [r[0] for r in cursor.fetchall()]


def fuse(*rankings: list[int], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: ids by the sum of 1 / (k + rank) over the rankings."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def search(*, scope: Scope, query: str, vector: list[float] | None, top_k: int = 5,
           mode: str = "hybrid") -> list[Hit]:
    """The best `top_k` chunks in `scope`; mode "vector", "text" or "hybrid"."""
    rankings = []
    if mode in ("vector", "hybrid") and vector is not None:
        rankings.append(_vector_ids(scope, vector, CANDIDATES))
    if mode in ("text", "hybrid"):
        rankings.append(_text_ids(scope, query, CANDIDATES))
    ranked = fuse(*rankings)[:top_k]
    rows = {c.id: c for c in Chunk.objects.select_related("document").filter(
        id__in=[i for i, _ in ranked], user_id=scope.user_id)}
    return [Hit(chunk_id=i, document_id=rows[i].document_id, document=rows[i].document.name, page=rows[i].page,
                heading=rows[i].heading, text=rows[i].text, score=score) for i, score in ranked if i in rows]
