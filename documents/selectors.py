"""Reads. Every function takes the owner and filters on it: no path here
returns another user's document, chunk or sources (tests/documents/test_scoping.py).

Search is hybrid: the nearest chunks by cosine distance (pgvector HNSW) and
the best full-text matches (the chunk's tsvector, GIN), each over the same
scope, merged by reciprocal rank fusion (score = sum of 1 / (60 + rank)),
in one statement.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

from django.db import connection, transaction
from django.db.models import Sum
from django.http import Http404

from documents.models import ChatSources, Chunk, Document, DocumentPage, ReplySources

RRF_K = 60  # the constant of Cormack et al. (2009)
CANDIDATES = 20  # per ranking, before fusion
# The vector plan (`_vector_plan`): HNSW's ef_search and when the exact scan is cheaper.
HNSW_EF_SEARCH = 40  # pgvector's default, for a scope that is (nearly) the whole table
HNSW_MAX_EF_SEARCH = 1000  # pgvector's cap
HNSW_HEADROOM = 2.0  # in-scope rows expected from the walk, per candidate wanted
HNSW_BASE_ROWS = 1750  # a walk's cost in exact-scan rows: fixed part ...
HNSW_ROWS_PER_EF = 50  # ... and per unit of ef_search


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
    # Chunks in scope and in the whole table (the planner's estimate), which
    # choose the vector plan (`_vector_plan`); None: counted by `search`.
    chunks: int | None = None
    table_chunks: int | None = None

    @property
    def library_sql(self) -> str:
        return "OR conversation_id IS NULL" if self.use_library else ""


_SIZE_SQL = """SELECT coalesce(sum(chunks_total), 0), count(*),
                      (SELECT reltuples::bigint FROM pg_class WHERE oid = 'documents_chunk'::regclass)
               FROM documents_document WHERE user_id = %s AND status = 'ready' AND (conversation_id = %s {library})"""


def turn_scope(*, user_id, conversation_id) -> Scope | None:
    """What a turn searches, with its size, or None when there is nothing to
    search: one query (the chat's switch, its documents, the table's size)."""
    with connection.cursor() as cursor:
        cursor.execute(*turn_scope_query(user_id=user_id, conversation_id=conversation_id))
        return turn_scope_from(cursor.fetchone(), user_id=user_id, conversation_id=conversation_id)


def turn_scope_query(*, user_id, conversation_id) -> tuple[str, list]:
    """turn_scope's query as (sql, params), for a caller that reads it with
    others in one round trip (conversations.context); `turn_scope_from`
    reads its row (four columns)."""
    return (f"""WITH lib AS (SELECT EXISTS(SELECT 1 FROM documents_chatsources
                                           WHERE conversation_id = %s AND use_library) AS on_)
                SELECT lib.on_, size.* FROM lib, LATERAL ({_SIZE_SQL.format(library="OR (lib.on_ AND conversation_id IS NULL)")}) size""",
            [conversation_id, user_id, conversation_id])


def turn_scope_from(row, *, user_id, conversation_id) -> Scope | None:
    library_on, chunks, documents, table_chunks = row
    if not documents:
        return None
    return Scope(user_id=user_id, conversation_id=conversation_id, use_library=library_on, chunks=int(chunks),
                 table_chunks=int(table_chunks))


def sized(scope: Scope) -> Scope:
    """`scope` with its size counted (one query)."""
    if scope.chunks is not None:
        return scope
    with connection.cursor() as cursor:
        cursor.execute(_SIZE_SQL.format(library=scope.library_sql), [scope.user_id, scope.conversation_id])
        chunks, _, table_chunks = cursor.fetchone()
    return replace(scope, chunks=int(chunks), table_chunks=int(table_chunks))


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
    # The stored safety verdict (`Chunk.verdict_*`): current when `verdict_version` is safety's policy version.
    verdict_flagged: bool = False
    verdict_category: str = ""
    verdict_version: str = ""


def _vector_plan(scope: Scope) -> int | None:
    """hnsw.ef_search for an HNSW scan, or None for the exact scan.

    HNSW filters after it walks the graph (pgvector 0.6 has no iterative
    scans): of its ef_search nearest rows, about the scope's share of the
    table is in scope, so ef_search grows as the share shrinks, to leave
    CANDIDATES in scope with room to spare. Whichever is cheaper runs: a walk
    costs about as much as the exact distances of HNSW_BASE_ROWS +
    HNSW_ROWS_PER_EF * ef_search rows (measured at 100,000 chunks: ef_search
    40 / 100 / 200 took 26 / 40 / 71 ms, the exact scan 5.7 ms per 1,000 rows)."""
    share = scope.chunks / max(scope.table_chunks or 0, scope.chunks, 1)
    ef = max(HNSW_EF_SEARCH, math.ceil(HNSW_HEADROOM * CANDIDATES / max(share, 1e-9)))
    if ef > HNSW_MAX_EF_SEARCH or scope.chunks <= HNSW_BASE_ROWS + HNSW_ROWS_PER_EF * ef:
        return None
    return ef


def _vector_sql(exact: bool) -> str:
    # "+ 0" keeps the planner off the HNSW index; the exact ranking then
    # breaks ties by id, as the index's order does not need to.
    order = "(c.embedding <=> %(vector)s::vector) + 0, c.id" if exact else "c.embedding <=> %(vector)s::vector"
    return f"""SELECT c.id, c.embedding <=> %(vector)s::vector AS distance FROM documents_chunk c
               WHERE c.user_id = %(user)s AND c.document_id IN (SELECT id FROM docs) AND c.embedding IS NOT NULL
               ORDER BY {order} LIMIT %(candidates)s"""


def _vector_cte(ef_search: int | None) -> str:
    if ef_search is None:
        ranked = _vector_sql(exact=True)
    else:
        # A scan that still came back short (a scope the graph walk missed)
        # is done again exactly, in the same statement: the gate is a
        # one-time filter, so the exact scan runs only then.
        ranked = f"""SELECT * FROM hnsw WHERE (SELECT count(*) FROM hnsw) >= LEAST(%(candidates)s, %(chunks)s)
                     UNION ALL
                     SELECT * FROM ({_vector_sql(exact=True)}) exact
                     WHERE (SELECT count(*) FROM hnsw) < LEAST(%(candidates)s, %(chunks)s)"""
        ranked = f"hnsw AS MATERIALIZED ({_vector_sql(exact=False)}),\n vector_hits AS ({ranked})"
        return ranked + ",\n v AS (SELECT id, row_number() OVER (ORDER BY distance, id) AS rank FROM vector_hits)"
    return f"v AS (SELECT id, row_number() OVER (ORDER BY distance, id) AS rank FROM ({ranked}) vector_hits)"


# Any of the question's words (plainto_tsquery ANDs them all, and a question
# rarely shares every word with the passage that answers it), ranked by
# ts_rank: on the QA set it does no worse than cover density (ts_rank_cd;
# text MRR 0.58 against 0.55) at about half the cost per matching row. The tsquery is a constant (immutable functions of a literal), so
# the planner sees its words and can pick the GIN index. "::text" keeps it
# from ANDing the GIN matches with every row of a large scope from the
# document index (19 of the 21 ms at 100,000 chunks).
_TEXT_CTE = """t AS (SELECT id, row_number() OVER (ORDER BY r DESC, id) AS rank FROM (
        SELECT c.id, ts_rank(c.search, q.q) AS r FROM documents_chunk c,
               (SELECT replace(plainto_tsquery('english', %(query)s)::text, '&', '|')::tsquery AS q) q
        WHERE c.user_id = %(user)s AND c.document_id::text IN (SELECT id::text FROM docs) AND c.search @@ q.q
        ORDER BY r DESC, c.id LIMIT %(candidates)s) text_hits)"""


def _search_sql(scope: Scope, *, vector: bool, text: bool, ef_search: int | None) -> str:
    """One statement: the scope's documents, each ranking, their fusion (the
    SQL of `fuse`) and the best chunks' rows."""
    ctes = [f"""docs AS MATERIALIZED (SELECT id, name FROM documents_document
                WHERE user_id = %(user)s AND status = 'ready' AND (conversation_id = %(chat)s {scope.library_sql}))"""]
    rankings = []
    if vector:
        ctes.append(_vector_cte(ef_search))
        rankings.append("SELECT id, rank FROM v")
    if text:
        ctes.append(_TEXT_CTE)
        rankings.append("SELECT id, rank FROM t")
    ctes.append(f"""f AS (SELECT id, sum(1.0::float8 / ({RRF_K} + rank)) AS score
                          FROM ({" UNION ALL ".join(rankings)}) u GROUP BY id ORDER BY score DESC, id LIMIT %(top_k)s)""")
    return f"""WITH {", ".join(ctes)}
               SELECT f.id, c.document_id, d.name, c.page, c.heading, c.text, f.score,
                      c.verdict_flagged, c.verdict_category, c.verdict_version
               FROM f JOIN documents_chunk c ON c.id = f.id AND c.user_id = %(user)s JOIN docs d ON d.id = c.document_id
               ORDER BY f.score DESC, f.id"""


def fuse(*rankings: list[int], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: ids by the sum of 1 / (k + rank) over the
    rankings. (The reference for the SQL `search` runs; tests compare them.)"""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def search(*, scope: Scope, query: str, vector: list[float] | None, top_k: int = 5,
           mode: str = "hybrid") -> list[Hit]:
    """The best `top_k` chunks in `scope`; mode "vector", "text" or "hybrid".
    One statement (in a transaction with its ef_search when it walks HNSW)."""
    scope = sized(scope)
    use_vector = mode in ("vector", "hybrid") and vector is not None
    use_text = mode in ("text", "hybrid") and bool(query.strip())
    if not (use_vector or use_text) or not scope.chunks:
        return []
    ef_search = _vector_plan(scope) if use_vector else None
    params = {"user": scope.user_id, "chat": scope.conversation_id, "query": query, "candidates": CANDIDATES,
              "chunks": scope.chunks, "top_k": top_k,
              "vector": "[" + ",".join(f"{x:.7g}" for x in vector) + "]" if use_vector else None}
    sql = _search_sql(scope, vector=use_vector, text=use_text, ef_search=ef_search)
    # ef_search is set for this transaction only: an exact plan needs neither.
    with transaction.atomic() if ef_search else nullcontext(), connection.cursor() as cursor:
        if ef_search:
            cursor.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(ef_search)])
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [Hit(chunk_id=r[0], document_id=r[1], document=r[2], page=r[3], heading=r[4], text=r[5], score=r[6],
                verdict_flagged=r[7], verdict_category=r[8], verdict_version=r[9]) for r in rows]
