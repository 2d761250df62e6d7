"""The retrieval code as measured at 2026-12-02 02:26 UTC (commit 9e84915),
kept so that bench.retrieval times it side by side with today's, in one
run, on the same data: three statements and an ORM fetch per search, and a
turn that embeds its question without sharing it."""
from __future__ import annotations

from django.conf import settings
from django.db import connection, transaction

from documents import context, selectors
from documents.models import Chunk
from retrieval import services as retrieval_services

HNSW_EF_SEARCH = 100
_SCOPE = """FROM documents_chunk c JOIN documents_document d ON d.id = c.document_id
            WHERE c.user_id = %s AND d.user_id = %s AND d.status = 'ready'
              AND (d.conversation_id = %s {library})"""


def _library(scope) -> str:
    return "OR d.conversation_id IS NULL" if scope.use_library else ""


def _vector_ids(scope, vector, limit):
    params = [scope.user_id, scope.user_id, scope.conversation_id]
    order = "c.embedding <=> %s::vector"
    sql = f"SELECT c.id {_SCOPE.format(library=_library(scope))} AND c.embedding IS NOT NULL ORDER BY {{}} LIMIT %s"
    literal = "[" + ",".join(f"{x:.7g}" for x in vector) + "]"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL hnsw.ef_search = {HNSW_EF_SEARCH}")
        cursor.execute(sql.format(order), params + [literal, limit])
        ids = [r[0] for r in cursor.fetchall()]
        if len(ids) < limit:
            cursor.execute(sql.format(f"({order}) + 0"), params + [literal, limit])
            ids = [r[0] for r in cursor.fetchall()]
    return ids


def _text_ids(scope, query, limit):
    sql = f"""WITH q AS (SELECT replace(plainto_tsquery('english', %s)::text, '&', '|')::tsquery AS q)
              SELECT c.id {_SCOPE.format(library=_library(scope))} AND c.search @@ (SELECT q FROM q)
              ORDER BY ts_rank_cd(c.search, (SELECT q FROM q)) DESC, c.id LIMIT %s"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [query, scope.user_id, scope.user_id, scope.conversation_id, limit])
        return [r[0] for r in cursor.fetchall()]


def search(*, scope, query, vector, top_k=5, mode="hybrid"):
    rankings = []
    if mode in ("vector", "hybrid") and vector is not None:
        rankings.append(_vector_ids(scope, vector, selectors.CANDIDATES))
    if mode in ("text", "hybrid"):
        rankings.append(_text_ids(scope, query, selectors.CANDIDATES))
    ranked = selectors.fuse(*rankings)[:top_k]
    rows = {c.id: c for c in Chunk.objects.select_related("document").filter(
        id__in=[i for i, _ in ranked], user_id=scope.user_id)}
    return [selectors.Hit(chunk_id=i, document_id=rows[i].document_id, document=rows[i].document.name,
                          page=rows[i].page, heading=rows[i].heading, text=rows[i].text, score=score)
            for i, score in ranked if i in rows]


def turn_scope(*, user_id, conversation_id):
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
    return selectors.Scope(user_id=user_id, conversation_id=conversation_id, use_library=library_on)


def passages_for_turn(*, user_id, conversation_id, query, prompt_budget_tokens, count_tokens,
                      needed_tokens=lambda: 0):
    budget = context.passage_budget(prompt_budget_tokens)
    if budget <= 0 or not query.strip():
        return context.Passages()
    scope = turn_scope(user_id=user_id, conversation_id=conversation_id)
    if scope is None:
        return context.Passages()
    budget = min(budget, prompt_budget_tokens - needed_tokens())
    if budget <= 0:
        return context.Passages()
    # The question embedded on its own, as then (no vector kept or shared).
    vector = retrieval_services._executor.submit(retrieval_services._encode, [query]).result()[0].tolist()
    hits = search(scope=scope, query=query, vector=vector, top_k=settings.DOCUMENTS_TOP_K)
    flags = context.screen([h.text for h in hits], user_id=user_id)
    kept = [h for h, flagged in zip(hits, flags) if not flagged]
    passages = context._fit(kept, budget, count_tokens)
    passages.flagged = sum(flags)
    return passages
