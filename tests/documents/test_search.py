"""Hybrid search: vector and full-text rankings merged by reciprocal rank fusion."""
import pytest
from django.db import connection

from documents import selectors
from documents.selectors import Scope, fuse
from retrieval.services import embed

pytestmark = pytest.mark.django_db

PASSAGES = {
    "longbourn.txt": "Mr. Bennet and his wife live at Longbourn, an estate in Hertfordshire, with their five daughters.",
    "pemberley.txt": "Pemberley is Mr. Darcy's great house in Derbyshire, with a large park and a famous library.",
    "wickham.txt": "George Wickham is an officer in the militia, charming to everyone, and deeply in debt.",
    "codes.txt": "Entail code XK-4471 governs the Longbourn estate.",
}


@pytest.fixture
def library(alice, upload):
    return {name: upload(alice, name, text.encode()) for name, text in PASSAGES.items()}


def _search(user, query, mode="hybrid", conversation_id=None):
    scope = Scope(user_id=user.id, conversation_id=conversation_id, use_library=True)
    return [h.document for h in selectors.search(scope=scope, query=query, vector=embed([query])[0], mode=mode)]


def test_fusion_rewards_agreement_between_rankings():
    assert [i for i, _ in fuse([1, 2, 3], [2, 4, 5])][:3] == [2, 1, 4]
    assert fuse([], [7]) == [(7, 1 / 61)]


def test_vector_search_finds_a_paraphrase_full_text_cannot(alice, library):
    query = "Which soldier owes money?"
    assert _search(alice, query, "vector")[0] == "wickham.txt"
    assert "wickham.txt" not in _search(alice, query, "text")
    assert _search(alice, query)[0] == "wickham.txt"


def test_full_text_finds_an_exact_code_vectors_blur(alice, library):
    assert _search(alice, "XK-4471", "text") == ["codes.txt"]
    assert _search(alice, "XK-4471")[0] == "codes.txt"


def test_hybrid_ranks_first_what_both_rankings_agree_on(alice, library):
    assert _search(alice, "Where is Mr. Darcy's house?")[0] == "pemberley.txt"


def test_a_small_scope_in_a_large_table_still_gets_its_results(alice, bob, upload, library):
    # bob's many chunks fill the HNSW neighbourhood; alice's scope is a few rows.
    for i in range(30):
        upload(bob, f"b{i}.txt", f"Mr. Bennet at Longbourn, copy {i}.".encode())
    assert _search(alice, "Longbourn estate", "vector")[:2] != []
    assert len(_search(alice, "Mr. Bennet Longbourn", "vector")) == 4


def test_the_one_statement_fuses_the_two_rankings_as_fuse_does(alice, library):
    scope = Scope(user_id=alice.id, conversation_id=None, use_library=True)
    for query in ("Where is Mr. Darcy's house?", "Which officer is in debt at Longbourn?"):
        vector = embed([query])[0]
        rankings = [[h.chunk_id for h in selectors.search(scope=scope, query=query, vector=vector, mode=mode,
                                                          top_k=selectors.CANDIDATES)] for mode in ("vector", "text")]
        hybrid = selectors.search(scope=scope, query=query, vector=vector, top_k=3)
        assert [(h.chunk_id, h.score) for h in hybrid] == pytest.approx(fuse(*rankings)[:3])


def _hnsw_scans() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_get_xact_numscans('chunk_embedding_hnsw'::regclass)")
        return cursor.fetchone()[0]


def test_a_short_graph_walk_is_redone_exactly_in_the_same_statement(alice, bob, upload, library, graph_walk):
    for i in range(10):
        upload(bob, f"b{i}.txt", f"Mr. Bennet at Longbourn, copy {i}.".encode())
    before = _hnsw_scans()
    assert sorted(_search(alice, "Mr. Bennet Longbourn", "vector")) == sorted(PASSAGES)
    assert _hnsw_scans() > before


def test_the_vector_plan_follows_the_scopes_size():
    def plan(chunks, table):
        return selectors._vector_plan(Scope(user_id=1, conversation_id=None, use_library=True, chunks=chunks,
                                            table_chunks=table))
    assert plan(500, 100_000) is None  # a chat's attachments: every distance
    assert plan(100_000, 100_000) == selectors.HNSW_EF_SEARCH  # the whole table: the graph
    assert plan(50_000, 100_000) == 80  # half of it: a longer walk keeps 20 in scope
    assert plan(5_000, 1_000_000) is None  # a small share: the walk would cost more


def test_a_turn_scope_counts_what_it_searches(alice, chat, upload):
    from documents import services
    from documents.models import Chunk

    assert selectors.turn_scope(user_id=alice.id, conversation_id=chat.id) is None
    upload(alice, "lib.txt", PASSAGES["wickham.txt"].encode())
    assert selectors.turn_scope(user_id=alice.id, conversation_id=chat.id) is None  # the library is off
    upload(alice, "chat.txt", PASSAGES["codes.txt"].encode(), conversation_id=chat.id)
    scope = selectors.turn_scope(user_id=alice.id, conversation_id=chat.id)
    assert (scope.use_library, scope.chunks) == (False, Chunk.objects.filter(document__conversation=chat).count())
    services.chat_use_library(conversation_id=chat.id, on=True)
    scope = selectors.turn_scope(user_id=alice.id, conversation_id=chat.id)
    assert (scope.use_library, scope.chunks) == (True, Chunk.objects.filter(user=alice).count())
